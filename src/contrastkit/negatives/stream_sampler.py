"""Batches from a training file larger than memory: a seeded shuffle buffer over a lazy
stream of records, resumable by replay.

:class:`ShuffleBufferBatches` is the streaming counterpart of the in-memory samplers of
:mod:`.samplers`. The records are never all held: ``records()`` is called at the start
of every epoch and read lazily, in its fixed (file) order, and the epoch's order is a
*shuffle buffer* (as ``tf.data.Dataset.shuffle`` or torchdata's ``Shuffler``): a buffer
of ``buffer_size`` records from which a seeded, uniformly random slot is taken each time
and refilled with the next record of the stream.

That order is a *local* shuffle, not a uniform permutation of the file: a record can come
out at most about ``buffer_size`` places earlier than its place in the file (it must have
been read into the buffer first), while it may stay in the buffer and come out arbitrarily
later. A file sorted by topic or source stays roughly sorted at scales much larger than
the buffer; shuffle such a file once on disk, or use a buffer that is a good share of it.
With ``buffer_size >= num_records`` every order is a uniform random permutation.

Contract (what :class:`contrastkit.training.loop.Trainer` expects from ``batches``):

- ``set_epoch(e)`` selects epoch ``e`` and restarts it; ``__iter__`` yields the epoch's
  batches (lists of :class:`~contrastkit.data.Example`); ``len()`` is
  ``num_records // batch_size``;
- ``state_dict()`` / ``load_state_dict()`` save and restore the epoch and the number of
  batches of it already handed out. A restored sampler *replays* the epoch: it reads the
  stream again from the start, makes the same random draws (they depend only on
  ``(seed, epoch)``) and yields only the batches after the saved position, so a resumed
  run sees exactly the batches an uninterrupted one would have. Resuming costs one read of
  the epoch up to that position (no model work).

Memory: the buffer (``buffer_size`` records), the records set aside for the batch being
filled (``no_duplicates``; at most ``buffer_size``, else a ValueError) and one batch.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np

from .samplers import _check_int

__all__ = ["ShuffleBufferBatches"]

_END = object()


class ShuffleBufferBatches:
    """Seeded shuffle-buffer batches over a lazily read stream of training records.

    Epoch ``e`` (random draws from ``numpy.random.default_rng([seed, e])``):

    1. ``records()`` is called and its first ``buffer_size`` records fill the buffer;
    2. repeatedly a uniformly random slot of the buffer is taken and refilled with the
       next record of the stream (once the stream is exhausted, the buffer shrinks);
    3. the records taken are cut, in order, into batches of ``batch_size``; the last
       incomplete batch is dropped (``drop_last``).

    So every record is in at most one batch per epoch, and with ``no_duplicates=False``
    every record but the ``num_records % batch_size`` left at the end is in exactly one.
    The order is a local shuffle, not a uniform permutation (see the module doc): a record
    comes out at most about ``buffer_size`` places before its place in the file.

    ``no_duplicates=True`` (sentence-transformers' NoDuplicatesBatchSampler semantics): a
    batch never holds the same text (query, positive or negative of the record as trained
    on) in two of its records. A record taken from the buffer that shares a text with the
    batch so far is set aside and put back into the buffer once the batch is complete, so
    it stays in the epoch. A record whose own texts repeat (query == positive) is still
    placed. If more than ``buffer_size`` records are set aside while one batch is filled,
    a ValueError (the data repeats a text too often for the buffer). When the stream is
    exhausted and the buffer holds no record that fits the batch being filled, that
    incomplete batch is dropped and the set-aside records are batched afresh; the records
    that cannot form a full batch at the end are dropped. The epoch may then give fewer
    than ``len()`` batches.

    Args:
        records: called at the start of every epoch (and every replay), returns an iterable
            of :class:`~contrastkit.data.Example` in a fixed order, read lazily; the same
            records in the same order on every call.
        batch_size: records per batch.
        num_records: how many records ``records()`` yields (from an earlier counting pass);
            gives ``len()``. A stream that yields another number is a ValueError when found.
        seed: seeds the order together with the epoch.
        buffer_size: records in the shuffle buffer.
        no_duplicates: keep repeated texts out of a batch (above).
        num_negatives: records holding a pool of negative sets are presented, in epoch e,
            as :meth:`Example.negative_set` ``(num_negatives, e)`` (the set trained on then;
            also what ``no_duplicates`` compares). None: the records as they are.
        fingerprint: anything that identifies the data (e.g. a hash of the file's size and
            head); a saved state with another fingerprint is refused.

    Attributes: ``epoch`` (the epoch the next iteration follows), ``kind``.

    Example::

        from contrastkit.data import Example
        from contrastkit.negatives import ShuffleBufferBatches
        records = [Example(f"q{i}", f"d{i % 7}") for i in range(40)]
        make = lambda: ShuffleBufferBatches(lambda: iter(records), 4, num_records=len(records),
                                            buffer_size=8, seed=0)
        batches = make()
        batches.set_epoch(1)
        epoch = list(batches)
        assert all(len({e.positive for e in b}) == 4 for b in epoch)
        it = iter(batches)
        first = [next(it) for _ in range(3)]
        state = batches.state_dict()                 # position 3 of epoch 1
        resumed = make()
        resumed.set_epoch(1)
        resumed.load_state_dict(state)
        assert first + list(resumed) == epoch
    """

    kind = "shuffle_buffer"

    def __init__(self, records: Callable[[], Iterable], batch_size: int, *, num_records: int,
                 seed: int = 0, buffer_size: int = 10000, no_duplicates: bool = True,
                 num_negatives: Optional[int] = None, fingerprint: str = "") -> None:
        if not callable(records):
            raise ValueError(f"records must be a callable returning an iterable of Examples (called once per "
                             f"epoch), got {type(records).__name__}")
        self._records = records
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_records = _check_int("num_records", num_records, 0)
        self.seed = _check_int("seed", seed, 0)
        self.buffer_size = _check_int("buffer_size", buffer_size, 1)
        if not isinstance(no_duplicates, (bool, np.bool_)):
            raise ValueError(f"no_duplicates must be a bool, got {no_duplicates!r}")
        self.no_duplicates = bool(no_duplicates)
        self.num_negatives = None if num_negatives is None else _check_int("num_negatives", num_negatives, 1)
        if not isinstance(fingerprint, str):
            raise ValueError(f"fingerprint must be a str, got {fingerprint!r}")
        self.fingerprint = fingerprint
        self.epoch = 0
        self._start = 0      # batches of the epoch the next iteration skips (set by load_state_dict)
        self._position = 0   # batches of the current epoch handed out

    # -- the epoch ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (and restart it)."""
        self.epoch = _check_int("epoch", epoch, 0)
        self._start = self._position = 0

    def __len__(self) -> int:
        """``num_records // batch_size``: the batches of an epoch (with ``no_duplicates``, an
        upper bound: records that cannot form a full batch at the end are dropped)."""
        return self.num_records // self.batch_size

    def _present(self, record, epoch: int):
        return record if self.num_negatives is None else record.negative_set(self.num_negatives, epoch)

    def _epoch_batches(self, epoch: int) -> Iterator[List]:
        """All full batches of ``epoch``, in order, read lazily from ``records()``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        draws: List[float] = []

        def slot(n: int) -> int:  # a uniform slot of n, from 53-bit floats drawn in chunks
            if not draws:
                draws.extend(rng.random(1024).tolist()[::-1])
            return min(int(draws.pop() * n), n - 1)

        bs, cap, no_dup = self.batch_size, self.buffer_size, self.no_duplicates
        source = iter(self._records())
        read = 0

        def pull():
            nonlocal read
            rec = next(source, _END)
            if rec is _END:
                if read != self.num_records:
                    raise ValueError(f"records() yielded {read} records in epoch {epoch} but num_records="
                                     f"{self.num_records}: the training file changed since it was counted")
                return _END
            read += 1
            if read > self.num_records:
                raise ValueError(f"records() yielded more than num_records={self.num_records} records in epoch "
                                 f"{epoch}: the training file changed since it was counted")
            return self._present(rec, epoch)

        try:
            buffer: List = []
            exhausted = False
            while len(buffer) < cap:
                rec = pull()
                if rec is _END:
                    exhausted = True
                    break
                buffer.append(rec)
            batch: List = []
            seen: set = set()
            deferred: List = []
            made = 0
            while buffer or deferred:
                if not buffer:
                    # stream exhausted, nothing left fits this batch: drop it, batch the rest afresh
                    buffer, deferred, batch, seen = deferred, [], [], set()
                    continue
                i = slot(len(buffer))
                rec = buffer[i]
                # refill the slot from the stream while the buffer is at (or under) its size;
                # a buffer swollen by put-back records shrinks back first
                nxt = _END if exhausted or len(buffer) > cap else pull()
                if nxt is _END:
                    exhausted = exhausted or len(buffer) <= cap
                    buffer[i] = buffer[-1]
                    buffer.pop()
                else:
                    buffer[i] = nxt
                if no_dup:
                    texts = set(rec.texts())
                    if texts & seen:
                        deferred.append(rec)
                        if len(deferred) > cap:
                            raise ValueError(
                                f"the shuffle buffer of {cap} records holds no record whose texts differ from the "
                                f"batch so far: {len(deferred)} records drawn while filling batch {made + 1} of "
                                f"epoch {epoch} ({len(batch)} of {bs} records placed) share a text with it; raise "
                                f"data.shuffle_buffer or use batching.sampler=random")
                        continue
                    seen |= texts
                batch.append(rec)
                if len(batch) == bs:
                    made += 1
                    yield batch
                    batch, seen = [], set()
                    if deferred:
                        buffer.extend(deferred)
                        deferred = []
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[List]:
        epoch = self.epoch
        start, self._start = self._start, 0
        self._position = start
        done = 0
        for batch in self._epoch_batches(epoch):
            done += 1
            if done <= start:
                continue  # replaying the batches handed out before the saved position
            self._position += 1
            yield batch
        if done < start:
            raise ValueError(f"sampler state position {start} is past the {done} batches of epoch {epoch}")

    # -- resume ------------------------------------------------------------------------

    def _settings(self) -> Dict[str, object]:
        return {"kind": self.kind, "seed": self.seed, "batch_size": self.batch_size,
                "buffer_size": self.buffer_size, "no_duplicates": self.no_duplicates,
                "num_records": self.num_records, "num_negatives": self.num_negatives,
                "fingerprint": self.fingerprint}

    def state_dict(self, batches_done: Optional[int] = None) -> Dict[str, object]:
        """``{"kind", "epoch", "position", "seed", "batch_size", "buffer_size", "no_duplicates",
        "num_records", "num_negatives", "fingerprint"}``.

        ``position`` is the number of batches of this epoch already used: by default the
        number this sampler's iterator has handed out; a loop that prefetches batches
        should pass its own count as ``batches_done``.
        """
        pos = self._position if batches_done is None else _check_int("batches_done", batches_done, 0)
        return {"kind": self.kind, "epoch": self.epoch, "position": int(pos), "seed": self.seed,
                "batch_size": self.batch_size, "buffer_size": self.buffer_size,
                "no_duplicates": self.no_duplicates, "num_records": self.num_records,
                "num_negatives": self.num_negatives, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore a :meth:`state_dict`: the next iteration replays that epoch from the start
        of the stream and yields only the batches after ``position``. A state saved with
        other settings or data (kind, seed, batch size, buffer size, no_duplicates, number of
        records, num_negatives, fingerprint) is a ValueError, and so is a position past the
        end of the epoch (when found: at once if past ``len()``, else at the end of the replay)."""
        for key, value in self._settings().items():
            if key in state and state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {key}={value!r}")
        epoch = _check_int("epoch", state.get("epoch"), 0)
        position = _check_int("position", state.get("position"), 0)
        if position > len(self):
            raise ValueError(f"sampler state position {position} is past the {len(self)} batches of epoch {epoch}")
        self.epoch = epoch
        self._start = self._position = position
