"""The exact tiled log-sum-exp over a logit matrix that is never materialised.

For anchors Q (N x d) and candidates K (M x d) the logits are

    X_ij = s_i q_i . k_j + r_i + c_j    (s: scale = 1 / temperature, optional;
                                         r, c: optional row / column offsets)

with entries dropped by masks (``-inf``). This module computes

    lse_row_i = log sum_j exp(X_ij)     and, when symmetric,
    lse_col_j = log sum_i exp(X_ij)

walking tiles of X (:class:`contrastkit.engine.tiles.Tiles`). The forward pass keeps only
the running row / column statistics, O(N + M); the backward pass recomputes each tile and
forms

    dX_ij = g_i exp(X_ij - lse_row_i) + h_j exp(X_ij - lse_col_j)

then dQ = diag(s) dX K, dK = dX^T diag(s) Q, ds_i = q_i . (dX K)_i, dr = row sums,
dc = column sums.

Every objective of the InfoNCE family is this LSE plus an O(N d) positive term
(:func:`tiled_logsumexp_with_positives` computes both in one Function), which is why
this one Function is the engine.

Example::

    import torch
    from contrastkit.engine import tiled_logsumexp
    q, k = torch.randn(4096, 256), torch.randn(4096, 256)
    lse_row, lse_col = tiled_logsumexp(q, k, scale=20.0, symmetric=True)   # temperature 0.05
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .masks import TileMask
from .positives import positive_logits
from .tiles import NEG_INF, Limits, Scale, Tiles, as_scale, check_problem, finite_or_zero, lse, scale_grad
from .tiling import TileSize, choose_tile

__all__ = ["tiled_logsumexp", "tiled_logsumexp_with_positives"]


def _tile_stats(tiles, x, r0, r1, c0, c1, symmetric, lim):
    """Row (and column) log-sum-exp of one tile with a single exponential pass.

    Rows are stabilised by their own maximum; columns reuse the same exponentials,
    rescaled by exp(m_i - max m), and fall back to an exact recomputation for any
    column whose rescaled sum is too small to trust.
    """
    m = x.amax(1)
    finite = torch.isfinite(m)
    m = torch.where(finite, m, torch.zeros_like(m))
    e = x.sub_(m[:, None]).clamp_min_(-lim.flush).exp_()
    row = e.sum(1).log_().add_(m)
    row = torch.where(finite, row, torch.full_like(row, NEG_INF))
    if not symmetric:
        return row, None
    top = m.max()
    w = torch.where(finite, (m - top).exp(), torch.zeros_like(m))
    colsum = torch.mv(e.T, w)
    col = colsum.log().add_(top)
    if bool((colsum < lim.col_floor).any()):
        col = lse(tiles.logits(r0, r1, c0, c1), 0, lim.flush)
    return row, col


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, col_bias, scale, index, masks, symmetric, tr, tc):
        tiles = Tiles(q, k, row_bias, col_bias, masks, (tr, tc), scale=scale)
        lim = Limits(tiles.dtype)
        acc, dev = tiles.dtype, q.device
        direct = tiles.direct()
        if direct:
            # |X| is bounded: plain sums of exp(X), no stabiliser.
            sum_r = torch.zeros(tiles.n, dtype=acc, device=dev)
            sum_c = torch.zeros(tiles.m if symmetric else 0, dtype=acc, device=dev)
            ones = torch.ones(tiles.tr, dtype=acc, device=dev)
            for r0, r1, c0, c1, x in tiles:
                e = x.exp_()
                sum_r[r0:r1] += e.sum(1)
                if symmetric:  # a matrix-vector product sums columns faster than sum(0)
                    sum_c[c0:c1].addmv_(e.T, ones[: r1 - r0])
            lse_r, lse_c = sum_r.log_(), sum_c.log_()
        else:
            lse_r = torch.full((tiles.n,), NEG_INF, dtype=acc, device=dev)
            lse_c = torch.full((tiles.m if symmetric else 0,), NEG_INF, dtype=acc, device=dev)
            for r0, r1, c0, c1, x in tiles:
                row, col = _tile_stats(tiles, x, r0, r1, c0, c1, symmetric, lim)
                run = lse_r[r0:r1]
                torch.logaddexp(run, row, out=run)
                if symmetric:
                    cs = lse_c[c0:c1]
                    torch.logaddexp(cs, col, out=cs)
        # the positive logits s_i q_i . k_{index_i}: an O(N d) gather, not a tile
        if index is None:
            pos = lse_r.new_zeros(0)
            ctx.mark_non_differentiable(pos)
        else:
            pos = positive_logits(tiles.q, tiles.k, index)
            if tiles.scale is not None:
                pos = pos * tiles.scale
        ctx.save_for_backward(q, k, row_bias, col_bias, scale, index, lse_r, lse_c)
        ctx.masks, ctx.symmetric, ctx.tr, ctx.tc, ctx.direct = masks, symmetric, tr, tc, direct
        if not symmetric:
            ctx.mark_non_differentiable(lse_c)
        return lse_r, lse_c, pos

    @staticmethod
    def backward(ctx, g_r, g_c, g_pos):
        q, k, row_bias, col_bias, scale, index, lse_r, lse_c = ctx.saved_tensors
        need_q, need_k, need_rb, need_cb, need_s = ctx.needs_input_grad[:5]
        tiles = Tiles(q, k, row_bias, col_bias, ctx.masks, (ctx.tr, ctx.tc), n_buffers=2, scale=scale)
        lim = Limits(tiles.dtype)
        acc, n, m, dev = tiles.dtype, tiles.n, tiles.m, q.device
        use_r = g_r is not None and bool(g_r.any())
        use_c = ctx.symmetric and g_c is not None and bool(g_c.any())
        # dq accumulates the gradient with respect to the scaled rows s q
        dq = torch.zeros_like(tiles.q) if (need_q or need_s) else None
        dk = torch.zeros_like(tiles.k) if need_k else None
        drb = torch.zeros(n, dtype=acc, device=dev) if need_rb else None
        dcb = torch.zeros(m, dtype=acc, device=dev) if need_cb else None
        if use_r or use_c:
            fin_r = torch.isfinite(lse_r)
            lr = finite_or_zero(lse_r)
            gr = torch.where(fin_r, g_r.to(acc), torch.zeros_like(lr)) if use_r else torch.zeros_like(lr)
            if use_c:
                fin_c = torch.isfinite(lse_c)
                lc = finite_or_zero(lse_c)
                gc = torch.where(fin_c, g_c.to(acc), torch.zeros_like(lc))
            direct = ctx.direct
            if direct:
                # P_ij = exp(X_ij) exp(-lse_i): fold exp(-lse) into the row / column weights.
                gr = gr * torch.where(fin_r, (-lr).exp(), torch.zeros_like(lr))
                if use_c:
                    gc = gc * torch.where(fin_c, (-lc).exp(), torch.zeros_like(lc))
            # Row-only: dX = diag(g) P, so g is applied to O(N d) operands, not to tiles.
            fold_rows = not use_c
            if fold_rows:
                gq = tiles.scaled_q() * gr[:, None] if dk is not None else None
                pk = dq  # accumulates P K; scaled by g once at the end
            for r0, r1, c0, c1, x in tiles:
                if direct:
                    p = x.exp_()
                else:
                    p = x.sub_(lr[r0:r1, None]).clamp_min_(-lim.flush).exp_()
                if fold_rows:
                    if pk is not None:
                        pk[r0:r1].addmm_(p, tiles.k[c0:c1])
                    if dk is not None:
                        dk[c0:c1].addmm_(p.T, gq[r0:r1])
                    if drb is not None:
                        drb[r0:r1] += p.sum(1) * gr[r0:r1]
                    if dcb is not None:
                        dcb[c0:c1] += torch.mv(p.T, gr[r0:r1])
                    continue
                lr_t, lc_t = lr[r0:r1], lc[c0:c1]
                if direct:
                    # dX_ij = exp(X_ij) (g_i e^{-lse_i} + h_j e^{-lse_j})
                    rmat = torch.add(gr[r0:r1, None], gc[None, c0:c1], out=tiles.view(1, r1 - r0, c1 - c0))
                    dx = p.mul_(rmat)
                elif float(torch.maximum(lr_t.max() - lc_t.min(), lc_t.max() - lr_t.min())) <= lim.pair_range:
                    # dX_ij = P_ij (g_i + h_j exp(lse_r_i - lse_c_j)), the exp split as a_i b_j.
                    top = lr_t.max()
                    a = (lr_t - top).exp_()
                    b = (top - lc_t).exp_().mul_(gc[c0:c1])
                    rmat = torch.outer(a, b, out=tiles.view(1, r1 - r0, c1 - c0))
                    if use_r:
                        rmat.add_(gr[r0:r1, None])
                    dx = p.mul_(rmat)
                else:
                    x = tiles.logits(r0, r1, c0, c1)
                    pc = torch.sub(x, lc_t[None, :], out=tiles.view(1, r1 - r0, c1 - c0))
                    dx = pc.clamp_min_(-lim.flush).exp_().mul_(gc[None, c0:c1])
                    if use_r:
                        dx.add_(x.sub_(lr_t[:, None]).clamp_min_(-lim.flush).exp_().mul_(gr[r0:r1, None]))
                tiles.accumulate(dx, r0, r1, c0, c1, dq, dk, drb, dcb)
            if fold_rows and dq is not None:
                dq.mul_(gr[:, None])
        if index is not None and g_pos is not None:
            # d pos_i = g_i (s_i q_i . k_{index_i}): added in place, no N x d temporaries
            has = index >= 0
            rows, cols = has.nonzero(as_tuple=True)[0], index[has]
            gp = g_pos.to(acc)[rows]
            if dq is not None:
                dq.index_add_(0, rows, tiles.k[cols] * gp[:, None])
            if dk is not None:
                sq = tiles.q[rows] if tiles.scale is None else tiles.q[rows] * tiles.scale[rows, None]
                dk.index_add_(0, cols, sq.mul_(gp[:, None]))
        dq, dscale = (None, None) if dq is None else scale_grad(tiles.q, dq, scale, need_s, need_q)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if drb is None else drb.to(row_bias.dtype),
            None if dcb is None else dcb.to(col_bias.dtype),
            dscale,
            None, None, None, None, None,
        )


def _prepare(name, q, k, row_bias, col_bias, scale, masks, tile_size):
    n, m = check_problem(name, q, k, row_bias, col_bias, masks)
    scale = as_scale(scale, n, q)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    return n, scale, tr, tc


def tiled_logsumexp(
    q: Tensor,
    k: Tensor,
    *,
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
    scale: Scale = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) log-sum-exp of ``X = s q @ k.T + row_bias[:, None] + col_bias[None, :]``.

    ``scale`` (s = 1 / temperature): a python number, a 0-dim tensor (possibly requiring
    grad: a learnable temperature) or one per anchor row (N,). It multiplies the anchors
    inside the engine, one row block at a time, so ``q / temperature`` is never
    materialised; its exact gradient is the O(N d) ``ds_i = q_i . (dX K)_i``.

    Exact, differentiable in ``q``, ``k``, the biases and ``scale``, and memory-bounded:
    no N x M matrix is kept, only tiles of ``tile_size`` (see :func:`choose_tile`).
    Masked entries are left out; a row whose entries are all masked gets ``-inf``
    (and no gradient). Returns ``(lse_rows (N,), lse_cols (M,) or None)`` in float32
    (float64 for float64 inputs; bfloat16 / float16 inputs are accumulated in float32).

    Example::

        import torch
        from contrastkit.engine import DiagonalMask, tiled_logsumexp
        z = torch.nn.functional.normalize(torch.randn(512, 64), dim=-1)
        t = torch.tensor(0.1, requires_grad=True)
        rows, cols = tiled_logsumexp(z, z, scale=1 / t, masks=[DiagonalMask()], symmetric=True)
        (rows.mean() + cols.mean()).backward()          # t.grad is exact
    """
    n, scale, tr, tc = _prepare("tiled_logsumexp", q, k, row_bias, col_bias, scale, masks, tile_size)
    lse_r, lse_c, _ = _TiledLSE.apply(q, k, row_bias, col_bias, scale, None, tuple(masks), bool(symmetric), tr, tc)
    return lse_r, (lse_c if symmetric else None)


