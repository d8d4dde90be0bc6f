"""Several log-sum-exp statistics of one logit matrix in a single pass over its tiles.

For anchors Q (N x d), candidates K (M x d) and X_ij = s_i q_i . k_j (``s`` the optional
``scale=``, 1 / temperature; entries dropped by the shared ``masks`` set to ``-inf``),
statistic t is, per row i,

    L_ti = log sum_{j not dropped by stat t} exp(a_t X_ij)

with a factor ``a_t`` (a positive number) and extra masks of its own. Objectives that
need more than the plain denominator use it:

- hard-negative reweighting (Robinson et al. 2021): log sum exp((1 + beta) X) and
  log sum exp(beta X) over the negatives;
- SupCon L_in / SupCon with a margin: the log-sum-exp over the positives only and over
  the negatives only (complementary label masks) in one walk.

Each tile is computed once per pass for all statistics by the engine's walker
(:class:`contrastkit.engine.tiles.Tiles`). The forward pass keeps only the (T, N)
results; the backward pass recomputes each tile and forms

    dX_ij = sum_t g_ti a_t exp(a_t X_ij - L_ti)        (0 where stat t drops (i, j))

then dQ = diag(s) dX K, dK = dX^T diag(s) Q, ds_i = q_i . (dX K)_i. Exact, O(T N + M)
saved state, never N x M. When every ``a_t X`` is provably small (the direct regime of
:class:`contrastkit.engine.tiles.Limits`) the sums of exp need no stabiliser.

The plain single-statistic case is :func:`contrastkit.engine.tiled_logsumexp`.

Example::

    import torch
    from contrastkit.engine import DiagonalMask, LSEStat, tiled_multi_logsumexp
    q, k = torch.randn(512, 64), torch.randn(512, 64)
    out = tiled_multi_logsumexp(q, k, [LSEStat(2.0), LSEStat(1.0)], masks=[DiagonalMask()], scale=0.5)
    # out[0] = logsumexp(2 * 0.5 X), out[1] = logsumexp(0.5 X), self excluded
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor

from .masks import TileMask
from .tiles import NEG_INF, Limits, Scale, Tiles, as_scale, check_problem, finite_or_zero, lse, scale_grad
from .tiling import TileSize, choose_tile

__all__ = ["LSEStat", "tiled_multi_logsumexp"]


class LSEStat(NamedTuple):
    """One statistic: ``log sum_j exp(scale * X_ij)`` over the entries its ``masks`` keep
    (``scale`` here is the statistic's own factor a_t, applied on top of the call's ``scale=``)."""

    scale: float = 1.0
    masks: Tuple[TileMask, ...] = ()


def _stat_tile(tiles: Tiles, x: Tensor, stat: LSEStat, buffer, r0, r1, c0, c1) -> Tensor:
    """``a_t x`` with the statistic's masks, in place in x (``buffer=None``: x is not needed
    afterwards) or in scratch buffer ``buffer``."""
    y = x if buffer is None else tiles.view(buffer, r1 - r0, c1 - c0).copy_(x)
    if stat.scale != 1.0:
        y.mul_(stat.scale)
    for m in stat.masks:
        if m.touches(r0, r1, c0, c1):
            m.apply_(y, r0, r1, c0, c1)
    return y


def _scratch(pos: int, count: int):
    # the last statistic consumes the tile itself; the first uses scratch 1, the others 2
    return None if pos == count - 1 else (1 if pos == 0 else 2)


class _TiledMultiLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, stats, masks, tr, tc, count):
        tiles = Tiles(q, k, None, None, masks, (tr, tc), n_buffers=2 if len(stats) > 1 else 1, scale=scale)
        lim = Limits(tiles.dtype)
        direct = tiles.direct(max(s.scale for s in stats))
        T = len(stats)
        if direct:
            out = torch.zeros((T, tiles.n), dtype=tiles.dtype, device=q.device)
        else:
            out = torch.full((T, tiles.n), NEG_INF, dtype=tiles.dtype, device=q.device)
        kept = torch.zeros(tiles.n, dtype=torch.int64, device=q.device) if count else None
        for r0, r1, c0, c1, x in tiles:
            if kept is not None:  # before the statistics consume the tile: entries the shared masks keep
                kept[r0:r1] += (x != NEG_INF).sum(1)
            for t, stat in enumerate(stats):
                y = _stat_tile(tiles, x, stat, None if t == T - 1 else 1, r0, r1, c0, c1)
                if direct:
                    out[t, r0:r1] += y.exp_().sum(1)
                else:
                    run = out[t, r0:r1]
                    torch.logaddexp(run, lse(y, 1, lim.flush), out=run)
        if direct:
            out.log_()
        ctx.save_for_backward(q, k, scale, out)
        ctx.stats, ctx.masks, ctx.tr, ctx.tc, ctx.direct = stats, masks, tr, tc, direct
        if kept is None:
            return out
        ctx.mark_non_differentiable(kept)
        return out, kept

    @staticmethod
    def backward(ctx, g, *_count_grad):
        q, k, scale, out = ctx.saved_tensors
        stats = ctx.stats
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        tiles = Tiles(q, k, None, None, ctx.masks, (ctx.tr, ctx.tc), n_buffers=3, scale=scale)
        lim = Limits(tiles.dtype)
        dq = torch.zeros_like(tiles.q) if (need_q or need_s) else None
        dk = torch.zeros_like(tiles.k) if need_k else None
        fin = torch.isfinite(out)
        factors = torch.tensor([float(st.scale) for st in stats], dtype=tiles.dtype, device=q.device)[:, None]
        # the coefficient of exp(a_t X) (direct) or exp(a_t X - L_t) (stabilised)
        coef = torch.where(fin, g.to(tiles.dtype), torch.zeros_like(out)) * factors
        lse_t = finite_or_zero(out)
        if ctx.direct:
            coef = coef * (-lse_t).exp()
        used = [t for t in range(len(stats)) if bool(coef[t].any())]
        if used and (dq is not None or dk is not None):
            for r0, r1, c0, c1, x in tiles:
                dx = None
                for pos, t in enumerate(used):
                    y = _stat_tile(tiles, x, stats[t], _scratch(pos, len(used)), r0, r1, c0, c1)
                    if not ctx.direct:
                        y.sub_(lse_t[t, r0:r1, None]).clamp_min_(-lim.flush)
                    e = y.exp_()
                    if dx is None:
                        dx = e.mul_(coef[t, r0:r1, None])
                    else:
                        dx.addcmul_(e, coef[t, r0:r1, None])
                tiles.accumulate(dx, r0, r1, c0, c1, dq, dk)
        dq, dscale = (None, None) if dq is None else scale_grad(tiles.q, dq, scale, need_s, need_q)
        return (None if dq is None else dq.to(q.dtype), None if dk is None else dk.to(k.dtype), dscale,
                None, None, None, None, None)


def tiled_multi_logsumexp(
    q: Tensor,
    k: Tensor,
    stats: Sequence[LSEStat],
    *,
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    scale: Scale = None,
    count: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Row log-sum-exps of ``a_t * X`` with ``X = s q @ k.T`` for each statistic t, in one walk.

    ``masks`` drop entries from every statistic; each :class:`LSEStat` (factor a_t, masks)
    may drop more. ``scale`` (s = 1 / temperature): a python number, a 0-dim tensor
    (possibly requiring grad) or one per anchor row (N,), applied inside the walk with its
    exact gradient. Returns a ``(T, N)`` tensor (float32, or float64 for float64 inputs),
    exact and differentiable in ``q``, ``k`` and ``scale``; a row with every entry dropped
    gets ``-inf`` for that statistic (and no gradient).

    ``count=True`` also returns, from the same walk, the number of entries of each row that
    the shared ``masks`` keep (``(N,)`` int64, no gradient; the statistics' own masks are not
    counted): ``(out, kept)``. The debiased estimator's per-row number of negatives Q_i is
    this count (:func:`contrastkit.functional.debiased_contrastive` with ``masks=``).

    Example::

        import torch
        from contrastkit.engine import DiagonalMask, LSEStat, tiled_multi_logsumexp
        q, k = torch.randn(64, 8), torch.randn(80, 8)
        beta = 0.5
        hi, lo = tiled_multi_logsumexp(q, k, [LSEStat(1 + beta), LSEStat(beta)], scale=2.0)
        # log sum_j exp((1 + beta) 2 q_i . k_j) and log sum_j exp(beta 2 q_i . k_j)
        (lse,), kept = tiled_multi_logsumexp(q, k, [LSEStat()], masks=[DiagonalMask()], count=True)
        assert kept.tolist() == [79] * 64      # every column but the diagonal one
    """
    stats = tuple(s if isinstance(s, LSEStat) else LSEStat(*s) for s in stats)
    if not stats:
        raise ValueError("tiled_multi_logsumexp needs at least one statistic")
    for s in stats:
        if not isinstance(s.scale, (int, float)) or not (0.0 < float(s.scale) < float("inf")):
            raise ValueError(f"LSEStat scale must be a positive finite number, got {s.scale!r}")
    n, m = check_problem("tiled_multi_logsumexp", q, k, None, None, list(masks) + [mm for s in stats for mm in s.masks])
    scale = as_scale(scale, n, q)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    stats = tuple(LSEStat(float(s.scale), tuple(s.masks)) for s in stats)
    return _TiledMultiLSE.apply(q, k, scale, stats, tuple(masks), tr, tc, bool(count))
