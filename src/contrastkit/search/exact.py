"""Exact maximum-inner-product top-k in bounded memory.

The corpus is walked in blocks of ``block_size`` rows (and the queries in blocks of
rows chosen so that one score tile stays near 16 M entries); a running top-k per
query is merged with each block's candidates, so no ``Q x C`` score matrix is ever
built. Used by evaluation (rank the whole corpus) and by hard-negative mining.

Example::

    import torch
    from contrastkit.search import exact_topk
    q, c = torch.randn(4, 8), torch.randn(1000, 8)
    scores, idx = exact_topk(q, c, 10)          # (4, 10) float32, (4, 10) long
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["exact_topk", "check_search_inputs"]

# Score-tile budget (entries) used to pick the query block when the caller gives none.
_TILE_ENTRIES = 1 << 24
_DEFAULT_BLOCK = 65536


_CHECK_ENTRIES = 1 << 22  # entries per block of the finiteness check (32 MiB as float64)


def check_search_inputs(queries: Tensor, corpus: Tensor, k: int) -> None:
    """Shared argument checks of the search functions (a ValueError naming the problem)."""
    if not isinstance(queries, Tensor) or not isinstance(corpus, Tensor):
        raise ValueError(f"queries and corpus must be torch tensors, got {type(queries).__name__} "
                         f"and {type(corpus).__name__}")
    if queries.dim() != 2 or corpus.dim() != 2:
        raise ValueError(f"queries must be (Q, d) and corpus (C, d), got shapes {tuple(queries.shape)} "
                         f"and {tuple(corpus.shape)}")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but corpus rows have {corpus.shape[1]}")
    if not queries.is_floating_point() or not corpus.is_floating_point():
        raise ValueError(f"queries and corpus must be floating point, got {queries.dtype} and {corpus.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, t in (("queries", queries), ("corpus", corpus)):
        # a float64 sum is finite exactly when every entry is (NaN / inf propagate; finite
        # float32 / bf16 values cannot overflow float64); summed in row blocks, since the sum
        # casts its input to float64 (a whole-corpus sum held 2x the corpus); the slow scan
        # only names the row
        rows = max(1, _CHECK_ENTRIES // max(1, t.shape[1]))
        for r0 in range(0, t.shape[0], rows):
            block = t[r0:r0 + rows]
            if block.numel() and not bool(torch.isfinite(block.sum(dtype=torch.float64))):
                bad = (~torch.isfinite(block)).any(1).nonzero()
                if bad.numel():  # else: huge finite float64 values overflowed the sum; nothing wrong
                    raise ValueError(f"{name} row {r0 + int(bad[0, 0])} has a non-finite value (nan or inf)")


def _exclusion_pairs(exclude: Optional[Sequence[Sequence[int]]], n_queries: int, n_corpus: int,
                     device: torch.device) -> Optional[Tuple[Tensor, Tensor]]:
    """``exclude`` as flat (row, col) long tensors sorted by col (None when empty)."""
    if exclude is None:
        return None
    if len(exclude) != n_queries:
        raise ValueError(f"exclude must have one list per query ({n_queries}), got {len(exclude)}")
    rows: List[int] = []
    cols: List[int] = []
    for i, ex in enumerate(exclude):
        for j in ex:
            j = int(j)
            if not 0 <= j < n_corpus:
                raise ValueError(f"exclude[{i}] contains corpus index {j}, outside [0, {n_corpus})")
            rows.append(i)
            cols.append(j)
    if not rows:
        return None
    r = torch.tensor(rows, dtype=torch.long, device=device)
    c = torch.tensor(cols, dtype=torch.long, device=device)
    order = torch.argsort(c, stable=True)
    return r[order], c[order]


def _block_topk(s: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` columns of each row of ``s``, ties at the k-th value resolved towards the lower
    column; returned ordered by increasing column (so a later stable sort keeps that rule).

    One ``topk(k + 1)`` finds the selection and whether it is ambiguous: the (k+1)-th largest
    value equals the k-th exactly when some unselected element ties with the boundary. Only
    those rows are redone (everything above the boundary, then the lowest-index ties)."""
    n, w = s.shape
    if w <= k:
        return s, torch.arange(w, device=s.device).expand(n, w)
    vals, pos = s.topk(k + 1, dim=1, sorted=False)
    two, where = vals.topk(2, dim=1, largest=False)  # (k+1)-th and k-th largest, ascending
    keep = torch.ones_like(vals, dtype=torch.bool).scatter_(1, where[:, :1], False)
    pos = pos[keep].view(n, k)
    tied = (two[:, 0] == two[:, 1]).nonzero().squeeze(1)
    if tied.numel():
        st = s[tied]
        kth = two[tied, 1:2]
        above = st > kth
        at = st == kth
        need = k - above.sum(1, keepdim=True)
        chosen = above | (at & (at.cumsum(1) <= need))
        pos[tied] = chosen.nonzero()[:, 1].view(-1, k)  # row-major: ascending columns
    pos, _ = pos.sort(dim=1)
    return s.gather(1, pos), pos


