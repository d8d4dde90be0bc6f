"""Batch samplers for in-batch negatives: no repeated texts, or clusters of mutual hard negatives.

Both are ``torch.utils.data.Sampler`` s of index lists (pass them as ``batch_sampler=``
to a DataLoader), deterministic from ``(seed, epoch)``:

- ``set_epoch(e)`` selects the epoch (as ``DistributedSampler`` does);
- ``state_dict()`` / ``load_state_dict()`` save and restore the epoch and the number of
  batches already consumed, so a resumed run iterates exactly the remaining batches of
  the interrupted epoch (``remaining()`` lists them), then continues as usual.

:class:`NoDuplicatesBatchSampler`: sentence-transformers' NoDuplicatesBatchSampler
semantics. :class:`B3BatchSampler`: B3 batch mining (Thirukovalluru et al., "Breaking
the Batch Barrier (B3) of Contrastive Learning via Smart Batch Mining", NeurIPS 2025,
arXiv:2505.11293): a teacher's sparse kNN graph partitioned with METIS into clusters of
mutual hard negatives, several clusters per batch.

Example::

    from contrastkit.data import Example
    from contrastkit.negatives import NoDuplicatesBatchSampler
    ex = [Example(f"q{i}", f"d{i % 5}") for i in range(20)]
    sampler = NoDuplicatesBatchSampler(ex, 4, seed=0)
    for batch in sampler:
        assert len({ex[i].positive for i in batch}) == len(batch)
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["RandomBatchSampler", "NoDuplicatesBatchSampler", "B3BatchSampler"]


def _texts(example) -> Tuple[str, ...]:
    if hasattr(example, "texts"):
        return tuple(example.texts())
    if isinstance(example, str):
        return (example,)
    return tuple(example)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _EpochBatchSampler(Sampler):
    """Shared epoch / resume logic: subclasses implement ``_make_batches(epoch)``."""

    kind = "base"

    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_last: bool) -> None:
        self.num_examples = int(num_examples)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._start = 0      # first batch of the next iteration (set by load_state_dict)
        self._position = 0   # batches handed out in the current epoch
        self._cache: Optional[Tuple[int, List[List[int]]]] = None

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch)])

    def _make_batches(self, epoch: int) -> List[List[int]]:
        raise NotImplementedError

    def batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        """All batches of ``epoch`` (default the current one), in order."""
        e = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, self._make_batches(e))
        return [list(b) for b in self._cache[1]]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (and restart it)."""
        self.epoch = _check_int("epoch", epoch, 0)
        self._start = self._position = 0

    def __iter__(self):
        batches = self.batches()
        start, self._start = self._start, 0
        self._position = start
        for b in batches[start:]:
            self._position += 1
            yield b

    def __len__(self) -> int:
        """Number of batches in the current epoch (all of them, not only the remaining)."""
        return len(self.batches())

    def remaining(self) -> List[List[int]]:
        """The batches the next iteration will yield (after a ``load_state_dict``: the rest of the epoch)."""
        return self.batches()[self._start:]

    def _fingerprint(self) -> str:
        return ""

    def state_dict(self, batches_done: Optional[int] = None) -> Dict[str, object]:
        """``{"kind", "epoch", "position", "seed", "batch_size", "drop_last", "num_examples", "fingerprint"}``.

        ``position`` is the number of batches of this epoch already used: by default the
        number this sampler's iterator has handed out; a loop whose DataLoader prefetches
        batches (workers) should pass its own count as ``batches_done``.
        """
        pos = self._position if batches_done is None else _check_int("batches_done", batches_done, 0)
        return {"kind": self.kind, "epoch": self.epoch, "position": int(pos), "seed": self.seed,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "num_examples": self.num_examples,
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore a :meth:`state_dict`: the next iteration yields the remaining batches of
        that epoch. A state from a sampler over other data or with other settings is a ValueError."""
        mine = {"kind": self.kind, "seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "num_examples": self.num_examples, "fingerprint": self._fingerprint()}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {key}={value!r}")
        epoch = _check_int("epoch", state.get("epoch"), 0)
        position = _check_int("position", state.get("position"), 0)
        self.epoch = epoch
        n = len(self.batches())
        if position > n:
            raise ValueError(f"sampler state position {position} is past the {n} batches of epoch {epoch}")
        self._start = self._position = position


class RandomBatchSampler(_EpochBatchSampler):
    """Seeded shuffled batches of ``batch_size`` indices, no duplicate filtering; the last
    incomplete batch is dropped. Resumable like every sampler here (``state_dict`` /
    ``load_state_dict``, ``set_epoch``).

    Example::

        from contrastkit.negatives.samplers import RandomBatchSampler
        s = RandomBatchSampler(10, 4, seed=0)
        assert len(s) == 2 and sum(len(b) for b in s) == 8
    """

    kind = "random"

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0) -> None:
        super().__init__(num_examples, batch_size, seed, drop_last=True)

    def _make_batches(self, epoch: int) -> List[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + int(epoch))
        order = torch.randperm(self.num_examples, generator=g).tolist()
        bs = self.batch_size
        return [order[i:i + bs] for i in range(0, self.num_examples - bs + 1, bs)]


class NoDuplicatesBatchSampler(_EpochBatchSampler):
    """Batches in which no text (query, positive or negative) appears twice.

    sentence-transformers' NoDuplicatesBatchSampler semantics: the examples are shuffled
    (seeded by ``(seed, epoch)``); each batch is filled by scanning the remaining
    examples in that order and taking every one that shares no text with the batch so
    far; skipped examples stay first in line for the next batch. So every example is in
    exactly one batch per epoch; an example that cannot be placed in a full batch (its
    text collides with too many others, e.g. many queries with the same positive) ends
    up in one of the smaller batches formed at the end of the epoch, which
    ``drop_last=True`` leaves out (those examples then skip this epoch). An example
    whose own texts repeat (query == positive) is still placed.

    Args:
        examples: :class:`~contrastkit.data.Example` s (or tuples of texts).
        batch_size: examples per batch.
        seed, drop_last: as above.
        num_negatives: examples holding a pool of negative sets are compared, in epoch e,
            by the texts of :meth:`Example.negative_set` ``(num_negatives, e)``: the set
            trained on then (None: all their texts).

    Example::

        from contrastkit.data import Example
        from contrastkit.negatives import NoDuplicatesBatchSampler
        ex = [Example(f"q{i}", f"d{i % 3}") for i in range(9)]
        s = NoDuplicatesBatchSampler(ex, 3, seed=1)
        assert sorted(i for b in s for i in b) == list(range(9))
    """

    kind = "no_duplicates"

    def __init__(self, examples: Sequence, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 num_negatives: Optional[int] = None) -> None:
        super().__init__(len(examples), batch_size, seed, drop_last)
        # texts -> small ints, so the per-batch work is on int sets: once, or per epoch when
        # some example holds a pool of negative sets (the epoch decides which set is trained on)
        pooled = bool(num_negatives) and any(len(getattr(e, "negatives", ())) > int(num_negatives)
                                             for e in examples)
        self._examples, self._num_negatives = examples, (int(num_negatives) if pooled else None)
        self._keys = None if pooled else self._text_keys(examples)
        h = hashlib.sha1()
        for e in examples:
            h.update("\x00".join(_texts(e)).encode("utf-8", "surrogatepass") + b"\x01")
        self._hash = h.hexdigest()[:16]

    @staticmethod
    def _text_keys(examples: Sequence) -> List[frozenset]:
        vocab: Dict[str, int] = {}
        return [frozenset(vocab.setdefault(t, len(vocab)) for t in _texts(e)) for e in examples]

    def _fingerprint(self) -> str:
        return self._hash

    def _make_batches(self, epoch: int) -> List[List[int]]:
        order = self._rng(epoch).permutation(self.num_examples).tolist()
        remaining = dict.fromkeys(order)
        out: List[List[int]] = []
        bs = self.batch_size
        epoch_keys = self._keys if self._keys is not None else self._text_keys(
            [e.negative_set(self._num_negatives, epoch) for e in self._examples])
        while remaining:
            batch: List[int] = []
            seen: set = set()
            for idx in remaining:
                keys = epoch_keys[idx]
                if keys & seen:
                    continue
                batch.append(idx)
                seen |= keys
                if len(batch) == bs:
                    break
            for idx in batch:
                del remaining[idx]
            if len(batch) == bs or not self.drop_last:
                out.append(batch)
        return out


class B3BatchSampler(_EpochBatchSampler):
    """B3 batch mining: batches made of clusters of mutual hard negatives.

    Thirukovalluru, Meng, Liu, K, Su, Nie, Yavuz, Zhou, Chen, Dhingra, "Breaking the
    Batch Barrier (B3) of Contrastive Learning via Smart Batch Mining", NeurIPS 2025,
    arXiv:2505.11293. Built once from a teacher's embeddings:

    1. rank the examples for each example ``i`` by the teacher score
       ``s(i, j) = <query_i, target_j>`` (``target`` = the positives' embeddings, or the
       queries' when not given), ``j != i``, exactly (:func:`contrastkit.search.exact_topk`);
    2. connect ``i`` to the examples at ranks ``rank_window = (p, p + m)`` (skipping the
       ``p`` closest, likely false negatives) and make the graph undirected;
    3. partition it with METIS (``pymetis.part_graph``, balanced) into
       ``ceil(N / cluster_size)`` clusters: each a community of mutual hard negatives.

    Each epoch (seeded by ``(seed, epoch)``) shuffles the clusters and the members within
    each, concatenates them and cuts the sequence into batches of ``batch_size``, so a
    batch holds about ``batch_size / cluster_size`` whole clusters (the paper's |B|/K
    communities per batch). Every example is in exactly one batch per epoch (the last
    batch may be smaller; ``drop_last`` leaves it out). Batches may hold repeated
    texts (e.g. two queries with the same positive): mask them in the loss with
    :class:`~contrastkit.negatives.DuplicatePositiveMask`.

    Args:
        examples: the training examples (their number fixes the graph size).
        batch_size: examples per batch.
        query_embeddings: (N, d) teacher embeddings of the queries (L2-normalised for cosine).
        target_embeddings: (N, d) teacher embeddings of the positives (default: the queries').
        rank_window: ``(p, p + m)`` ranks linked in the graph (default (2, 12)).
        cluster_size: target examples per cluster (default ``max(2, batch_size // 4)``, 4
            clusters per batch).
        seed, drop_last: as above. ``seed`` also seeds METIS.

    Attributes: ``clusters`` (N,) the cluster of every example, ``num_clusters``, ``edge_cut``.

    Example::

        import torch
        from contrastkit.negatives import B3BatchSampler
        emb = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
        s = B3BatchSampler(list(range(64)), 16, query_embeddings=emb, cluster_size=4, rank_window=(1, 6))
        assert sorted(i for b in s for i in b) == list(range(64))
    """

    kind = "b3"

    def __init__(self, examples: Sequence, batch_size: int, *, query_embeddings: Tensor,
                 target_embeddings: Optional[Tensor] = None, rank_window: Tuple[int, int] = (2, 12),
                 cluster_size: Optional[int] = None, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(len(examples), batch_size, seed, drop_last)
        n = self.num_examples
        if not isinstance(query_embeddings, Tensor) or query_embeddings.dim() != 2 or query_embeddings.shape[0] != n:
            raise ValueError(f"query_embeddings must be ({n}, d) for {n} examples, got "
                             f"{tuple(query_embeddings.shape) if isinstance(query_embeddings, Tensor) else query_embeddings!r}")
        target = query_embeddings if target_embeddings is None else target_embeddings
        if not isinstance(target, Tensor) or tuple(target.shape) != tuple(query_embeddings.shape):
            raise ValueError(f"target_embeddings must have the queries' shape {tuple(query_embeddings.shape)}, got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else target!r}")
        if not isinstance(rank_window, (tuple, list)) or len(rank_window) != 2:
            raise ValueError(f"rank_window must be (p, p + m), got {rank_window!r}")
        p = _check_int("rank_window start", rank_window[0], 0)
        stop = _check_int("rank_window stop", rank_window[1], 1)
        if stop <= p:
            raise ValueError(f"rank_window {tuple(rank_window)} is empty: need start < stop")
        self.cluster_size = (max(2, self.batch_size // 4) if cluster_size is None
                             else _check_int("cluster_size", cluster_size, 1))
        self.rank_window = (p, stop)
        self.num_clusters = max(1, min(n, math.ceil(n / self.cluster_size))) if n else 0
        self.clusters, self.edge_cut = self._partition(query_embeddings, target)
        self._members = [np.flatnonzero(self.clusters == c).tolist() for c in range(self.num_clusters)]
        self._hash = hashlib.sha1(self.clusters.astype(np.int64).tobytes()).hexdigest()[:16]

    def _graph(self, queries: Tensor, targets: Tensor) -> Tuple[np.ndarray, np.ndarray]:
        from ..search import exact_topk  # search sits beside negatives; imported on use

        n = self.num_examples
        p, stop = self.rank_window
        k = min(stop, n - 1)
        neigh: List[set] = [set() for _ in range(n)]
        if k > p:
            _, idx = exact_topk(queries, targets, k, exclude=[[i] for i in range(n)])
            idx = idx[:, p:k].cpu().numpy()
            for i in range(n):
                for j in idx[i]:
                    if j >= 0 and j != i:
                        neigh[i].add(int(j))
                        neigh[int(j)].add(i)
        xadj = np.zeros(n + 1, dtype=np.int64)
        adj: List[int] = []
        for i in range(n):
            row = sorted(neigh[i])
            adj += row
            xadj[i + 1] = xadj[i] + len(row)
        return xadj, np.asarray(adj, dtype=np.int64)

    def _partition(self, queries: Tensor, targets: Tensor) -> Tuple[np.ndarray, int]:
        n = self.num_examples
        if self.num_clusters <= 1:
            return np.zeros(n, dtype=np.int64), 0
        xadj, adjncy = self._graph(queries.detach(), targets.detach())
        import pymetis

        opts = pymetis.Options(seed=int(self.seed) % (2 ** 31 - 1))
        if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2
            graph = {"adjacency": pymetis.CSRAdjacency(xadj.tolist(), adjncy.tolist())}
        else:
            graph = {"xadj": xadj.tolist(), "adjncy": adjncy.tolist()}
        cut, membership = pymetis.part_graph(self.num_clusters, **graph, options=opts)
        membership = np.asarray(membership, dtype=np.int64)
        # METIS may leave a part empty on tiny or disconnected graphs: renumber densely
        _, membership = np.unique(membership, return_inverse=True)
        self.num_clusters = int(membership.max()) + 1 if n else 0
        return membership.astype(np.int64), int(cut)

    def _fingerprint(self) -> str:
        return self._hash

    def _make_batches(self, epoch: int) -> List[List[int]]:
        rng = self._rng(epoch)
        order: List[int] = []
        for c in rng.permutation(self.num_clusters).tolist():
            members = self._members[c]
            order += [members[i] for i in rng.permutation(len(members)).tolist()]
        bs = self.batch_size
        out = [order[i:i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and out and len(out[-1]) < bs:
            out.pop()
        return out
