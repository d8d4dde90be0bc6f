"""Exact k nearest neighbours by a running top-k over tiles (no N x M similarity).

Used for k-NN supervision graphs (I-Con) and anywhere neighbours in a frozen
teacher space are needed. No gradient: neighbours are a discrete choice.

Example::

    from contrastkit.engine.neighbors import tiled_topk
    sims, idx = tiled_topk(t, t, 10, self_offset=0)     # 10 nearest others per row
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .masks import DiagonalMask
from .tiling import TileSize, choose_tile

__all__ = ["tiled_topk"]


@torch.no_grad()
def tiled_topk(q: Tensor, k: Tensor, n_neighbors: int, *, self_offset: Optional[int] = None,
               tile_size: TileSize = None) -> Tuple[Tensor, Tensor]:
    """The ``n_neighbors`` largest ``q_i . k_j`` per row (j != i + self_offset when given).

    Returns ``(values (N, n), indices (N, n))``, sorted by decreasing similarity.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled_topk needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n, m = q.shape[0], k.shape[0]
    available = m - (1 if self_offset is not None and n > 0 else 0)
    if not isinstance(n_neighbors, int) or n_neighbors < 1 or n_neighbors > available:
        raise ValueError(f"n_neighbors must be an int in [1, {available}] (candidates other than self), "
                         f"got {n_neighbors!r}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka = q.to(acc), k.to(acc)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size)
    tc = max(tc, n_neighbors)
    mask = DiagonalMask(self_offset) if self_offset is not None else None
    out_v = torch.empty(n, n_neighbors, dtype=acc, device=q.device)
    out_i = torch.empty(n, n_neighbors, dtype=torch.long, device=q.device)
    for r0 in range(0, n, tr):
        r1 = min(n, r0 + tr)
        best_v = torch.full((r1 - r0, 0), float("-inf"), dtype=acc, device=q.device)
        best_i = torch.zeros((r1 - r0, 0), dtype=torch.long, device=q.device)
        for c0 in range(0, m, tc):
            c1 = min(m, c0 + tc)
            s = qa[r0:r1] @ ka[c0:c1].T
            if mask is not None and mask.touches(r0, r1, c0, c1):
                mask.apply_(s, r0, r1, c0, c1)
            idx = torch.arange(c0, c1, device=q.device).expand(r1 - r0, -1)
            cand_v = torch.cat([best_v, s], 1)
            cand_i = torch.cat([best_i, idx], 1)
            kk = min(n_neighbors, cand_v.shape[1])
            best_v, pos = cand_v.topk(kk, dim=1)
            best_i = cand_i.gather(1, pos)
        out_v[r0:r1], out_i[r0:r1] = best_v, best_i
    return out_v, out_i
