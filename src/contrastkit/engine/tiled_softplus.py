"""Exact tiled row sums of softplus(U), U = s q k^T + b: SigLIP's pairwise term.

SigLIP sums ``-log sigmoid(z_ij U_ij)`` over all pairs, with z = +1 on the positive
cell of a row and -1 elsewhere: ``softplus(U_ij)`` on the negatives and
``softplus(-U_ip)`` on the positive. With the positive cells masked out of the tiles,
the tiles only ever need ``softplus`` (forward) and ``sigmoid`` (backward); the
positive cells are an O(N d) gather. (Adding them back as ``softplus(U) - U`` would
cancel catastrophically for confident pairs.) This Function walks the tiles with the engine's
reused buffers and in-engine scale (:mod:`contrastkit.engine.tiled_lse`), saving only
the row sums.

When every |U| is provably below the exponent limit (from the row / column norms,
the scale and the bias), ``softplus(u) = log1p(exp(u))`` in two in-place passes, with
exponents clamped at -80 (float32) so that ``exp`` stays out of denormals (terms
below e^-80, far below rounding); otherwise the stable
``log1p(exp(-|u|)) + max(u, 0)``.

Example::

    rows = tiled_softplus_rows(x, y, scale=torch.tensor(10.0), row_bias=torch.full((len(x),), -10.0))
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .masks import TileMask
from .tiled_lse import _check_problem, _Tiles
from .tiling import TileSize, choose_tile

__all__ = ["tiled_softplus_rows"]


def _limit(dtype: torch.dtype) -> float:
    return 700.0 if dtype == torch.float64 else 80.0


def _softplus_(x: Tensor, direct: bool, limit: float) -> Tensor:
    """softplus of a tile, in place where possible."""
    if direct:
        return x.clamp_min_(-limit).exp_().log1p_()
    pos = x.clamp_min(0.0)
    return x.abs_().neg_().exp_().log1p_().add_(pos)


class _TiledSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, scale, masks, tr, tc):
        tiles = _Tiles(q, k, row_bias, None, masks, tr, tc, scale=scale)
        limit = _limit(tiles.q.dtype)
        direct = tiles.logit_bound() <= limit
        rows = torch.zeros(tiles.n, dtype=tiles.q.dtype, device=q.device)
        for r0, r1, c0, c1, x in tiles:
            rows[r0:r1] += _softplus_(x, direct, limit).sum(1)
        ctx.save_for_backward(q, k, row_bias, scale)
        ctx.masks, ctx.tr, ctx.tc = masks, tr, tc
        return rows

    @staticmethod
    def backward(ctx, g):
        q, k, row_bias, scale = ctx.saved_tensors
        need_q, need_k, need_rb, need_s = ctx.needs_input_grad[:4]
        tiles = _Tiles(q, k, row_bias, None, ctx.masks, ctx.tr, ctx.tc, scale=scale)
        acc, n = tiles.q.dtype, tiles.n
        g = g.to(acc)
        # dU_ij = g_i sigmoid(U_ij): g is applied to the N x d operands, not to the tiles
        want_dq = need_q or need_s
        sq = torch.zeros_like(tiles.q) if want_dq else None          # accumulates sigmoid(U) K
        gq = tiles.q * (g if tiles.scale is None else g * tiles.scale)[:, None] if need_k else None
        dk = torch.zeros_like(tiles.k) if need_k else None
        srow = torch.zeros(n, dtype=acc, device=q.device) if need_rb else None
        for r0, r1, c0, c1, x in tiles:
            s = x.sigmoid_()
            if sq is not None:
                sq[r0:r1].addmm_(s, tiles.k[c0:c1])
            if dk is not None:
                dk[c0:c1].addmm_(s.T, gq[r0:r1])
            if srow is not None:
                srow[r0:r1] += s.sum(1)
        dq = dscale = None
        if sq is not None:
            sq.mul_(g[:, None])  # gradient with respect to the scaled rows s q
            if tiles.scale is not None and need_s:
                per_row = torch.bmm(tiles.q.unsqueeze(1), sq.unsqueeze(2)).reshape(n)
                dscale = (per_row.sum().reshape(scale.shape) if scale.numel() == 1 else per_row).to(scale.dtype)
            if need_q:
                dq = (sq if tiles.scale is None else sq.mul_(tiles.scale[:, None])).to(q.dtype)
        drb = None if srow is None else (srow * g).to(row_bias.dtype)
        return dq, None if dk is None else dk.to(k.dtype), drb, dscale, None, None, None


def tiled_softplus_rows(q: Tensor, k: Tensor, *, row_bias: Optional[Tensor] = None,
                        scale: Optional[Tensor] = None, masks: Sequence[TileMask] = (),
                        tile_size: TileSize = None) -> Tensor:
    """``sum_j softplus(s_i q_i . k_j + b_i)`` per row over the entries the masks keep,
    exact, differentiable in ``q``, ``k``, ``row_bias`` and ``scale`` (0-dim or (N,)),
    never materialising N x M. Returns (N,) in float32 (float64 for float64 inputs)."""
    n, m = _check_problem(q, k, row_bias, None, scale, masks)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    return _TiledSoftplus.apply(q, k, row_bias, scale, tuple(masks), tr, tc)