@torch.no_grad()
def exact_topk(queries: Tensor, corpus: Tensor, k: int, *, block_size: Optional[int] = None,
               exclude: Optional[Sequence[Sequence[int]]] = None, query_block_size: Optional[int] = None,
               progress: bool = False) -> Tuple[Tensor, Tensor]:
    """The ``k`` corpus rows with the largest dot product ``<q_i, c_j>`` for every query, exactly.

    ``scores[i, r] = <queries[i], corpus[indices[i, r]]>``, with ``scores[i]`` non-increasing
    and equal scores ordered by the lower corpus index first (a total order, so the result
    does not depend on ``block_size``). For L2-normalised embeddings the dot product is the
    cosine similarity.

    Rules:
        - ``k`` is clipped to the corpus size: the result has ``min(k, C)`` columns.
        - ``exclude[i]`` lists corpus indices that query ``i`` must not retrieve (e.g. the
          query's own document, or its positives when mining negatives). Where fewer than
          ``min(k, C)`` candidates remain, the missing tail holds index ``-1`` and score ``-inf``.
        - Any float dtype is accepted; scores are accumulated in float32 (float64 inputs in
          float64) and returned as float32. Non-finite inputs are a ValueError naming the row.
        - Memory is bounded by one ``query_block x block_size`` score tile plus the running
          top-k; the corpus may live on another device than the queries (its blocks are moved
          to the queries' device one at a time, e.g. a CPU corpus searched on a GPU).

    Args:
        queries: ``(Q, d)`` query embeddings.
        corpus: ``(C, d)`` corpus embeddings.
        k: number of results per query (positive int).
        block_size: corpus rows per block (default 65,536).
        exclude: one list of corpus indices per query, or None.
        query_block_size: query rows per block (default: about 16 M score entries per tile).
        progress: show a tqdm bar over corpus blocks.

    Returns:
        ``(scores (Q, min(k, C)) float32, indices (Q, min(k, C)) long)`` on the queries' device.

    Example::

        >>> import torch
        >>> from contrastkit.search import exact_topk
        >>> q = torch.tensor([[1.0, 0.0]]); c = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.0, 0.0]])
        >>> exact_topk(q, c, 2)[1].tolist()       # tie between rows 1 and 2: lower index first
        [[1, 2]]
    """
    check_search_inputs(queries, corpus, k)
    return exact_topk_checked(queries, corpus, k, block_size=block_size, exclude=exclude,
                              query_block_size=query_block_size, progress=progress)


def exact_topk_checked(queries: Tensor, corpus: Tensor, k: int, *, block_size: Optional[int] = None,
                       exclude: Optional[Sequence[Sequence[int]]] = None, query_block_size: Optional[int] = None,
                       progress: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`exact_topk` for inputs :func:`check_search_inputs` has already passed (it scans
    every entry for NaN / inf: callers that search one corpus block by block check it once)."""
    n_q, n_c = queries.shape[0], corpus.shape[0]
    device = queries.device
    k_eff = min(k, n_c)
    if block_size is None:
        block_size = _DEFAULT_BLOCK
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if query_block_size is None:
        query_block_size = max(1, _TILE_ENTRIES // block_size)
    if isinstance(query_block_size, bool) or not isinstance(query_block_size, int) or query_block_size < 1:
        raise ValueError(f"query_block_size must be a positive int, got {query_block_size!r}")
    acc = torch.float64 if (queries.dtype == torch.float64 or corpus.dtype == torch.float64) else torch.float32
    excl = _exclusion_pairs(exclude, n_q, n_c, device)
    out_s = torch.full((n_q, k_eff), float("-inf"), dtype=torch.float32, device=device)
    out_i = torch.full((n_q, k_eff), -1, dtype=torch.long, device=device)
    if n_q == 0 or k_eff == 0:
        return out_s, out_i

    from tqdm.auto import tqdm

    blocks = range(0, n_c, block_size)
    n_qb = (n_q + query_block_size - 1) // query_block_size
    bar = tqdm(total=len(blocks) * n_qb, desc="search", unit="block", disable=not progress, leave=False)
    try:
        for q0 in range(0, n_q, query_block_size):
            q1 = min(n_q, q0 + query_block_size)
            qa = queries[q0:q1].to(acc)
            best_s = torch.empty((q1 - q0, 0), dtype=acc, device=device)
            best_i = torch.empty((q1 - q0, 0), dtype=torch.long, device=device)
            if excl is not None:
                sel = (excl[0] >= q0) & (excl[0] < q1)
                ex_r, ex_c = excl[0][sel] - q0, excl[1][sel]
            for c0 in blocks:
                c1 = min(n_c, c0 + block_size)
                s = qa @ corpus[c0:c1].to(device=device, dtype=acc).T
                if excl is not None and ex_c.numel():
                    m = (ex_c >= c0) & (ex_c < c1)
                    if bool(m.any()):
                        s[ex_r[m], ex_c[m] - c0] = float("-inf")
                vals, pos = _block_topk(s, k_eff)
                # running best has lower corpus indices than this block and is ordered by
                # (score desc, index asc); a stable sort of [best, block] keeps that order.
                cand_s = torch.cat([best_s, vals], 1)
                cand_i = torch.cat([best_i, pos + c0], 1)
                cand_s, order = torch.sort(cand_s, dim=1, descending=True, stable=True)
                best_s = cand_s[:, :k_eff]
                best_i = cand_i.gather(1, order[:, :k_eff])
                bar.update(1)
            gone = torch.isneginf(best_s)
            out_s[q0:q1] = best_s.to(torch.float32)
            out_i[q0:q1] = best_i.masked_fill(gone, -1)
    finally:
        bar.close()
    return out_s, out_i
