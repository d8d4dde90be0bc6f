"""Training examples: (query, positive, negatives...) records, a dev split by query, and
corpus-only pairs by independent cropping.

- :class:`Example`: one (query, positive[, negatives]) record with optional ids and the
  ``"file:line"`` it came from.
- :class:`BadRecords`: a counter of skipped malformed records (``skip_bad_records=True``).
- :func:`split_dev`: a seeded train / dev split in which every query lies on one side.
- :func:`independent_crops`: Contriever's unsupervised pairs from a corpus alone.

Example::

    from contrastkit.data import Example, split_dev
    ex = [Example(f"q{i}", f"d{i}", query_id=f"q{i}") for i in range(10)]
    train, dev = split_dev(ex, fraction=0.2, seed=0)
    assert len(train) == 8 and len(dev) == 2
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Hashable, List, Optional, Sequence, Tuple, TypeVar, Union

__all__ = ["Example", "BadRecords", "split_dev", "independent_crops"]


@dataclass(frozen=True)
class Example:
    """One training record: a query, its positive and any number of hard negatives.

    ``negatives`` is a tuple of texts (empty for pairs, one for triplets, n for
    n-tuples); ``query_id`` / ``positive_id`` / ``negative_ids`` are the ids of those
    texts when the source has them (BEIR, mined files), else None / empty; ``source``
    is where the record was read (``"path:line"``, ``"path:row 3"`` for parquet,
    ``"document 5"`` for crops).

    Example::

        from contrastkit.data import Example
        Example("what is x?", "x is ...", negatives=("y is ...",))
    """

    query: str
    positive: str
    negatives: Tuple[str, ...] = ()
    query_id: Optional[str] = None
    positive_id: Optional[str] = None
    negative_ids: Tuple = ()
    source: Optional[str] = None

    def texts(self) -> Tuple[str, ...]:
        """All texts of the record: ``(query, positive, *negatives)``."""
        return (self.query, self.positive, *self.negatives)

    def negative_set(self, num_negatives: int, epoch: int) -> "Example":
        """The record as trained on in ``epoch`` when its negatives are a pool of sets of
        ``num_negatives`` (``negatives.pool_size``): set ``g = epoch mod (len(negatives) //
        num_negatives)``, i.e. negatives (and ids) ``[g*h, (g+1)*h)``. A record holding
        exactly ``num_negatives`` is returned as it is.

        Example::

            from contrastkit.data import Example
            e = Example("q", "p", negatives=("a", "b", "c", "d"))
            assert e.negative_set(2, 1).negatives == ("c", "d")
            assert e.negative_set(2, 2).negatives == ("a", "b")
        """
        h, n = int(num_negatives), len(self.negatives)
        if h < 1 or n < h or n % h:
            raise ValueError(f"example {self.source or self.query_id or self.query[:40]!r} holds {n} negatives: "
                             f"a pool needs a positive multiple of num_negatives={num_negatives}")
        if n == h:
            return self
        g = int(epoch) % (n // h)
        ids = self.negative_ids[g * h:(g + 1) * h] if self.negative_ids else ()
        return dataclasses.replace(self, negatives=self.negatives[g * h:(g + 1) * h], negative_ids=ids)


@dataclass
class BadRecords:
    """Count of malformed records skipped by a reader with ``skip_bad_records=True``.

    ``count`` is the number skipped; ``reasons`` the messages of the first
    ``max_reasons`` (each names the file and line, as the ValueError would).

    Example::

        from contrastkit.data import BadRecords
        stats = BadRecords()
        # examples = list(read_examples("pairs.jsonl", skip_bad_records=True, stats=stats))
        print(stats)            # "0 bad records skipped"
    """

    count: int = 0
    reasons: List[str] = field(default_factory=list)
    max_reasons: int = 10

    def add(self, reason: str) -> None:
        """Record one skipped record and (for the first few) why."""
        self.count += 1
        if len(self.reasons) < self.max_reasons:
            self.reasons.append(str(reason))

    def __str__(self) -> str:
        head = f"{self.count} bad record{'s' if self.count != 1 else ''} skipped"
        if not self.reasons:
            return head
        more = "" if self.count <= len(self.reasons) else f"\n  ... and {self.count - len(self.reasons)} more"
        return head + ":\n  " + "\n  ".join(self.reasons) + more


T = TypeVar("T")


def _query_key(item) -> Hashable:
    if isinstance(item, Example):
        return ("id", item.query_id) if item.query_id is not None else ("text", item.query)
    if isinstance(item, (str, int)):
        return item
    raise ValueError(f"split_dev takes Examples or query ids (str / int), got {type(item).__name__}")


def split_dev(examples_or_query_ids: Sequence[T], *, fraction: float = 0.1, seed: int = 0) -> Tuple[List[T], List[T]]:
    """Split examples (or query ids) into ``(train, dev)`` BY QUERY, seeded.

    Every example of one query lands on the same side, so no dev query is seen in
    training. Queries are keyed by ``query_id`` (the query text when the id is None);
    plain strings / ints are their own key. The distinct keys are sorted, shuffled with
    ``random.Random(seed)`` and the first ``max(1, round(fraction * n_queries))`` go to
    dev (at least one query stays in train). Both sides keep the input order. The split
    depends only on the set of queries and the seed, not on the order of the input.

    Raises ValueError for a fraction outside (0, 1) or fewer than two distinct queries.

    Example::

        from contrastkit.data import split_dev
        train, dev = split_dev(["q1", "q2", "q3", "q4"], fraction=0.25, seed=1)
        assert len(train) == 3 and len(dev) == 1
    """
    if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction!r}")
    items = list(examples_or_query_ids)
    keys = [_query_key(x) for x in items]
    distinct = sorted(set(keys), key=repr)
    if len(distinct) < 2:
        raise ValueError(f"split_dev needs at least 2 distinct queries, got {len(distinct)}")
    n_dev = min(len(distinct) - 1, max(1, int(round(float(fraction) * len(distinct)))))
    order = list(distinct)
    random.Random(seed).shuffle(order)
    dev_keys = set(order[:n_dev])
    train = [x for x, k in zip(items, keys) if k not in dev_keys]
    dev = [x for x, k in zip(items, keys) if k in dev_keys]
    return train, dev


def independent_crops(documents: Sequence[str], *, min_ratio: float = 0.1, max_ratio: float = 0.5,
                      seed: Union[int, str] = 0, ids: Optional[Sequence[Union[str, int]]] = None, min_words: int = 2,
                      pairs_per_document: int = 1) -> List[Example]:
    """Unsupervised (query, positive) pairs from a corpus alone: two independent random
    crops of the same document (Contriever's "independent cropping").

    Izacard et al., "Unsupervised Dense Information Retrieval with Contrastive Learning",
    TMLR 2022, arXiv:2112.09118. For a document of ``n`` words (whitespace split), each
    of the two spans independently draws a length ``max(1, round(r * n))`` with
    ``r ~ U[min_ratio, max_ratio]`` and a uniform start; the spans may overlap (the paper
    notes overlap is what makes the pairs learnable). Words are re-joined with single
    spaces. Documents with fewer than ``min_words`` words are skipped. Seeded (an int or a
    string, as ``random.Random`` takes): the same
    documents and seed give the same pairs. ``query_id`` and ``positive_id`` are the
    document's id (``ids[i]``, default its index), so :func:`split_dev` keeps the pairs
    of one document on one side.

    Example::

        from contrastkit.data import independent_crops
        pairs = independent_crops(["a b c d e f g h i j", "k l m n o p q r"], seed=0)
        assert len(pairs) == 2 and set(pairs[0].query.split()) <= set("abcdefghij")
    """
    if not 0.0 < float(min_ratio) <= float(max_ratio) <= 1.0:
        raise ValueError(f"need 0 < min_ratio <= max_ratio <= 1, got min_ratio={min_ratio!r}, max_ratio={max_ratio!r}")
    if int(min_words) < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words!r}")
    if int(pairs_per_document) < 1:
        raise ValueError(f"pairs_per_document must be >= 1, got {pairs_per_document!r}")
    if isinstance(documents, str):
        raise ValueError("independent_crops takes a sequence of documents, got a single str")
    docs = list(documents)
    if ids is not None and len(ids) != len(docs):
        raise ValueError(f"ids has {len(ids)} entries for {len(docs)} documents")
    rng = random.Random(seed)
    out: List[Example] = []

    def crop(words: List[str]) -> str:
        n = len(words)
        length = max(1, min(n, int(round(rng.uniform(min_ratio, max_ratio) * n))))
        start = rng.randrange(0, n - length + 1)
        return " ".join(words[start:start + length])

    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"documents[{i}] is {type(doc).__name__}, not str")
        words = doc.split()
        if len(words) < min_words:
            continue
        doc_id = str(ids[i]) if ids is not None else str(i)
        for _ in range(int(pairs_per_document)):
            q, p = crop(words), crop(words)
            out.append(Example(q, p, query_id=doc_id, positive_id=doc_id, source=f"document {i}"))
    return out