def tiled_logsumexp_with_positives(
    q: Tensor,
    k: Tensor,
    positives: Tensor,
    *,
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
    scale: Scale = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """:func:`tiled_logsumexp` plus the positive logits ``s_i q_i . k_{positives_i}``
    (0 where ``positives_i == -1``) from the same Function, so that their backward adds
    into the engine's gradient buffers in place instead of allocating N x d terms.

    Returns ``(lse_rows, lse_cols or None, positive_logits)``. The positive logits do not
    include ``row_bias``.

    Example::

        import torch
        from contrastkit.engine import tiled_logsumexp_with_positives
        q, k = torch.randn(64, 8), torch.randn(64, 8)
        lse, _, pos = tiled_logsumexp_with_positives(q, k, torch.arange(len(q)), scale=20.0)
        loss = (lse - pos).mean()
    """
    n, scale, tr, tc = _prepare("tiled_logsumexp", q, k, row_bias, col_bias, scale, masks, tile_size)
    if positives.dim() != 1 or positives.shape[0] != n:
        raise ValueError(f"positives must have shape ({n},), got {tuple(positives.shape)}")
    lse_r, lse_c, pos = _TiledLSE.apply(q, k, row_bias, col_bias, scale, positives.long(), tuple(masks),
                                        bool(symmetric), tr, tc)
    return lse_r, (lse_c if symmetric else None), pos.to(q.dtype)
