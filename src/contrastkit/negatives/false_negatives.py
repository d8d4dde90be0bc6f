"""In-batch false negatives, left out of the loss's denominator tile by tile.

Two :class:`~contrastkit.engine.TileMask` s for the index-target objectives (InfoNCE,
MNRL with hard-negative columns): the dropped entries of each logit tile are set to
``-inf`` as the engine walks it, so no N x M mask is ever built.

- :class:`DuplicatePositiveMask`: candidate j is dropped for anchor i when it is one of
  anchor i's known positives other than its own positive column (the same document as
  another query's positive, a hard negative that is in fact relevant, several relevant
  documents of one query). Built from ids, stored as the sparse list of dropped pairs.
- :class:`GuideMask`: GISTEmbed's guided filter (Solatorio, "GISTEmbed: Guided In-sample
  Selection of Training Negatives for Text Embedding Fine-tuning", arXiv:2402.16829,
  2024): candidate j is dropped for anchor i when a guide model scores it above the
  positive, ``s_g(i, j) > s_g(i, pos_i) - margin``; the positive itself never is.
  The guide similarities are computed per tile from the guide embeddings.

Example::

    import torch
    import contrastkit as ck
    from contrastkit.negatives import DuplicatePositiveMask, GuideMask
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    # anchors 0 and 2 share their relevant document "a": each one's positive is a false negative for the other
    dup = DuplicatePositiveMask([["a"], ["b"], ["a"], ["c"]], ["a", "b", "a", "c"], torch.arange(4))
    guide = GuideMask(q, d, torch.arange(4), margin=0.0)   # a frozen model's embeddings in practice
    loss = ck.functional.info_nce(q, d, temperature=0.05, masks=[dup, guide])
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.masks import TileMask

__all__ = ["DuplicatePositiveMask", "GuideMask", "mnrl_columns"]


def _positive_index(positive_index, n_rows: int, n_cols: int, owner: str) -> Tensor:
    p = torch.as_tensor(positive_index)
    if p.dim() != 1 or p.shape[0] != n_rows:
        raise ValueError(f"{owner} positive_index must have shape ({n_rows},), got {tuple(p.shape)}")
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"{owner} positive_index must hold integers, got {p.dtype}")
    p = p.long()
    if p.numel() and (int(p.max()) >= n_cols or int(p.min()) < -1):
        raise ValueError(f"{owner} positive_index must lie in [-1, {n_cols}), got range [{int(p.min())}, {int(p.max())}]")
    return p


def mnrl_columns(examples: Sequence, *, key: str = "text") -> List[Optional[Hashable]]:
    """The candidate ids in the column order of the MNRL / InfoNCE-with-hard-negatives
    layout: the batch's positives (N), then its hard negatives negative-major (the h-th
    negatives of all anchors, for h = 0, 1, ...), as
    :func:`contrastkit.functional.multiple_negatives_ranking` lays out an (N, k, d) tensor.
    ``key="text"`` uses the texts, ``key="id"`` the ids (None where missing). Every
    example must have the same number of negatives.

    Example::

        from contrastkit.data import Example
        from contrastkit.negatives import mnrl_columns
        cols = mnrl_columns([Example("q1", "a", ("x",)), Example("q2", "b", ("y",))])
        assert cols == ["a", "b", "x", "y"]        # positives, then negatives
    """
    if key not in ("text", "id"):
        raise ValueError(f"key must be 'text' or 'id', got {key!r}")
    counts = {len(e.negatives) for e in examples}
    if len(counts) > 1:
        raise ValueError(f"examples have different numbers of negatives {sorted(counts)}; the layout needs one")
    k = counts.pop() if counts else 0
    if key == "text":
        cols: List[Optional[Hashable]] = [e.positive for e in examples]
        for h in range(k):
            cols += [e.negatives[h] for e in examples]
        return cols
    cols = [e.positive_id for e in examples]
    for h in range(k):
        cols += [(e.negative_ids[h] if len(e.negative_ids) > h else None) for e in examples]
    return cols


class DuplicatePositiveMask(TileMask):
    """Drop candidate j for anchor i when j is a known positive of i other than i's own
    positive column.

    Args:
        row_group_ids: per anchor row, the ids of its known positives (any hashable:
            document ids or texts). The id of the row's own positive column is always
            added, so a copy of the positive elsewhere in the batch is dropped too.
        col_group_ids: per candidate column, its id (None: unknown, never dropped).
        positive_index: (N,) column of each anchor's positive (-1: none; then only the
            listed ids are dropped).

    Dropped: ``{(i, j) : col_id[j] in row_ids[i] and j != positive_index[i]}``, kept
    as a sparse (row, column) list (so memory is the number of dropped pairs) and
    applied to the tiles it touches.

    Example::

        import torch
        from contrastkit.negatives import DuplicatePositiveMask
        m = DuplicatePositiveMask([["d1"], ["d1"]], ["d1", "d1"], torch.tensor([0, 1]))
        assert m.pairs().tolist() == [[0, 1], [1, 0]]
    """

    def __init__(self, row_group_ids: Sequence[Iterable[Hashable]], col_group_ids: Sequence[Optional[Hashable]],
                 positive_index: Union[Tensor, Sequence[int]]) -> None:
        if isinstance(row_group_ids, (str, bytes)) or isinstance(col_group_ids, (str, bytes)):
            raise ValueError("row_group_ids and col_group_ids must be sequences, not a single string")
        n, m = len(row_group_ids), len(col_group_ids)
        pos = _positive_index(positive_index, n, m, "DuplicatePositiveMask")
        columns_of: Dict[Hashable, List[int]] = {}
        for j, cid in enumerate(col_group_ids):
            if cid is not None:
                columns_of.setdefault(cid, []).append(j)
        rows: List[int] = []
        cols: List[int] = []
        for i, ids in enumerate(row_group_ids):
            if isinstance(ids, (str, bytes)):
                raise ValueError(f"row_group_ids[{i}] must be a collection of ids, got the single string {ids!r}")
            own = int(pos[i])
            wanted = set(ids)
            if own >= 0 and col_group_ids[own] is not None:
                wanted.add(col_group_ids[own])
            hit = sorted({j for cid in wanted for j in columns_of.get(cid, ()) if j != own})
            rows += [i] * len(hit)
            cols += hit
        self.n_rows, self.n_cols = n, m
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.cols = torch.tensor(cols, dtype=torch.long)

    @classmethod
    def from_examples(cls, examples: Sequence, *, key: str = "text",
                      known_positives: Optional[Mapping[Hashable, Iterable[Hashable]]] = None) -> "DuplicatePositiveMask":
        """The mask of a batch of :class:`~contrastkit.data.Example` s in the MNRL layout
        (:func:`mnrl_columns`: positives, then hard negatives negative-major; positive
        of anchor i = column i). Each anchor's known positives are the positives of every
        example of the batch with the same query (``query_id``, else the query text),
        plus ``known_positives[query_id]`` (e.g. from the qrels) when given.

        Example::

            from contrastkit.data import Example
            from contrastkit.negatives import DuplicatePositiveMask
            batch = [Example("q1", "a", ("b",)), Example("q2", "b", ("c",))]
            m = DuplicatePositiveMask.from_examples(batch)     # "b" is q2's positive: q1's negative column 2
            assert m.pairs().tolist() == [[1, 2]]
        """
        cols = mnrl_columns(examples, key=key)
        groups: Dict[Hashable, set] = {}
        qkeys = []
        for e in examples:
            qk = ("id", e.query_id) if e.query_id is not None else ("text", e.query)
            qkeys.append(qk)
            pid = e.positive if key == "text" else e.positive_id
            if pid is not None:
                groups.setdefault(qk, set()).add(pid)
        rows = []
        for e, qk in zip(examples, qkeys):
            ids = set(groups.get(qk, ()))
            if known_positives is not None and e.query_id is not None:
                ids |= set(known_positives.get(e.query_id, ()))
            rows.append(ids)
        return cls(rows, cols, torch.arange(len(examples)))

    def pairs(self) -> Tensor:
        """The dropped (row, column) pairs, (P, 2), sorted by row then column."""
        return torch.stack([self.rows, self.cols], 1)

    def check(self, n_rows, n_cols, device):
        if (n_rows, n_cols) != (self.n_rows, self.n_cols):
            raise ValueError(f"DuplicatePositiveMask was built for {self.n_rows} x {self.n_cols}, "
                             f"the problem is {n_rows} x {n_cols}")
        if self.rows.device != torch.device(device):
            self.rows, self.cols = self.rows.to(device), self.cols.to(device)

    def _select(self, r0, r1, c0, c1) -> Tensor:
        lo = int(torch.searchsorted(self.rows, torch.tensor(r0, device=self.rows.device)))
        hi = int(torch.searchsorted(self.rows, torch.tensor(r1, device=self.rows.device)))
        c = self.cols[lo:hi]
        return torch.nonzero((c >= c0) & (c < c1)).flatten() + lo

    def touches(self, r0, r1, c0, c1):
        return self.rows.numel() > 0 and self._select(r0, r1, c0, c1).numel() > 0

    def apply_(self, x, r0, r1, c0, c1):
        sel = self._select(r0, r1, c0, c1)
        if sel.numel():
            x[(self.rows[sel] - r0).to(x.device), (self.cols[sel] - c0).to(x.device)] = float("-inf")

    def __repr__(self):
        return f"DuplicatePositiveMask({self.n_rows} x {self.n_cols}, {self.rows.numel()} dropped)"


class GuideMask(TileMask):
    """GISTEmbed's guided false-negative filter, per tile.

    Drops candidate j for anchor i when ``s_g(i, j) > s_g(i, pos_i) - margin``, with
    ``s_g`` the guide model's similarity (cosine by default) of ``guide_anchors[i]`` and
    ``guide_candidates[j]``; the positive column itself is never dropped, and a row with
    ``positive_index = -1`` drops nothing. Solatorio, "GISTEmbed: Guided In-sample
    Selection of Training Negatives for Text Embedding Fine-tuning", arXiv:2402.16829
    (2024); sentence-transformers' GISTEmbedLoss with its absolute margin strategy.

    Args:
        guide_anchors: (N, g) guide embeddings of the anchors (detached; e.g. the frozen
            base model's).
        guide_candidates: (M, g) guide embeddings of the candidates, in the loss's column order.
        positive_index: (N,) column of each anchor's positive.
        margin: how far below the positive's guide score a candidate may be and still be
            dropped (0: only candidates the guide prefers to the positive).
        similarity: ``"cosine"`` (L2-normalise the guide embeddings) or ``"dot"``.

    Each tile computes its ``(rows, cols)`` block of guide scores (one extra small
    matmul of width g); nothing N x M is kept. Scores are compared in float32 (float64
    for float64 guides); an exact tie with the positive is not dropped (strict ``>``).

    Example::

        import torch
        from contrastkit.negatives import GuideMask
        g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        c = torch.tensor([[0.6, 0.8], [1.0, 0.1]])     # anchor i's positive is column i
        m = GuideMask(g, c, torch.tensor([0, 1]))
        # the guide scores each anchor's other column above its positive: both are dropped
        assert m.dense().tolist() == [[False, True], [True, False]]
    """

    def __init__(self, guide_anchors: Tensor, guide_candidates: Tensor, positive_index: Union[Tensor, Sequence[int]],
                 *, margin: float = 0.0, similarity: str = "cosine") -> None:
        for name, t in (("guide_anchors", guide_anchors), ("guide_candidates", guide_candidates)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"GuideMask {name} must be a 2-D float tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"GuideMask {name} has non-finite values")
        if guide_anchors.shape[1] != guide_candidates.shape[1]:
            raise ValueError(f"GuideMask guide_anchors have dimension {guide_anchors.shape[1]} but guide_candidates "
                             f"{guide_candidates.shape[1]}")
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"GuideMask similarity must be 'cosine' or 'dot', got {similarity!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
            raise ValueError(f"GuideMask margin must be a number, got {margin!r}")
        n, m = guide_anchors.shape[0], guide_candidates.shape[0]
        pos = _positive_index(positive_index, n, m, "GuideMask").to(guide_anchors.device)
        dtype = torch.float64 if torch.float64 in (guide_anchors.dtype, guide_candidates.dtype) else torch.float32
        a = guide_anchors.detach().to(dtype)
        c = guide_candidates.detach().to(device=a.device, dtype=dtype)
        if similarity == "cosine":
            a, c = F.normalize(a, dim=1), F.normalize(c, dim=1)
        has = pos >= 0
        pos_score = torch.full((n,), float("inf"), dtype=dtype, device=a.device)
        if bool(has.any()):
            pos_score[has] = (a[has] * c[pos[has]]).sum(1)
        self.anchors, self.candidates, self.positive_index = a, c, pos
        self.threshold = pos_score - float(margin)  # drop s > threshold
        self.margin, self.similarity = float(margin), similarity

    def check(self, n_rows, n_cols, device):
        if (n_rows, n_cols) != (self.anchors.shape[0], self.candidates.shape[0]):
            raise ValueError(f"GuideMask was built for {self.anchors.shape[0]} x {self.candidates.shape[0]}, "
                             f"the problem is {n_rows} x {n_cols}")
        device = torch.device(device)
        if self.anchors.device != device:
            self.anchors, self.candidates = self.anchors.to(device), self.candidates.to(device)
            self.threshold, self.positive_index = self.threshold.to(device), self.positive_index.to(device)

    def tile(self, r0, r1, c0, c1) -> Tensor:
        """The boolean drop mask of rows [r0, r1) x columns [c0, c1)."""
        s = self.anchors[r0:r1] @ self.candidates[c0:c1].T
        drop = s > self.threshold[r0:r1, None]
        p = self.positive_index[r0:r1] - c0
        inside = (p >= 0) & (p < c1 - c0) & (self.positive_index[r0:r1] >= 0)
        if bool(inside.any()):
            rows = torch.nonzero(inside).flatten()
            drop[rows, p[rows]] = False
        return drop

    def apply_(self, x, r0, r1, c0, c1):
        x.masked_fill_(self.tile(r0, r1, c0, c1).to(x.device), float("-inf"))

    def dense(self) -> Tensor:
        """The whole N x M drop mask (for inspection and tests on small problems only)."""
        return self.tile(0, self.anchors.shape[0], 0, self.candidates.shape[0])

    def __repr__(self):
        return (f"GuideMask({self.anchors.shape[0]} x {self.candidates.shape[0]}, margin={self.margin}, "
                f"similarity={self.similarity!r})")
