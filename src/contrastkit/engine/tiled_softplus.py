"""Exact tiled row sums of softplus(U), U = s q k^T + b: SigLIP's pairwise term.

SigLIP sums ``-log sigmoid(z_ij U_ij)`` over all pairs, with z = +1 on the positive
cell of a row and -1 elsewhere: ``softplus(U_ij)`` on the negatives and
``softplus(-U_ip)`` on the positive. Given ``positives=``, this Function masks the
positive cells out of the tiles, so that the tiles only ever need ``softplus``
(forward) and ``sigmoid`` (backward), and adds ``softplus(-U_ip)`` from an O(N d)
gather (adding it back as ``softplus(U) - U`` would cancel catastrophically for
confident pairs). It walks the tiles with the engine's walker
(:class:`contrastkit.engine.tiles.Tiles`: reused buffers, in-engine scale), saving
only the row sums.

When every |U| is provably below the exponent limit (from the row / column norms,
the scale and the bias), ``softplus(u) = log1p(exp(u))`` in two in-place passes, with
exponents clamped at -80 (float32) so that ``exp`` stays out of denormals (terms
below e^-80, far below rounding); otherwise, and always for the positive cells, the
stable ``log1p(exp(-|u|)) + max(u, 0)``, finite for any finite u: a noisy positive
pair at temperature 1e-4 gives a large finite loss and a gradient of magnitude <= 1
per pair, never inf / NaN.

Example::

    import torch
    from contrastkit.engine.tiled_softplus import tiled_softplus_rows
    x = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    rows = tiled_softplus_rows(x, y, scale=10.0, row_bias=torch.full((64,), -10.0),
                               positives=torch.arange(64))
    loss = rows.sum() / 64                      # SigLIP, temperature 0.1, bias -10
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .masks import DiagonalMask, IndexMask, TileMask
from .positives import positive_logits
from .tiles import Limits, Scale, Tiles, as_scale, check_problem, scale_grad, stable_softplus
from .tiling import TileSize, choose_tile

__all__ = ["tiled_softplus_rows"]


def _softplus_(tiles: Tiles, x: Tensor, direct: bool, limit: float) -> Tensor:
    """softplus of a tile, in place (the stable form uses scratch buffer 1)."""
    if direct:
        return x.clamp_min_(-limit).exp_().log1p_()
    pos = torch.clamp_min(x, 0.0, out=tiles.view(1, *x.shape))
    return x.abs_().neg_().clamp_min_(-limit).exp_().log1p_().add_(pos)


class _TiledSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, scale, positives, masks, tr, tc):
        tiles = Tiles(q, k, row_bias, None, masks, (tr, tc), n_buffers=2, scale=scale)
        limit = Limits(tiles.dtype).flush
        direct = tiles.logit_bound() <= limit
        rows = torch.zeros(tiles.n, dtype=tiles.dtype, device=q.device)
        for r0, r1, c0, c1, x in tiles:
            rows[r0:r1] += _softplus_(tiles, x, direct, limit).sum(1)
        if positives is not None:
            # softplus(-U_ip) of the positive cells (masked out of the tiles above)
            u = _positive_logits(tiles, positives)
            rows += torch.where(positives >= 0, stable_softplus(-u), torch.zeros_like(u))
        ctx.save_for_backward(q, k, row_bias, scale, positives)
        ctx.masks, ctx.tr, ctx.tc = masks, tr, tc
        return rows

    @staticmethod
    def backward(ctx, g):
        q, k, row_bias, scale, positives = ctx.saved_tensors
        need_q, need_k, need_rb, need_s = ctx.needs_input_grad[:4]
        tiles = Tiles(q, k, row_bias, None, ctx.masks, (ctx.tr, ctx.tc), scale=scale)
        acc, n = tiles.dtype, tiles.n
        g = g.to(acc)
        # dU_ij = g_i sigmoid(U_ij): g is applied to the N x d operands, not to the tiles
        sq = torch.zeros_like(tiles.q) if (need_q or need_s) else None  # accumulates sigmoid(U) K
        gq = tiles.scaled_q() * g[:, None] if need_k else None
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
        if sq is not None:
            sq.mul_(g[:, None])  # now the gradient with respect to the scaled rows s q
        drb = None if srow is None else srow.mul_(g)
        if positives is not None:
            # d softplus(-u)/du = -sigmoid(-u) at the positive cells
            rows = (positives >= 0).nonzero(as_tuple=True)[0]
            cols = positives[rows]
            u = _positive_logits(tiles, positives)[rows]
            coef = torch.sigmoid(-u).mul_(g[rows]).neg_()
            if sq is not None:
                sq.index_add_(0, rows, tiles.k[cols] * coef[:, None])
            if dk is not None:
                sq_rows = tiles.q[rows] if tiles.scale is None else tiles.q[rows] * tiles.scale[rows, None]
                dk.index_add_(0, cols, sq_rows.mul_(coef[:, None]))
            if drb is not None:
                drb.index_add_(0, rows, coef)
        dq, dscale = (None, None) if sq is None else scale_grad(tiles.q, sq, scale, need_s, need_q)
        return (None if dq is None else dq.to(q.dtype), None if dk is None else dk.to(k.dtype),
                None if drb is None else drb.to(row_bias.dtype), dscale, None, None, None, None)


def _positive_logits(tiles: Tiles, positives: Tensor) -> Tensor:
    """U_ip = s_i q_i . k_{p_i} + b_i (0 where p_i = -1)."""
    u = positive_logits(tiles.q, tiles.k, positives)
    if tiles.scale is not None:
        u = u * tiles.scale
    if tiles.rb is not None:
        u = u + tiles.rb
    return torch.where(positives >= 0, u, torch.zeros_like(u))


def tiled_softplus_rows(q: Tensor, k: Tensor, *, row_bias: Optional[Tensor] = None,
                        scale: Scale = None, masks: Sequence[TileMask] = (),
                        tile_size: TileSize = None, positives: Optional[Tensor] = None) -> Tensor:
    """Per row, ``sum_j softplus(z_ij U_ij)`` with ``U_ij = s_i q_i . k_j + b_i`` over the
    entries the masks keep; z_ij = -1 except at the positive cell (i, positives_i), where
    z = +1 (SigLIP's ``-log sigmoid(z U)``); the positive cell counts as ``softplus(-U_ip)``
    even where a mask covers it. Without ``positives`` every kept pair is a negative:
    ``sum_j softplus(U_ij)``.

    ``scale`` (s = 1 / temperature): a python number, a 0-dim tensor (possibly requiring
    grad) or one per row (N,). ``positives``: LongTensor (N,) of column indices, -1 for a
    row without a positive among these candidates. Exact (no overflow for any finite
    input: a positive pair's ``softplus(-U)`` uses ``log1p(exp(-|u|)) + max(u, 0)``),
    differentiable in ``q``, ``k``, ``row_bias`` and ``scale``, never materialising N x M.
    Returns (N,) in float32 (float64 for float64 inputs).

    Example::

        import torch
        from contrastkit.engine.tiled_softplus import tiled_softplus_rows
        x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
        tiled_softplus_rows(x, y, scale=100.0, row_bias=torch.tensor([-10.0]),
                            positives=torch.tensor([0]))       # tensor([110.])
    """
    n, m = check_problem("tiled_softplus_rows", q, k, row_bias, None, masks)
    scale = as_scale(scale, n, q)
    masks = tuple(masks)
    if positives is not None:
        if not isinstance(positives, Tensor) or positives.shape != (n,) or positives.dtype.is_floating_point:
            raise ValueError(f"positives must be an integer tensor of shape ({n},), "
                             f"got {getattr(positives, 'shape', type(positives).__name__)}")
        positives = positives.long()
        if n and (int(positives.max()) >= m or int(positives.min()) < -1):
            raise ValueError(f"positives must lie in [-1, {m}), got range "
                             f"[{int(positives.min())}, {int(positives.max())}]")
        diagonal = n <= m and bool((positives == torch.arange(n, device=positives.device)).all())
        masks = masks + (DiagonalMask(0) if diagonal else IndexMask(positives),)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    return _TiledSoftplus.apply(q, k, row_bias, scale, positives, masks, tr, tc)
