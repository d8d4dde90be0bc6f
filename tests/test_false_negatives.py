"""False-negative masks: against a dense boolean mask built naively, tile by tile, and in the loss."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import contrastkit as ck
from contrastkit.data import Example
from contrastkit.engine import tiled_logsumexp
from contrastkit.negatives import DuplicatePositiveMask, GuideMask, mnrl_columns


def dense_duplicate(row_ids, col_ids, pos):
    n, m = len(row_ids), len(col_ids)
    drop = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        ids = set(row_ids[i])
        if pos[i] >= 0 and col_ids[pos[i]] is not None:
            ids.add(col_ids[pos[i]])
        for j in range(m):
            drop[i, j] = col_ids[j] is not None and col_ids[j] in ids and j != pos[i]
    return drop


def dense_guide(ga, gc, pos, margin):
    a, c = F.normalize(ga.double(), dim=1), F.normalize(gc.double(), dim=1)
    s = a @ c.T
    drop = torch.zeros_like(s, dtype=torch.bool)
    for i in range(s.shape[0]):
        if pos[i] < 0:
            continue
        drop[i] = s[i] > s[i, pos[i]] - margin
        drop[i, pos[i]] = False
    return drop


def tiles_of(mask, n, m, tr, tc):
    """Apply the mask tile by tile to a zero matrix: the dropped entries come back as -inf."""
    x = torch.zeros(n, m)
    for r0 in range(0, n, tr):
        for c0 in range(0, m, tc):
            r1, c1 = min(n, r0 + tr), min(m, c0 + tc)
            tile = x[r0:r1, c0:c1].clone()
            if mask.touches(r0, r1, c0, c1):
                mask.apply_(tile, r0, r1, c0, c1)
            x[r0:r1, c0:c1] = tile
    return torch.isneginf(x)


def random_ids(rng, n, m, vocab):
    col = [rng.choice(vocab + [None]) for _ in range(m)]
    rows = [rng.sample(vocab, rng.randint(0, 3)) for _ in range(n)]
    pos = [rng.randrange(-1, m) if rng.random() < 0.2 else rng.randrange(m) for _ in range(n)]
    return rows, col, pos


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_mask_equals_dense_on_random_tiles(seed):
    rng = random.Random(seed)
    n, m = rng.randint(1, 23), rng.randint(1, 31)
    rows, cols, pos = random_ids(rng, n, m, [f"d{k}" for k in range(6)])
    mask = DuplicatePositiveMask(rows, cols, torch.tensor(pos))
    want = dense_duplicate(rows, cols, pos)
    for _ in range(3):
        tr, tc = rng.randint(1, n), rng.randint(1, m)
        assert torch.equal(tiles_of(mask, n, m, tr, tc), want)
    assert torch.equal(mask.pairs(), want.nonzero())
    asked = torch.tensor([rng.randrange(-1, m) for _ in range(n)])   # TileMask.drops: one cell per row
    assert torch.equal(mask.drops(asked), want[torch.arange(n), asked.clamp(min=0)] & (asked >= 0))


@pytest.mark.parametrize("seed", range(6))
def test_guide_mask_equals_dense_on_random_tiles(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, m = rng.randint(1, 23), rng.randint(1, 31)
    ga, gc = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(m, 5, generator=g, dtype=torch.float64)
    pos = [rng.randrange(m) if rng.random() > 0.2 else -1 for _ in range(n)]
    for margin in (0.0, 0.1, -0.05):
        mask = GuideMask(ga, gc, torch.tensor(pos), margin=margin)
        want = dense_guide(ga, gc, pos, margin)
        assert torch.equal(mask.dense(), want)
        tr, tc = rng.randint(1, n), rng.randint(1, m)
        assert torch.equal(tiles_of(mask, n, m, tr, tc), want)
        assert not any(want[i, p] for i, p in enumerate(pos) if p >= 0)
        asked = torch.tensor([rng.randrange(-1, m) for _ in range(n)])
        assert torch.equal(mask.drops(asked), want[torch.arange(n), asked.clamp(min=0)] & (asked >= 0))


def test_hand_made_duplicates():
    # anchors 0 and 2 share document "a"; anchor 1 has two relevant documents b and x;
    # column 4 is a hard negative that is the same text as anchor 0's positive
    rows = [["a"], ["b", "x"], ["a"], []]
    cols = ["a", "b", "a", "c", "a", "x", None]
    mask = DuplicatePositiveMask(rows, cols, [0, 1, 2, 3])
    assert sorted(map(tuple, mask.pairs().tolist())) == [(0, 2), (0, 4), (1, 5), (2, 0), (2, 4)]
    with pytest.raises(ValueError, match="built for 4 x 7"):
        tiled_logsumexp(torch.randn(4, 3), torch.randn(6, 3), masks=[mask])
    with pytest.raises(ValueError, match=r"positive_index must lie in \[-1, 7\)"):
        DuplicatePositiveMask(rows, cols, [0, 1, 2, 7])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        DuplicatePositiveMask(rows, cols, [0, 1])
    with pytest.raises(ValueError, match="single string"):
        DuplicatePositiveMask(["a", ["b"]], ["a", "b"], [0, 1])


def test_from_examples_mnrl_layout():
    batch = [Example("q1", "A", ("B", "N1"), query_id="1"), Example("q2", "B", ("C", "A"), query_id="2"),
             Example("q1", "D", ("E", "F"), query_id="1")]
    assert mnrl_columns(batch) == ["A", "B", "D", "B", "C", "E", "N1", "A", "F"]
    mask = DuplicatePositiveMask.from_examples(batch, known_positives={"2": ["F"]})
    got = sorted(map(tuple, mask.pairs().tolist()))
    # q1 (rows 0, 2) knows A and D; q2 (row 1) knows B and F (from the qrels)
    want = [(0, 2), (0, 7), (1, 3), (1, 8), (2, 0), (2, 7)]
    assert got == want
    by_id = [Example("q", "t1", ("t2",), query_id="1", positive_id="d1", negative_ids=("d1",)),
             Example("r", "t3", ("t4",), query_id="2", positive_id="d3", negative_ids=("d4",))]
    assert DuplicatePositiveMask.from_examples(by_id, key="id").pairs().tolist() == [[0, 2]]
    with pytest.raises(ValueError, match="different numbers of negatives"):
        mnrl_columns([Example("q", "a"), Example("r", "b", ("c",))])


def naive_masked_info_nce(q, k, pos, drop, t):
    x = (F.normalize(q.double(), dim=1) @ F.normalize(k.double(), dim=1).T) / t
    x = x.masked_fill(drop, float("-inf"))
    return (torch.logsumexp(x, 1) - x[torch.arange(len(pos)), pos]).mean()


def test_in_loss_equals_naive_with_gradients():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    n, m = 13, 29
    q = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(m, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ga, gc = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(m, 4, generator=g, dtype=torch.float64)
    rows, cols, _ = random_ids(rng, n, m, ["a", "b", "c", "d"])
    pos = torch.arange(n)
    dup = DuplicatePositiveMask(rows, cols, pos)
    guide = GuideMask(ga, gc, pos, margin=0.05)
    drop = dense_duplicate(rows, cols, pos.tolist()) | dense_guide(ga, gc, pos.tolist(), 0.05)
    assert drop.any() and not drop.all(1).any()
    for tile in (None, (4, 7), (13, 3)):
        got = ck.functional.info_nce(q, k, temperature=0.1, positives=pos, masks=[dup, guide], tile_size=tile)
        want = naive_masked_info_nce(q, k, pos, drop, 0.1)
        gq, gk = torch.autograd.grad(got, (q, k))
        wq, wk = torch.autograd.grad(want, (q, k))
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(gq, wq, rtol=1e-9, atol=1e-12) and torch.allclose(gk, wk, rtol=1e-9, atol=1e-12)
    # and through the engine's raw log-sum-exp
    lse, _ = tiled_logsumexp(q.detach(), k.detach(), masks=[dup, guide], tile_size=(5, 6))
    ref = torch.logsumexp((q.detach() @ k.detach().T).masked_fill(drop, float("-inf")), 1)
    assert torch.allclose(lse.double(), ref, rtol=1e-10)


def test_guide_mask_checks():
    a, c = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="dimension 4 but guide_candidates 3"):
        GuideMask(a, torch.randn(5, 3), torch.arange(3))
    with pytest.raises(ValueError, match="similarity"):
        GuideMask(a, c, torch.arange(3), similarity="l2")
    with pytest.raises(ValueError, match="non-finite"):
        GuideMask(a, c.clone().fill_(float("nan")), torch.arange(3))
    with pytest.raises(ValueError, match="integers"):
        GuideMask(a, c, torch.zeros(3))
    m = GuideMask(a, c, torch.tensor([-1, -1, -1]))
    assert not m.dense().any()
    with pytest.raises(ValueError, match="built for 3 x 5"):
        tiled_logsumexp(torch.randn(3, 4), torch.randn(6, 4), masks=[m])


def test_guide_mask_hand_case_dot():
    ga = torch.tensor([[1.0, 0.0]])
    gc = torch.tensor([[0.5, 0.0], [0.7, 0.0], [0.4, 0.0], [0.45, 0.0]])
    m = GuideMask(ga, gc, [0], margin=0.1, similarity="dot")
    assert m.dense().tolist() == [[False, True, False, True]]  # 0.7 > 0.4 and 0.45 > 0.4; 0.4 is not > 0.4
