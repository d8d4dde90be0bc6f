"""Several log-sum-exp statistics of one logit matrix in a single pass over its tiles.

For anchors Q (N x d), candidates K (M x d) and X = Q K^T (entries dropped by the
shared ``masks`` set to ``-inf``), statistic s is, per row i,

    L_si = log sum_{j not dropped by stat s} exp(a_s X_ij)

with a scale ``a_s`` (a positive number) and extra masks of its own. Objectives that need more
than the plain denominator use it:

- hard-negative reweighting (Robinson et al. 2021): log sum exp((1 + beta) X) and
  log sum exp(beta X) over the negatives;
- SupCon L_in / SupCon with a margin: the log-sum-exp over the positives only and over
  the negatives only (complementary label masks) in one walk.

Each tile is computed once per pass for all statistics. The forward pass keeps only the
(S, N) results; the backward pass recomputes each tile and forms

    dX_ij = sum_s g_si a_s exp(a_s X_ij - L_si)        (0 where stat s drops (i, j))

then dQ = dX K and dK = dX^T Q. Exact, O(S N + M) saved state, never N x M.

The plain single-statistic case is :func:`contrastkit.engine.tiled_logsumexp`; this
module does not touch it.

Example::

    q, k = torch.randn(512, 64), torch.randn(512, 64)
    out = tiled_multi_logsumexp(q, k, [LSEStat(2.0), LSEStat(1.0)], masks=[DiagonalMask()])
    # out[0] = logsumexp(2 X), out[1] = logsumexp(X), self excluded
"""

from __future__ import annotations

from typing import Optional, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from .masks import TileMask
from .tiled_lse import _accumulate_dtype, _Limits, _lse, _tile, _Tiles
from .tiling import TileSize, choose_tile

__all__ = ["LSEStat", "tiled_multi_logsumexp"]

_NEG_INF = float("-inf")


class LSEStat(NamedTuple):
    """One statistic: ``log sum_j exp(scale * X_ij)`` over the entries its ``masks`` keep."""

    scale: float = 1.0
    masks: Tuple[TileMask, ...] = ()


