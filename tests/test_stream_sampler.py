"""ShuffleBufferBatches: shuffle-buffer batches over a lazy stream of records (each record
at most once, determinism, exact resume by replay, no duplicates, pools of negatives,
bounded memory, refused states, argument checks)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastkit.data import Example
from contrastkit.negatives import ShuffleBufferBatches


def distinct_records(n):
    return [Example(f"q{i}", f"d{i}", source=f"f:{i}") for i in range(n)]


def colliding_records(n=120, seed=0):
    rng = random.Random(seed)
    # positives from a small pool, a few repeated queries: many collisions
    return [Example(f"q{rng.randrange(n)}", f"d{rng.randrange(n // 6)}", (f"n{rng.randrange(n)}",),
                    source=f"f:{i}") for i in range(n)]


class Source:
    """A re-iterable lazy source that counts how many records each pass has pulled."""

    def __init__(self, records):
        self.records = records
        self.calls = 0
        self.pulled = 0

    def __call__(self):
        self.calls += 1
        self.pulled = 0
        return self._gen()

    def _gen(self):
        for r in self.records:
            self.pulled += 1
            yield r


def make(records, batch_size, **kw):
    return ShuffleBufferBatches(lambda: iter(records), batch_size, num_records=len(records), **kw)


def sources(batches):
    return [[e.source for e in b] for b in batches]


# 1. each record at most once; full coverage with a large buffer ---------------------------------


@pytest.mark.parametrize("no_duplicates,buffer_size", [(False, 1), (False, 5), (False, 64), (False, 1000),
                                                       (True, 24), (True, 64), (True, 1000)])
def test_each_record_at_most_once(no_duplicates, buffer_size):
    recs = colliding_records(120, seed=2)
    s = make(recs, 6, buffer_size=buffer_size, no_duplicates=no_duplicates, seed=4)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert all(len(b) == 6 for b in batches)
        taken = [e.source for b in batches for e in b]
        assert len(taken) == len(set(taken))
        assert len(batches) <= len(s) == 120 // 6
        if not no_duplicates:
            assert len(batches) == len(s)


@pytest.mark.parametrize("n,bs", [(50, 7), (48, 8), (10, 3)])
def test_full_coverage_with_large_buffer(n, bs):
    recs = distinct_records(n)
    s = make(recs, bs, buffer_size=n, seed=1)  # no collisions: no_duplicates changes nothing
    for epoch in range(2):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == n // bs
        assert all(len(b) == bs for b in batches)
        taken = [e.source for b in batches for e in b]
        assert len(set(taken)) == len(taken) == (n // bs) * bs  # all but the dropped tail
    plain = make(recs, bs, buffer_size=n, seed=1, no_duplicates=False)
    plain.set_epoch(1)
    assert sources(plain) == sources(s)  # nothing collides: no_duplicates changes nothing


def test_empty_stream_and_small_stream():
    assert list(make([], 4, buffer_size=3)) == [] and len(make([], 4)) == 0
    s = make(distinct_records(3), 4)
    assert len(s) == 0 and list(s) == []


# 2. determinism --------------------------------------------------------------------------------


def test_deterministic_and_epochs_differ():
    recs = colliding_records(100, seed=1)
    a, b = make(recs, 5, buffer_size=20, seed=7), make(recs, 5, buffer_size=20, seed=7)
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert sources(a) == sources(b)
        assert sources(a) == sources(a)  # a second pass over the same epoch repeats it
    a.set_epoch(0)
    e0 = sources(a)
    a.set_epoch(1)
    assert sources(a) != e0
    assert sources(make(recs, 5, buffer_size=20, seed=8)) != e0


def test_buffer_of_one_is_file_order():
    recs = distinct_records(23)
    s = make(recs, 4, buffer_size=1, seed=3)
    s.set_epoch(5)
    assert [e.source for b in s for e in b] == [f"f:{i}" for i in range(20)]


def test_order_is_a_local_shuffle():
    # a record comes out at most buffer_size - 1 places before its place in the file
    n, buf = 200, 10
    recs = distinct_records(n)
    s = make(recs, 1, buffer_size=buf, seed=0, no_duplicates=False)
    order = [int(b[0].source.split(":")[1]) for b in s]
    assert sorted(order) == list(range(n)) and order != list(range(n))
    assert all(out >= i - (buf - 1) for out, i in enumerate(order))


# 3. resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("no_duplicates", [True, False])
def test_resume_at_every_kind_of_position(no_duplicates):
    recs = colliding_records(90, seed=5)
    kw = dict(buffer_size=12, seed=3, no_duplicates=no_duplicates, fingerprint="abc")
    for epoch in (0, 1, 4):
        full = make(recs, 5, **kw)
        full.set_epoch(epoch)
        batches = sources(full)
        n = len(batches)
        assert n >= 3
        for k in sorted({0, 1, n // 2, n - 1, n}):
            run = make(recs, 5, **kw)
            run.set_epoch(epoch)
            it = iter(run)
            head = [[e.source for e in next(it)] for _ in range(k)]
            state = run.state_dict()  # taken mid-iteration
            assert state["position"] == k and state["epoch"] == epoch
            assert head == batches[:k]
            resumed = make(recs, 5, **kw)
            resumed.set_epoch(epoch)
            resumed.load_state_dict(state)
            assert sources(resumed) == batches[k:]
            assert resumed.state_dict()["position"] == n
            # a later pass of the resumed sampler is the whole epoch again
            assert sources(resumed) == batches
            # a state given as a count (batches_done) resumes the same way; compare the texts
            again = make(recs, 5, **kw)
            again.set_epoch(epoch)
            again.load_state_dict(full.state_dict(batches_done=k))
            by_source = {e.source: e.texts() for e in recs}
            assert [[e.texts() for e in b] for b in again] == [[by_source[x] for x in b] for b in batches[k:]]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), bs=st.integers(1, 6), buf=st.integers(1, 12), seed=st.integers(0, 5),
       epoch=st.integers(0, 3), no_dup=st.booleans(), pool=st.integers(2, 8), k=st.integers(0, 10))
def test_resume_property(n, bs, buf, seed, epoch, no_dup, pool, k):
    rng = random.Random(n * 31 + seed)
    recs = [Example(f"q{i}", f"d{rng.randrange(pool)}", source=f"f:{i}") for i in range(n)]
    kw = dict(buffer_size=buf, seed=seed, no_duplicates=no_dup)
    full = make(recs, bs, **kw)
    full.set_epoch(epoch)
    try:
        batches = sources(full)
    except ValueError as err:  # a pathological draw: the buffer could not fill a batch
        assert no_dup and "data.shuffle_buffer" in str(err)
        return
    k = min(k, len(batches))
    resumed = make(recs, bs, **kw)
    resumed.set_epoch(epoch)
    resumed.load_state_dict({**full.state_dict(), "position": k})
    assert sources(resumed) == batches[k:]


def test_position_past_the_end_is_an_error():
    recs = distinct_records(20)
    s = make(recs, 4)
    with pytest.raises(ValueError, match="past the 5 batches"):
        s.load_state_dict({**s.state_dict(), "position": 6})
    # with no_duplicates the epoch may hold fewer batches than len(): found on replay
    recs = [Example(f"q{i}", "same" if i < 10 else f"d{i}") for i in range(20)]
    s = make(recs, 4, buffer_size=20, seed=0)
    n = len(list(s))
    assert n < len(s) == 5
    s.load_state_dict({**s.state_dict(), "position": 5})
    with pytest.raises(ValueError, match=f"position 5 is past the {n} batches of epoch 0"):
        list(s)


def test_set_epoch_restarts_after_a_loaded_state():
    recs = distinct_records(30)
    s = make(recs, 3, buffer_size=5, seed=2)
    s.set_epoch(2)
    whole = sources(s)
    s.load_state_dict({**s.state_dict(), "position": 4})
    s.set_epoch(2)
    assert sources(s) == whole and s.state_dict()["position"] == len(whole)


# 4. no duplicates ------------------------------------------------------------------------------


def test_no_text_twice_in_a_batch_and_deferred_not_lost():
    recs = colliding_records(150, seed=9)
    s = make(recs, 8, buffer_size=30, seed=1)
    plain = make(recs, 8, buffer_size=30, seed=1, no_duplicates=False)
    assert any(len({t for e in b for t in e.texts()}) < sum(len(set(e.texts())) for e in b) for b in plain)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        for b in batches:
            texts = [t for e in b for t in set(e.texts())]
            assert len(texts) == len(set(texts))
        taken = [e.source for b in batches for e in b]
        assert len(taken) == len(set(taken))
        # set-aside records stay in the epoch: almost all records are used, only an end remainder is dropped
        assert len(taken) >= 150 - 2 * 8


def test_deferred_record_comes_later_in_the_epoch():
    # buffer of one: records come in file order; r1 shares r0's positive, so it is set
    # aside while batch 0 is filled ([r0, r2]) and put back afterwards
    recs = [Example("q0", "d0", source="r0"), Example("q1", "d0", source="r1")] + \
        [Example(f"q{i}", f"d{i}", source=f"r{i}") for i in range(2, 12)]
    s = make(recs, 2, buffer_size=1, seed=0)
    batches = sources(s)
    assert batches[0] == ["r0", "r2"]
    assert "r1" in [x for b in batches[1:] for x in b]
    assert sorted(x for b in batches for x in b) == sorted(e.source for e in recs)


def test_own_repeated_texts_are_placed():
    recs = [Example("x", "x", source="x")] + distinct_records(5)
    s = make(recs, 2, buffer_size=6, seed=0)
    taken = [e.source for b in s for e in b]
    assert len(taken) == 6 and "x" in taken


def test_pathological_source_raises():
    recs = [Example(f"q{i}", "shared") for i in range(50)]
    s = make(recs, 2, buffer_size=8)
    with pytest.raises(ValueError, match=r"shuffle buffer of 8 records holds no record.*data\.shuffle_buffer"
                                         r".*batching\.sampler=random"):
        list(s)
    # without no_duplicates the same source batches fine
    assert len(list(make(recs, 2, buffer_size=8, no_duplicates=False))) == 25


# 5. pools of negatives -------------------------------------------------------------------------


def test_num_negatives_presents_set_epoch_mod_pool():
    recs = [Example(f"q{i}", f"d{i}", (f"a{i}", f"b{i}"), negative_ids=(f"ia{i}", f"ib{i}"), source=f"f:{i}")
            for i in range(12)]
    s = make(recs, 3, buffer_size=4, num_negatives=1, seed=0)
    for epoch in range(4):
        s.set_epoch(epoch)
        out = [e for b in s for e in b]
        assert len(out) == 12
        letter = "ab"[epoch % 2]
        for e in out:
            i = int(e.source.split(":")[1])
            assert e.negatives == (f"{letter}{i}",) and e.negative_ids == (f"i{letter}{i}",)
    # the duplicate check compares the presented set only: both records train on "x" in even epochs
    recs = [Example("q0", "d0", ("x", "a")), Example("q1", "d1", ("x", "b"))]
    s = make(recs, 2, buffer_size=2, num_negatives=1)
    s.set_epoch(0)
    assert list(s) == []
    s.set_epoch(1)
    assert len(list(s)) == 1


# 6. memory and lazy reading --------------------------------------------------------------------


@pytest.mark.parametrize("buffer_size,no_duplicates", [(1, False), (7, False), (16, True), (5, True)])
def test_memory_bound_and_lazy_reading(buffer_size, no_duplicates):
    recs = colliding_records(200, seed=3) if no_duplicates else distinct_records(200)
    src = Source(recs)
    bs = 6
    s = ShuffleBufferBatches(src, bs, num_records=200, buffer_size=buffer_size, seed=2, no_duplicates=no_duplicates)
    for epoch in range(2):
        s.set_epoch(epoch)
        it = iter(s)
        assert src.calls == epoch  # records() is called when the iteration starts, not before
        consumed = 0
        for k, batch in enumerate(it, 1):
            consumed += len(batch)
            held = src.pulled - consumed
            assert held <= 2 * buffer_size + bs  # buffer + set-aside records + a partial batch
            if not no_duplicates:
                # exactly the records needed: the buffer's fill plus one per record taken
                assert src.pulled == min(200, buffer_size + k * bs)
                assert held <= buffer_size
        assert src.calls == epoch + 1 and src.pulled == 200


def test_stopping_early_reads_no_further():
    src = Source(distinct_records(1000))
    s = ShuffleBufferBatches(src, 10, num_records=1000, buffer_size=50, no_duplicates=False)
    it = iter(s)
    for _ in range(3):
        next(it)
    assert src.pulled == 50 + 30
    it.close()
    assert src.pulled == 80


def test_resume_replays_only_up_to_what_is_needed():
    src = Source(distinct_records(300))
    s = ShuffleBufferBatches(src, 10, num_records=300, buffer_size=20, no_duplicates=False)
    s.load_state_dict({**s.state_dict(), "position": 5})
    it = iter(s)
    first = next(it)
    assert len(first) == 10 and src.calls == 1 and src.pulled == 20 + 60


def test_a_stream_of_another_length_is_an_error():
    recs = distinct_records(20)
    with pytest.raises(ValueError, match="yielded 20 records in epoch 0 but num_records=21"):
        list(ShuffleBufferBatches(lambda: iter(recs), 4, num_records=21))
    with pytest.raises(ValueError, match="more than num_records=19"):
        list(ShuffleBufferBatches(lambda: iter(recs), 4, num_records=19))


# 7. refused states -----------------------------------------------------------------------------


@pytest.mark.parametrize("change", [dict(seed=1), dict(batch_size=5), dict(fingerprint="other"),
                                    dict(buffer_size=9), dict(no_duplicates=False), dict(num_records=19),
                                    dict(num_negatives=1)])
def test_mismatched_state_is_refused(change):
    recs = [Example(f"q{i}", f"d{i}", (f"n{i}",)) for i in range(20)]
    base = dict(batch_size=4, seed=0, buffer_size=8, no_duplicates=True, num_records=20, num_negatives=None,
                fingerprint="abc")
    saved = ShuffleBufferBatches(lambda: iter(recs), **base)
    other = ShuffleBufferBatches(lambda: iter(recs), **{**base, **change})
    key, value = next(iter(change.items()))
    with pytest.raises(ValueError, match=f"{key}={base[key]!r} but this sampler has {key}={value!r}"):
        other.load_state_dict(saved.state_dict())


def test_state_dict_keys_and_other_kind():
    s = make(distinct_records(8), 2, fingerprint="f")
    state = s.state_dict()
    assert set(state) == {"kind", "epoch", "position", "seed", "batch_size", "buffer_size", "no_duplicates",
                          "num_records", "num_negatives", "fingerprint"}
    assert state["kind"] == "shuffle_buffer" and state["position"] == 0
    with pytest.raises(ValueError, match="kind='random'"):
        s.load_state_dict({**state, "kind": "random"})
    with pytest.raises(ValueError, match="position must be an int >= 0"):
        s.load_state_dict({**state, "position": -1})


# 8. argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=2.5), "batch_size must be an int >= 1"),
    (dict(batch_size=True), "batch_size must be an int >= 1"),
    (dict(buffer_size=0), "buffer_size must be an int >= 1, got 0"),
    (dict(num_records=-1), "num_records must be an int >= 0, got -1"),
    (dict(seed=-3), "seed must be an int >= 0, got -3"),
    (dict(num_negatives=0), "num_negatives must be an int >= 1"),
    (dict(no_duplicates="yes"), "no_duplicates must be a bool"),
    (dict(fingerprint=3), "fingerprint must be a str"),
    (dict(records=[1, 2]), "records must be a callable"),
])
def test_argument_validation(kwargs, message):
    args = dict(records=lambda: iter(()), batch_size=2, num_records=0)
    args.update(kwargs)
    records, batch_size = args.pop("records"), args.pop("batch_size")
    with pytest.raises(ValueError, match=message):
        ShuffleBufferBatches(records, batch_size, **args)
    s = make([], 2)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        s.set_epoch(-1)


def test_each_epoch_is_a_permutation_of_taken_records_with_large_buffer():
    # with buffer_size >= num_records the first batch's records are spread over the whole file
    recs = distinct_records(64)
    s = make(recs, 8, buffer_size=64, seed=0)
    firsts = Counter()
    for epoch in range(8):
        s.set_epoch(epoch)
        firsts.update(int(e.source.split(":")[1]) // 32 for e in next(iter(s)))
    assert firsts[0] > 0 and firsts[1] > 0


# the training loop: a run killed mid-epoch and resumed sees the batches of an uninterrupted one ----


def _trainer(run_dir, seen, *, resume=False, crash_at=None, checkpoint_every=None):
    import torch

    from contrastkit.training import RunFolder, Trainer, build_schedule

    recs = colliding_records(60, seed=11)
    batches = ShuffleBufferBatches(lambda: iter(recs), 4, num_records=60, buffer_size=16, seed=5, fingerprint="t")
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    calls = []

    def step_fn(batch):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        seen.append([e.source for e in batch])
        loss = (w - len(seen)).pow(2).sum()
        loss.backward()
        return loss.detach()

    total = 2 * len(batches) + 3  # into the third epoch
    return Trainer(modules={"w": torch.nn.ParameterDict({"w": w})}, step_fn=step_fn, batches=batches,
                   optimizer=opt, scheduler=build_schedule(opt, kind="linear", total_steps=total, warmup_steps=1),
                   total_steps=total, checkpoint_every=checkpoint_every, run=RunFolder.create(run_dir, resume=resume),
                   progress=False)


def test_training_loop_resume_sees_the_same_batches(tmp_path):
    full_seen = []
    _trainer(tmp_path / "full", full_seen).fit()
    part_seen = []
    part = _trainer(tmp_path / "part", part_seen, checkpoint_every=5, crash_at=23)  # epoch 1, checkpoint at 20
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed_seen = []
    _trainer(tmp_path / "part", resumed_seen, resume=True).fit(resume=True)
    assert part_seen[:20] + resumed_seen == full_seen
