"""Top-k search front end: exact (tiled) by default, faiss where asked.

``method="auto"`` searches exactly (:func:`~contrastkit.search.exact_topk`: memory-bounded
at any corpus size) unless ``faiss_threshold`` is given and the corpus has at least that
many rows; then a faiss IVF index. The default is exact at every size because it was the
faster choice where measured: on a 2-core CPU, 20,000 queries against 200,000 and 500,000
documents (d 384), building the IVF index alone took longer than the whole exact search, and
its search at the default ``nprobe`` was slower again and missed part of the true top-k
(``scripts/bench_mine_memory.py``, docs/benchmarks.md). Approximate search pays off only
with many more queries per corpus or a small ``nprobe``: name a faiss method or a threshold
to use it. faiss is imported only when a faiss method runs. All methods score by inner
product (cosine for L2-normalised embeddings) and return the same ``(scores float32,
indices long)`` layout, with ``-1`` / ``-inf`` where fewer than ``k`` results exist.

Example::

    import torch
    from contrastkit.search import topk
    q, c = torch.randn(4, 16), torch.randn(5000, 16)
    scores, idx = topk(q, c, 10, method="faiss-hnsw")
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .exact import check_search_inputs, exact_topk_checked

__all__ = ["topk", "build_faiss_index", "resolve_method", "METHODS"]

METHODS = ("auto", "exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")


def resolve_method(method: str, num_corpus: int, faiss_threshold: Optional[int] = None) -> str:
    """The search method ``method`` names: ``"auto"`` is ``"exact"`` unless
    ``faiss_threshold`` (corpus rows, an int >= 1) is given and ``num_corpus`` reaches it,
    then ``"faiss-ivf"``; any other method is returned as it is (checked).

    Example::

        from contrastkit.search import resolve_method
        assert resolve_method("auto", 10**7) == "exact"
        assert resolve_method("auto", 10**7, faiss_threshold=10**6) == "faiss-ivf"
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if faiss_threshold is not None and (isinstance(faiss_threshold, bool) or not isinstance(faiss_threshold, int)
                                        or faiss_threshold < 1):
        raise ValueError(f"faiss_threshold must be None or a positive int, got {faiss_threshold!r}")
    if method != "auto":
        return method
    return "faiss-ivf" if faiss_threshold is not None and num_corpus >= faiss_threshold else "exact"


def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the faiss methods need the faiss package (pip install faiss-cpu)") from err
    return faiss


def _as_f32(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def build_faiss_index(corpus: Tensor, method: str = "faiss-ivf", *, nlist: Optional[int] = None,
                      hnsw_m: int = 32, ef_construction: int = 80, add_block_size: int = 65536,
                      train_size: Optional[int] = None, seed: int = 0):
    """A faiss inner-product index over ``corpus`` (rows added in blocks of ``add_block_size``,
    so only one float32 block is copied at a time).

    - ``"faiss-flat"``: ``IndexFlatIP`` (exact, brute force).
    - ``"faiss-ivf"``: ``IndexIVFFlat`` with ``nlist`` inverted lists (default
      ``clip(4 * sqrt(C), 1, C // 39)``), trained by k-means on ``train_size`` random rows
      (default ``min(C, max(64 * nlist, 39 * nlist))``).
    - ``"faiss-hnsw"``: ``IndexHNSWFlat`` with ``hnsw_m`` links per node (Malkov & Yashunin,
      "Efficient and robust approximate nearest neighbor search using Hierarchical Navigable
      Small World graphs", TPAMI 2018, arXiv:1603.09320).

    Example::

        import torch
        from contrastkit.search import build_faiss_index, topk
        corpus = torch.randn(10000, 32)
        index = build_faiss_index(corpus, "faiss-ivf")
        assert index.ntotal == 10000
        scores, idx = topk(torch.randn(4, 32), corpus, 10, method="faiss-ivf", index=index)   # reused
    """
    faiss = _import_faiss()
    if corpus.dim() != 2:
        raise ValueError(f"corpus must be (C, d), got shape {tuple(corpus.shape)}")
    n, d = corpus.shape
    if method == "faiss-flat":
        index = faiss.IndexFlatIP(d)
    elif method == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
    elif method == "faiss-ivf":
        if nlist is None:
            nlist = int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39)))
        if isinstance(nlist, bool) or not isinstance(nlist, int) or not 1 <= nlist <= max(1, n):
            raise ValueError(f"nlist must be an int in [1, {max(1, n)}] (the corpus size), got {nlist!r}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        if train_size is None:
            train_size = min(n, 64 * nlist)
        train_size = max(1, min(n, int(train_size)))
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:train_size].sort().values
        index.cp.seed = seed
        index.train(_as_f32(corpus[rows.to(corpus.device)]))
    else:
        raise ValueError(f"faiss method must be one of 'faiss-flat', 'faiss-ivf', 'faiss-hnsw', got {method!r}")
    for c0 in range(0, n, add_block_size):
        index.add(_as_f32(corpus[c0:c0 + add_block_size]))
    return index


