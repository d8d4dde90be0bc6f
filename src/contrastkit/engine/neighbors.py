"""Exact k nearest neighbours by a running top-k over the engine's tiles (no N x M similarity).

Used for k-NN supervision graphs (I-Con) and anywhere neighbours in a frozen
teacher space are needed. No gradient: neighbours are a discrete choice.

Example::

    import torch
    from contrastkit.engine.neighbors import tiled_topk
    t = torch.nn.functional.normalize(torch.randn(100, 16), dim=-1)
    sims, idx = tiled_topk(t, t, 10, self_offset=0)     # 10 nearest others per row
    assert idx.shape == (100, 10) and not (idx == torch.arange(100)[:, None]).any()
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .masks import DiagonalMask
from .tiles import Tiles, check_problem
from .tiling import TileSize, choose_tile

__all__ = ["tiled_topk"]


@torch.no_grad()
def tiled_topk(q: Tensor, k: Tensor, n_neighbors: int, *, self_offset: Optional[int] = None,
               tile_size: TileSize = None) -> Tuple[Tensor, Tensor]:
    """The ``n_neighbors`` largest ``q_i . k_j`` per row (j != i + self_offset when given).

    Returns ``(values (N, n), indices (N, n))``, sorted by decreasing similarity.
    """
    n, m = check_problem("tiled_topk", q, k)
    available = m - (1 if self_offset is not None and n > 0 else 0)
    if not isinstance(n_neighbors, int) or n_neighbors < 1 or n_neighbors > available:
        raise ValueError(f"n_neighbors must be an int in [1, {available}] (candidates other than self), "
                         f"got {n_neighbors!r}")
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size)
    masks = [DiagonalMask(self_offset)] if self_offset is not None else []
    tiles = Tiles(q, k, masks=masks, tile=(tr, max(tc, n_neighbors)))
    out_v = torch.empty(n, n_neighbors, dtype=tiles.dtype, device=q.device)
    out_i = torch.empty(n, n_neighbors, dtype=torch.long, device=q.device)
    best_v = best_i = None
    for r0, r1, c0, c1, s in tiles:
        if c0 == 0:  # a new row block: its running top-k starts empty
            best_v = s.new_empty(r1 - r0, 0)
            best_i = torch.zeros((r1 - r0, 0), dtype=torch.long, device=q.device)
        idx = torch.arange(c0, c1, device=q.device).expand(r1 - r0, -1)
        cand_v, cand_i = torch.cat([best_v, s], 1), torch.cat([best_i, idx], 1)
        best_v, pos = cand_v.topk(min(n_neighbors, cand_v.shape[1]), dim=1)
        best_i = cand_i.gather(1, pos)
        if c1 == m:
            out_v[r0:r1], out_i[r0:r1] = best_v, best_i
    return out_v, out_i