def _finite_or_zero(v: Tensor) -> Tensor:
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _stat_view(x: Tensor, stat: LSEStat, last: bool, r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """``scale * x`` with the stat's masks applied; ``x`` itself is reused only when it is
    not needed afterwards (``last``) or nothing has to change."""
    touching = [m for m in stat.masks if m.touches(r0, r1, c0, c1)]
    if stat.scale != 1.0:
        y = x * stat.scale
    elif touching and not last:
        y = x.clone()
    else:
        y = x
    for m in touching:
        m.apply_(y, r0, r1, c0, c1)
    return y


def _direct(q: Tensor, k: Tensor, stats, tr: int, tc: int, masks) -> bool:
    """Whether every ``scale * X`` is provably within the engine's direct range, so that
    exp needs no stabiliser (see ``_Limits.direct`` in tiled_lse)."""
    tiles = _Tiles(q, k, None, None, masks, 1, 1)
    top = max(float(s.scale) for s in stats)
    return tiles.logit_bound() * top <= _Limits(tiles.q.dtype).direct


def _scaled_exp(tiles: _Tiles, x: Tensor, stat: LSEStat, buffer: Optional[int], r0, r1, c0, c1) -> Tensor:
    """exp(scale * x) with the stat's masks, in place in x (``buffer=None``) or in a scratch buffer."""
    y = x if buffer is None else tiles.view(buffer, r1 - r0, c1 - c0).copy_(x)
    if stat.scale != 1.0:
        y.mul_(stat.scale)
    for m in stat.masks:
        if m.touches(r0, r1, c0, c1):
            m.apply_(y, r0, r1, c0, c1)
    return y.exp_()


def _forward_direct(q, k, stats, masks, tr, tc):
    """Plain sums of exp(scale * X) per statistic, reused buffers, no stabiliser."""
    tiles = _Tiles(q, k, None, None, masks, tr, tc, n_buffers=2)
    sums = torch.zeros((len(stats), tiles.n), dtype=tiles.q.dtype, device=q.device)
    last = len(stats) - 1
    for r0, r1, c0, c1, x in tiles:
        for s, stat in enumerate(stats):
            sums[s, r0:r1] += _scaled_exp(tiles, x, stat, None if s == last else 1, r0, r1, c0, c1).sum(1)
    return sums.log_()


def _backward_direct(q, k, stats, masks, tr, tc, out, g, need_q, need_k):
    """dX = sum_s a_s g_s exp(-lse_s) exp(a_s X): one exponential per statistic per tile."""
    tiles = _Tiles(q, k, None, None, masks, tr, tc, n_buffers=3)
    acc = tiles.q.dtype
    dq = torch.zeros_like(tiles.q) if need_q else None
    dk = torch.zeros_like(tiles.k) if need_k else None
    scales = torch.tensor([float(st.scale) for st in stats], dtype=acc, device=q.device)[:, None]
    coef = torch.where(torch.isfinite(out), (-_finite_or_zero(out)).exp(), torch.zeros_like(out)) * g * scales
    used = [s for s in range(len(stats)) if bool(coef[s].any())]
    if not used:
        return dq, dk
    for r0, r1, c0, c1, x in tiles:
        dx = None
        for pos, s in enumerate(used):
            # x is consumed by the last statistic; the first keeps its term in scratch 1, the
            # ones between use scratch 2
            buffer = None if pos == len(used) - 1 else (1 if pos == 0 else 2)
            e = _scaled_exp(tiles, x, stats[s], buffer, r0, r1, c0, c1)
            if dx is None:
                dx = e.mul_(coef[s, r0:r1, None])
            else:
                dx.addcmul_(e, coef[s, r0:r1, None])
        if dq is not None:
            dq[r0:r1].addmm_(dx, tiles.k[c0:c1])
        if dk is not None:
            dk[c0:c1].addmm_(dx.T, tiles.q[r0:r1])
    return dq, dk


class _TiledMultiLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, stats, masks, tr, tc):
        ctx.direct = _direct(q, k, stats, tr, tc, masks)
        if ctx.direct:
            out = _forward_direct(q, k, stats, masks, tr, tc)
            ctx.save_for_backward(q, k, out)
            ctx.stats, ctx.masks, ctx.tr, ctx.tc = stats, masks, tr, tc
            return out
        acc = _accumulate_dtype(q.dtype)
        qa, ka = q.to(acc), k.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        n_stats = len(stats)
        out = torch.full((n_stats, n), _NEG_INF, dtype=acc, device=q.device)
        for r0 in range(0, n, tr):
            r1 = min(n, r0 + tr)
            qb = qa[r0:r1]
            for c0 in range(0, m, tc):
                c1 = min(m, c0 + tc)
                x = _tile(qb, ka[c0:c1], None, None, masks, r0, r1, c0, c1)
                for s, stat in enumerate(stats):
                    last = s == n_stats - 1
                    y = _stat_view(x, stat, last, r0, r1, c0, c1)
                    if y is x and not last:
                        y = x.clone()  # _lse may work in place
                    run = out[s, r0:r1]
                    torch.logaddexp(run, _lse(y, 1), out=run)
        ctx.save_for_backward(q, k, out)
        ctx.stats, ctx.masks, ctx.tr, ctx.tc = stats, masks, tr, tc
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, out = ctx.saved_tensors
        stats, masks, tr, tc = ctx.stats, ctx.masks, ctx.tr, ctx.tc
        acc = out.dtype
        qa, ka = q.to(acc), k.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        need_q, need_k = ctx.needs_input_grad[:2]
        if ctx.direct:
            dq, dk = _backward_direct(q, k, stats, masks, tr, tc, out, g.to(acc), need_q, need_k)
            return (None if dq is None else dq.to(q.dtype), None if dk is None else dk.to(k.dtype),
                    None, None, None, None)
        dq = torch.zeros_like(qa) if need_q else None
        dk = torch.zeros_like(ka) if need_k else None
        g = g.to(acc)
        used = [s for s in range(len(stats)) if bool(g[s].any())]
        if used and (dq is not None or dk is not None):
            lse = _finite_or_zero(out)
            # fold the scale into the row weight: d/dX exp-term is a_s g_si exp(a_s X - L_si)
            gs = g * torch.tensor([float(st.scale) for st in stats], dtype=acc, device=g.device)[:, None]
            for r0 in range(0, n, tr):
                r1 = min(n, r0 + tr)
                qb = qa[r0:r1]
                for c0 in range(0, m, tc):
                    c1 = min(m, c0 + tc)
                    kb = ka[c0:c1]
                    x = _tile(qb, kb, None, None, masks, r0, r1, c0, c1)
                    dx = None
                    for pos, s in enumerate(used):
                        last = pos == len(used) - 1
                        y = _stat_view(x, stats[s], last, r0, r1, c0, c1)
                        if y is x and not last:
                            y = x.clone()
                        y.sub_(lse[s, r0:r1, None]).exp_().mul_(gs[s, r0:r1, None])
                        dx = y if dx is None else dx.add_(y)
                    if dq is not None:
                        dq[r0:r1].addmm_(dx, kb)
                    if dk is not None:
                        dk[c0:c1].addmm_(dx.T, qb)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None, None, None, None,
        )


def tiled_multi_logsumexp(
    q: Tensor,
    k: Tensor,
    stats: Sequence[LSEStat],
    *,
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
) -> Tensor:
    """Row log-sum-exps of ``scale_s * (q @ k.T)`` for each statistic, in one tile walk.

    ``masks`` drop entries from every statistic; each :class:`LSEStat` may drop more.
    Returns an ``(S, N)`` tensor (float32, or float64 for float64 inputs), exact and
    differentiable in ``q`` and ``k``; a row with every entry dropped gets ``-inf`` for
    that statistic (and no gradient).

    Example::

        beta = 0.5
        hi, lo = tiled_multi_logsumexp(q, k, [LSEStat(1 + beta), LSEStat(beta)])
        # log sum_j exp((1+beta) X_ij) and log sum_j exp(beta X_ij)
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"tiled_multi_logsumexp needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    stats = tuple(s if isinstance(s, LSEStat) else LSEStat(*s) for s in stats)
    if not stats:
        raise ValueError("tiled_multi_logsumexp needs at least one statistic")
    for s in stats:
        if not isinstance(s.scale, (int, float)) or not (0.0 < float(s.scale) < float("inf")):
            raise ValueError(f"LSEStat scale must be a positive finite number, got {s.scale!r}")
    n, m = q.shape[0], k.shape[0]
    for mask in list(masks) + [mm for s in stats for mm in s.masks]:
        mask.check(n, m, q.device)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    stats = tuple(LSEStat(float(s.scale), tuple(s.masks)) for s in stats)
    return _TiledMultiLSE.apply(q, k, stats, tuple(masks), tr, tc)