@torch.no_grad()
def topk(queries: Tensor, corpus: Tensor, k: int, *, method: str = "auto", faiss_threshold: Optional[int] = None,
         block_size: Optional[int] = None, exclude: Optional[Sequence[Sequence[int]]] = None,
         nlist: Optional[int] = None, nprobe: Optional[int] = None, hnsw_m: int = 32,
         ef_search: Optional[int] = None, ef_construction: int = 80, index=None,
         progress: bool = False) -> Tuple[Tensor, Tensor]:
    """Top-``k`` corpus rows by inner product for each query, exact or with faiss.

    Args:
        queries, corpus, k, block_size, exclude, progress: as in :func:`exact_topk`
            (``k`` clipped to the corpus size; ``-1`` / ``-inf`` pad a short result).
        method: ``"auto"`` (exact, or ``"faiss-ivf"`` from ``faiss_threshold`` rows on),
            ``"exact"``, ``"faiss-flat"``, ``"faiss-ivf"`` or ``"faiss-hnsw"``.
        faiss_threshold: corpus size from which ``"auto"`` switches to faiss IVF (default
            None: never; see the module doc for why).
        nlist, hnsw_m, ef_construction: index parameters (see :func:`build_faiss_index`).
        nprobe: IVF lists visited per query (default ``max(16, nlist // 8)``, capped at nlist).
        ef_search: HNSW search breadth (default ``max(64, 2 * k)``).
        index: a prebuilt faiss index over ``corpus`` (from :func:`build_faiss_index`),
            reused instead of building one (e.g. to search the same corpus many times).

    Returns:
        ``(scores (Q, min(k, C)) float32, indices (Q, min(k, C)) long)`` on the queries' device.
        The faiss IVF / HNSW results are approximate; faiss-flat is exact up to float32
        rounding (its tie order is faiss's).

    Example::

        >>> import torch
        >>> from contrastkit.search import topk
        >>> q, c = torch.randn(2, 8), torch.randn(300, 8)
        >>> s, i = topk(q, c, 5, method="faiss-flat")
        >>> bool((i == topk(q, c, 5, method="exact")[1]).all())
        True
    """
    check_search_inputs(queries, corpus, k)
    return topk_checked(queries, corpus, k, method=method, faiss_threshold=faiss_threshold, block_size=block_size,
                        exclude=exclude, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                        ef_construction=ef_construction, index=index, progress=progress)


def topk_checked(queries: Tensor, corpus: Tensor, k: int, *, method: str = "auto",
                 faiss_threshold: Optional[int] = None, block_size: Optional[int] = None,
                 exclude: Optional[Sequence[Sequence[int]]] = None, nlist: Optional[int] = None,
                 nprobe: Optional[int] = None, hnsw_m: int = 32, ef_search: Optional[int] = None,
                 ef_construction: int = 80, index=None, progress: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`topk` for inputs :func:`check_search_inputs` has already passed (it scans every
    entry for NaN / inf: a caller that searches one corpus query block by query block, as
    mining does, checks the whole input once and names the bad row in it)."""
    n_q, n_c = queries.shape[0], corpus.shape[0]
    method = resolve_method(method, n_c, faiss_threshold)
    if method == "exact":
        return exact_topk_checked(queries, corpus, k, block_size=block_size, exclude=exclude, progress=progress)

    faiss = _import_faiss()
    k_eff = min(k, n_c)
    out_s = torch.full((n_q, k_eff), float("-inf"), dtype=torch.float32)
    out_i = torch.full((n_q, k_eff), -1, dtype=torch.long)
    if n_q == 0 or k_eff == 0:
        return out_s.to(queries.device), out_i.to(queries.device)
    excl, extra = None, 0
    if exclude is not None:
        if len(exclude) != n_q:
            raise ValueError(f"exclude must have one list per query ({n_q}), got {len(exclude)}")
        sets = [sorted(set(int(j) for j in ex)) for ex in exclude]
        for i, ex in enumerate(sets):
            if ex and not (0 <= ex[0] and ex[-1] < n_c):
                bad = ex[0] if ex[0] < 0 else ex[-1]
                raise ValueError(f"exclude[{i}] contains corpus index {bad}, outside [0, {n_c})")
        extra = max((len(ex) for ex in sets), default=0)
        if extra:  # (Q, E) padded with -2, which no faiss id equals
            excl = torch.full((n_q, extra), -2, dtype=torch.long)
            for i, ex in enumerate(sets):
                excl[i, :len(ex)] = torch.tensor(ex, dtype=torch.long)
    if index is None:
        index = build_faiss_index(corpus, method, nlist=nlist, hnsw_m=hnsw_m, ef_construction=ef_construction)
    elif index.ntotal != n_c or index.d != corpus.shape[1]:
        raise ValueError(f"index holds {index.ntotal} vectors of dimension {index.d}, but the corpus is "
                         f"{tuple(corpus.shape)}")
    search_k = min(n_c, k_eff + extra)
    ivf = faiss.try_extract_index_ivf(index) if method == "faiss-ivf" else None
    if ivf is not None:
        ivf.nprobe = int(min(ivf.nlist, nprobe if nprobe is not None else max(16, ivf.nlist // 8)))
    if method == "faiss-hnsw":
        index.hnsw.efSearch = int(ef_search if ef_search is not None else max(64, 2 * search_k))

    from tqdm.auto import tqdm

    step = 4096
    for q0 in tqdm(range(0, n_q, step), desc="search", unit="block", disable=not progress, leave=False):
        q1 = min(n_q, q0 + step)
        d, ix = index.search(_as_f32(queries[q0:q1]), search_k)
        s, ix = torch.from_numpy(d), torch.from_numpy(ix).long()
        s = s.masked_fill(ix < 0, float("-inf"))
        if excl is not None:
            drop = (ix[:, :, None] == excl[q0:q1, None, :]).any(-1)
            s = s.masked_fill(drop, float("-inf"))
            s, order = torch.sort(s, dim=1, descending=True, stable=True)
            ix = ix.gather(1, order)
        s, ix = s[:, :k_eff], ix[:, :k_eff]
        out_s[q0:q1] = s
        out_i[q0:q1] = ix.masked_fill(torch.isneginf(s), -1)
    return out_s.to(queries.device), out_i.to(queries.device)
