"""Batch samplers: invariants (each example once, no duplicates), determinism, resume, B3 clusters."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from contrastkit.data import Example
from contrastkit.negatives import B3BatchSampler, NoDuplicatesBatchSampler
from contrastkit.negatives.samplers import RandomBatchSampler


def colliding_examples(n=60, seed=0):
    rng = random.Random(seed)
    # positives drawn from a small pool and a few repeated queries: many collisions
    return [Example(f"q{rng.randrange(n)}", f"d{rng.randrange(n // 3)}", (f"n{rng.randrange(n)}",)) for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_no_duplicates_invariants(batch_size):
    ex = colliding_examples()
    s = NoDuplicatesBatchSampler(ex, batch_size, seed=3)
    batches = list(s)
    assert len(batches) == len(s)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(ex)))  # every example exactly once
    for b in batches:
        texts = [t for i in b for t in set(ex[i].texts())]
        assert len(texts) == len(set(texts))  # no text twice in a batch
        assert 1 <= len(b) <= batch_size
    sizes = [len(b) for b in batches]
    first_short = next((k for k, n in enumerate(sizes) if n < batch_size), len(sizes))
    assert all(n < batch_size for n in sizes[first_short:])  # small batches only at the end


def test_no_duplicates_drop_last_and_placement():
    # five examples share one positive: with batch 5 only one can be in each batch
    ex = [Example(f"q{i}", "same") for i in range(5)] + [Example(f"r{i}", f"d{i}") for i in range(15)]
    s = NoDuplicatesBatchSampler(ex, 5, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert all(sum(i < 5 for i in b) <= 1 for b in batches)
    dropped = NoDuplicatesBatchSampler(ex, 5, seed=0, drop_last=True)
    kept = [i for b in dropped for i in b]
    assert all(len(b) == 5 for b in dropped) and len(kept) == len(set(kept)) <= 20
    # an example whose own texts repeat is still placed
    assert [i for b in NoDuplicatesBatchSampler([Example("x", "x"), Example("y", "z")], 2) for i in b] != []


def test_no_duplicates_deterministic_and_epochs():
    ex = colliding_examples(80, seed=1)
    a, b = NoDuplicatesBatchSampler(ex, 6, seed=7), NoDuplicatesBatchSampler(ex, 6, seed=7)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1 and sorted(i for bb in e1 for i in bb) == list(range(80))
    assert list(a) == e1  # iterating again repeats the epoch until set_epoch
    assert list(NoDuplicatesBatchSampler(ex, 6, seed=8)) != e0


@pytest.mark.parametrize("make", ["nodup", "b3", "random"])
def test_resume_sees_the_same_batches(make):
    ex = colliding_examples(64, seed=2)
    emb = F.normalize(torch.randn(64, 6, generator=torch.Generator().manual_seed(0)), dim=1)

    def build():
        if make == "nodup":
            return NoDuplicatesBatchSampler(ex, 5, seed=11)
        if make == "random":
            return RandomBatchSampler(len(ex), 5, seed=11)
        return B3BatchSampler(ex, 8, query_embeddings=emb, cluster_size=4, rank_window=(1, 5), seed=11)

    full = build()
    full.set_epoch(2)
    want = list(full)
    run = build()
    run.set_epoch(2)
    it = iter(run)
    got = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["position"] == 3 and state["epoch"] == 2
    resumed = build()
    resumed.load_state_dict(state)
    assert resumed.remaining() == want[3:]
    got += list(resumed)
    assert got == want
    # then the next epoch runs in full, as in an uninterrupted run
    resumed.set_epoch(3)
    full.set_epoch(3)
    assert list(resumed) == list(full)
    # a loop with a prefetching DataLoader passes its own count
    assert run.state_dict(batches_done=2)["position"] == 2


def test_state_checks():
    ex = colliding_examples(30)
    s = NoDuplicatesBatchSampler(ex, 4, seed=0)
    state = s.state_dict()
    with pytest.raises(ValueError, match="batch_size=4 but this sampler has batch_size=5"):
        NoDuplicatesBatchSampler(ex, 5, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        NoDuplicatesBatchSampler(list(reversed(ex)), 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="position 99 is past"):
        s.load_state_dict(dict(state, position=99))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        NoDuplicatesBatchSampler(ex, 0)


def test_dataloader_batch_sampler():
    ex = colliding_examples(20)
    s = NoDuplicatesBatchSampler(ex, 4, seed=0)
    loader = DataLoader(ex, batch_sampler=s, collate_fn=lambda items: [e.query for e in items])
    got = list(loader)
    assert [[ex[i].query for i in b] for b in s] == got


def planted(n_groups=8, per_group=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_groups, d, generator=g), dim=1)
    emb = centers.repeat_interleave(per_group, 0) + 0.05 * torch.randn(n_groups * per_group, d, generator=g)
    perm = torch.randperm(n_groups * per_group, generator=g)
    return F.normalize(emb[perm], dim=1), torch.arange(n_groups).repeat_interleave(per_group)[perm]


def test_b3_recovers_planted_clusters():
    emb, group = planted()
    ex = [Example(f"q{i}", f"d{i}") for i in range(64)]
    s = B3BatchSampler(ex, 16, query_embeddings=emb, cluster_size=8, rank_window=(0, 6), seed=0)
    assert s.num_clusters == 8
    # each METIS cluster is (almost) one planted group
    purity = sum(Counter(group[s.clusters == c].tolist()).most_common(1)[0][1] for c in range(8)) / 64
    assert purity >= 0.9
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert all(len(b) == 16 for b in batches)
    # a batch holds about batch_size / cluster_size clusters: here at most 3 planted groups
    assert all(len(set(group[b].tolist())) <= 3 for b in batches)
    # and it is much harder than random batches: mean in-batch similarity
    def mean_sim(bs):
        return sum(float((emb[b] @ emb[b].T).mean()) for b in bs) / len(bs)
    rand = [torch.randperm(64, generator=torch.Generator().manual_seed(1))[i:i + 16].tolist() for i in range(0, 64, 16)]
    assert mean_sim(batches) > mean_sim(rand) + 0.2
    again = B3BatchSampler(ex, 16, query_embeddings=emb, cluster_size=8, rank_window=(0, 6), seed=0)
    assert (again.clusters == s.clusters).all() and list(again) == batches


def test_b3_targets_drop_last_and_errors():
    emb, _ = planted(5, 6)
    tgt = F.normalize(emb + 0.01, dim=1)
    s = B3BatchSampler(list(range(30)), 8, query_embeddings=emb, target_embeddings=tgt, drop_last=True)
    assert all(len(b) == 8 for b in s) and len(s) == 3
    tiny = B3BatchSampler(list(range(3)), 8, query_embeddings=emb[:3])
    assert sorted(i for b in tiny for i in b) == [0, 1, 2] and len(tiny) == 1  # graph without edges still works
    with pytest.raises(ValueError, match=r"query_embeddings must be \(30, d\)"):
        B3BatchSampler(list(range(30)), 8, query_embeddings=emb[:10])
    with pytest.raises(ValueError, match="target_embeddings must have the queries' shape"):
        B3BatchSampler(list(range(30)), 8, query_embeddings=emb, target_embeddings=emb[:, :3])
    with pytest.raises(ValueError, match="rank_window"):
        B3BatchSampler(list(range(30)), 8, query_embeddings=emb, rank_window=(4, 4))


def test_no_duplicates_compares_the_negative_set_of_the_epoch():
    # every example's set 0 negative is the same text "hub"; their set 1 negatives differ:
    # epoch 0 (set 0) cannot put two examples together, epoch 1 (set 1) batches them all
    from contrastkit.data import Example

    ex = [Example(f"q{i}", f"d{i}", negatives=("hub", f"n{i}")) for i in range(8)]
    s = NoDuplicatesBatchSampler(ex, 4, seed=0, drop_last=True, num_negatives=1)
    s.set_epoch(0)
    assert list(s) == []
    s.set_epoch(1)
    assert sorted(i for b in s for i in b) == list(range(8))
    s.set_epoch(2)
    assert list(s) == []
    whole = NoDuplicatesBatchSampler(ex, 4, seed=0, drop_last=True)  # all texts: never together
    whole.set_epoch(1)
    assert list(whole) == []
