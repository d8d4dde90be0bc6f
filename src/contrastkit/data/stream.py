"""Training files larger than memory: one bounded pass that holds out dev and test
queries, counts the training records and samples evaluation distractors.

A file too large to hold cannot be split the way an in-memory one is (shuffle the
distinct queries, cut off shares). :func:`hold_out` makes the same kind of split in one
pass and bounded memory:

- every record's query key (its ``query_id``, else its query text) gets a seeded 64-bit
  hash; the ``num_test + num_dev`` distinct keys with the *smallest* hashes are held
  out: the smallest ``num_test`` as test, the next ``num_dev`` as dev. A heap of that many
  keys (with their records) is all the pass holds, so the split is exact (the same keys a
  sort of all hashes would pick), seeded, and by query: every record of a held-out query
  is held out with it;
- the held-out shares are capped by ``fraction`` of the records as well, so a small file
  keeps most of itself for training: each share holds at most ``max(1, floor(fraction x
  records))`` queries;
- a reservoir sample (Vitter's algorithm R, seeded) of ``num_distractors`` distinct
  documents of the file gives the evaluation corpus its distractors;
- the records that are not held out are counted: the training pass (which reads the file
  again, lazily, each epoch) knows its length, and so does the learning-rate schedule.

Memory: ``O(num_test + num_dev)`` queries' records + ``num_distractors`` documents, whatever
the file's size. The key of a record for :func:`is_held_out` afterwards is
:func:`query_key`.

Example::

    from contrastkit.data import Example
    from contrastkit.data.stream import hold_out, query_key
    records = [Example(f"q{i % 50}", f"d{i}") for i in range(200)]
    split = hold_out(lambda: iter(records), seed=0, num_dev=5, num_test=5, fraction=0.1,
                     num_distractors=20, document_id=lambda text: text)
    assert len(split.test_keys) == 5 and len(split.dev_keys) == 5
    assert split.train_records == 200 - len(split.dev) - len(split.test)
    assert all(query_key(e) in split.test_keys for e in split.test)
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .examples import Example

__all__ = ["HeldOut", "hold_out", "query_key", "key_hash", "Reservoir"]


def query_key(example: Example) -> str:
    """What a record is split by: its ``query_id``, else its query text."""
    return example.query_id if example.query_id is not None else "\x00text:" + example.query


def key_hash(key: str, seed: int) -> int:
    """A seeded 64-bit hash of ``key`` (sha1; the same on every machine and process)."""
    return int.from_bytes(hashlib.sha1(f"{int(seed)}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")


@dataclass
class HeldOut:
    """What :func:`hold_out` found: the held-out records by split, their keys, the
    distractor documents and the count of training records (the rest of the file)."""

    test: List[Example]
    dev: List[Example]
    test_keys: Set[str]
    dev_keys: Set[str]
    distractors: Dict[str, str]
    train_records: int
    records: int
    notes: List[str] = field(default_factory=list)
    train_min_negatives: Optional[int] = None   # the fewest negatives a training record brings (None: no record)

    def is_held_out(self, example: Example) -> bool:
        key = query_key(example)
        return key in self.test_keys or key in self.dev_keys


class Reservoir:
    """A seeded uniform sample of at most ``size`` distinct ids from a stream (Vitter's
    algorithm R): ``offer(id, text)`` for each item, ``items`` the sample (id -> text). An id
    already in the sample is not offered again; one that left it may come back.

    Example::

        from contrastkit.data.stream import Reservoir
        r = Reservoir(3, seed=0)
        for i in range(100):
            r.offer(f"d{i}", f"text {i}")
        assert len(r.items) == 3
    """

    def __init__(self, size: int, seed) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        self.size, self.seen = size, 0
        self.rng = random.Random(f"reservoir:{seed}")
        self.ids: List[str] = []
        self.items: Dict[str, str] = {}

    def offer(self, item_id: str, text: str) -> None:
        if item_id in self.items or self.size == 0:
            return
        self.seen += 1
        if len(self.ids) < self.size:
            self.ids.append(item_id)
            self.items[item_id] = text
            return
        j = self.rng.randrange(self.seen)
        if j < self.size:
            del self.items[self.ids[j]]
            self.ids[j] = item_id
            self.items[item_id] = text


def _documents(example: Example, document_id: Callable[[str], str]) -> Iterable[Tuple[str, str]]:
    ids = list(example.negative_ids) + [None] * (len(example.negatives) - len(example.negative_ids))
    yield example.positive_id or document_id(example.positive), example.positive
    for text, d in zip(example.negatives, ids):
        yield d or document_id(text), text


def hold_out(records: Callable[[], Iterable[Example]], *, seed: int, num_dev: int, num_test: int,
             fraction: float, num_distractors: int, document_id: Callable[[str], str]) -> HeldOut:
    """One pass over ``records()`` (see the module doc).

    Args:
        records: yields the file's examples in order (called once).
        seed: the split's seed (the hash's and the reservoir's).
        num_dev, num_test: the most queries held out as dev / as test.
        fraction: each share also holds at most ``max(1, floor(fraction x records))`` queries.
        num_distractors: documents sampled (distinct ids) for the evaluation corpus.
        document_id: the id of a document text without one (e.g. a hash of the text).
    """
    for name, value in (("num_dev", num_dev), ("num_test", num_test), ("num_distractors", num_distractors)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    cap = num_dev + num_test
    heap: List[Tuple[int, str]] = []      # (-hash, key): the largest kept hash on top
    held: Dict[str, List[Example]] = {}
    reservoir = Reservoir(num_distractors, seed)
    total = 0
    by_negatives: "Counter[int]" = Counter()   # records per negative count (few distinct counts)
    for ex in records():
        total += 1
        by_negatives[len(ex.negatives)] += 1
        key = query_key(ex)
        if key in held:
            held[key].append(ex)
        elif cap:
            h = key_hash(key, seed)
            if len(heap) < cap:
                heapq.heappush(heap, (-h, key))
                held[key] = [ex]
            elif h < -heap[0][0]:
                _, evicted = heapq.heapreplace(heap, (-h, key))
                del held[evicted]
                held[key] = [ex]
        for doc_id, text in _documents(ex, document_id):
            reservoir.offer(doc_id, text)
    share = max(1, int(fraction * total))
    n_test, n_dev = min(num_test, share), min(num_dev, share)
    order = sorted(((-negh, key) for negh, key in heap))
    test_keys = {k for _, k in order[:n_test]}
    dev_keys = {k for _, k in order[n_test:n_test + n_dev]}
    test = [e for k in sorted(test_keys) for e in held[k]]
    dev = [e for k in sorted(dev_keys) for e in held[k]]
    by_negatives.subtract(len(e.negatives) for e in test + dev)
    notes = []
    if len(order) < cap:
        notes.append(f"the file has only {len(order)} distinct queries for {num_test} test + {num_dev} dev")
    return HeldOut(test=test, dev=dev, test_keys=test_keys, dev_keys=dev_keys, distractors=reservoir.items,
                   train_records=total - len(test) - len(dev), records=total, notes=notes,
                   train_min_negatives=min((k for k, n in by_negatives.items() if n > 0), default=None))
