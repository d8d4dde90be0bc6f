"""Search: exact top-k by inner product in bounded memory, faiss for large corpora.

- :func:`exact_topk` walks the corpus in blocks with a running top-k (ties: lower index first).
- :func:`topk` searches exactly by default (``"auto"``; a faiss IVF index from
  ``faiss_threshold`` corpus rows when you give one), or by the method you name:
  ``"exact"``, ``"faiss-flat"``, ``"faiss-ivf"``, ``"faiss-hnsw"``.

Example::

    import torch
    import contrastkit.search as search
    q, c = torch.randn(3, 16), torch.randn(2000, 16)
    scores, idx = search.topk(q, c, 10)          # exact (auto, no faiss_threshold)
"""

from .ann import METHODS, build_faiss_index, resolve_method, topk
from .exact import exact_topk

__all__ = ["exact_topk", "topk", "build_faiss_index", "resolve_method", "METHODS"]
