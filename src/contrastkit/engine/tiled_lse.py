"""The exact tiled log-sum-exp over a logit matrix that is never materialised.

For anchors Q (N x d) and candidates K (M x d) the logits are

    X_ij = q_i . k_j + r_i + c_j        (r, c optional row / column offsets)

with entries dropped by masks (``-inf``). This module computes

    lse_row_i = log sum_j exp(X_ij)     and, when symmetric,
    lse_col_j = log sum_i exp(X_ij)

walking tiles of X. The forward pass keeps only the running row / column
statistics, O(N + M); the backward pass recomputes each tile and forms

    dX_ij = g_i exp(X_ij - lse_row_i) + h_j exp(X_ij - lse_col_j)

then dQ = dX K, dK = dX^T Q, dr = row sums, dc = column sums.

Every objective of the InfoNCE family is this LSE plus an O(N d) positive term
(the temperature / scale is folded into Q by the caller, so autograd gives its
gradient for free), which is why this one Function is the engine.

Example::

    q, k = torch.randn(4096, 256), torch.randn(4096, 256)
    lse_row, lse_col = tiled_logsumexp(q / 0.05, k, symmetric=True)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .masks import TileMask
from .positives import positive_logits
from .tiling import TileSize, choose_tile

__all__ = ["tiled_logsumexp", "tiled_logsumexp_with_positives"]

_NEG_INF = float("-inf")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Limits:
    """Numerical limits per accumulation dtype.

    ``flush``: exponents below ``-flush`` are clamped there before ``exp``; their
    terms (at most e^-80 in float32, e^-700 in float64, relative to the row maximum
    of 1) are far below rounding, and clamping keeps ``exp`` out of denormals (100x
    slower on CPUs) and maps masked ``-inf`` entries to a term that is numerically 0.
    ``col_floor``: a column sum rebuilt from row-stabilised terms below this is
    recomputed exactly (its own maximum) instead of trusting it.
    ``pair_range``: the fused symmetric backward needs |lse_row_i - lse_col_j| below
    this within a tile; otherwise the tile takes the two-exponential path.
    ``direct``: when every logit is provably within +-direct (from the row / column
    norms and biases), exp(X) neither overflows nor leaves the normal range, so no
    stabiliser, clamp or running maximum is needed: the *direct* regime, which
    saves half the element-wise passes. Cosine logits at temperature >= 1/32 in
    float32 are in it.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype == torch.float64:
            self.flush, self.col_floor, self.pair_range, self.direct = 700.0, 1e-250, 600.0, 300.0
        else:
            self.flush, self.col_floor, self.pair_range, self.direct = 80.0, 1e-20, 40.0, 32.0


class _Tiles:
    """Walks the tiles of X = Q K^T + r 1^T + 1 c^T into one reused buffer.

    Reusing the buffer (``mm(out=...)``) avoids a fresh multi-megabyte allocation,
    and its page faults, for every tile.
    """

    def __init__(self, q, k, row_bias, col_bias, masks, tr, tc, n_buffers=1, scale=None):
        acc = _accumulate_dtype(q.dtype)
        self.q, self.k = q.to(acc), k.to(acc)
        # per-row scale (N,) or None: X = diag(scale) Q K^T, applied to one row block at a time
        self.scale = None if scale is None else scale.to(acc).expand(self.q.shape[0])
        self._block = (None, None)
        self.rb = None if row_bias is None else row_bias.to(acc)
        self.cb = None if col_bias is None else col_bias.to(acc)
        self.masks, self.tr, self.tc = masks, tr, tc
        self.n, self.m = self.q.shape[0], self.k.shape[0]
        self.buffers = [torch.empty(tr * tc, dtype=acc, device=q.device) for _ in range(n_buffers)]

    def rows(self, r0, r1):
        """Scaled anchor rows [r0, r1) (cached while the column loop runs)."""
        if self.scale is None:
            return self.q[r0:r1]
        if self._block[0] != (r0, r1):
            self._block = ((r0, r1), self.q[r0:r1] * self.scale[r0:r1, None])
        return self._block[1]

    def logit_bound(self) -> float:
        """An upper bound of |X_ij| over the whole matrix: max|s q| max|k| + max|r| + max|c|."""
        qn = self.q.norm(dim=1)
        if self.scale is not None:
            qn = qn * self.scale.abs()
        bound = qn.max() * self.k.norm(dim=1).max()
        for b in (self.rb, self.cb):
            if b is not None:
                bound = bound + b.abs().max()
        return float(bound)

    def view(self, which, rows, cols):
        return self.buffers[which][: rows * cols].view(rows, cols)

    def __iter__(self):
        for r0 in range(0, self.n, self.tr):
            r1 = min(self.n, r0 + self.tr)
            for c0 in range(0, self.m, self.tc):
                c1 = min(self.m, c0 + self.tc)
                yield r0, r1, c0, c1, self.logits(r0, r1, c0, c1)

    def logits(self, r0, r1, c0, c1):
        x = torch.mm(self.rows(r0, r1), self.k[c0:c1].T, out=self.view(0, r1 - r0, c1 - c0))
        if self.rb is not None:
            x += self.rb[r0:r1, None]
        if self.cb is not None:
            x += self.cb[None, c0:c1]
        for m in self.masks:
            if m.touches(r0, r1, c0, c1):
                m.apply_(x, r0, r1, c0, c1)
        return x


def _finite_or_zero(v: Tensor) -> Tensor:
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _tile(qb: Tensor, kb: Tensor, rb: Optional[Tensor], cb: Optional[Tensor],
          masks: Sequence[TileMask], r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """Logits of the tile rows [r0, r1) x columns [c0, c1) in a fresh tensor."""
    x = qb @ kb.T
    if rb is not None:
        x += rb[r0:r1, None]
    if cb is not None:
        x += cb[None, c0:c1]
    for m in masks:
        if m.touches(r0, r1, c0, c1):
            m.apply_(x, r0, r1, c0, c1)
    return x


def _lse(x: Tensor, dim: int, flush: float = 80.0) -> Tensor:
    """Exact log-sum-exp along ``dim`` (-inf for all -inf slices); consumes ``x``."""
    m = x.amax(dim, keepdim=True)
    finite = torch.isfinite(m)
    m = torch.where(finite, m, torch.zeros_like(m))
    s = x.sub_(m).clamp_min_(-flush).exp_().sum(dim, keepdim=True)
    out = s.log_().add_(m)
    return torch.where(finite, out, torch.full_like(out, _NEG_INF)).squeeze(dim)


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
    row = torch.where(finite, row, torch.full_like(row, _NEG_INF))
    if not symmetric:
        return row, None
    top = m.max()
    w = torch.where(finite, (m - top).exp(), torch.zeros_like(m))
    colsum = torch.mv(e.T, w)
    col = colsum.log().add_(top)
    if bool((colsum < lim.col_floor).any()):
        col = _lse(tiles.logits(r0, r1, c0, c1), 0, lim.flush)
    return row, col


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, col_bias, scale, index, masks, symmetric, tr, tc):
        tiles = _Tiles(q, k, row_bias, col_bias, masks, tr, tc, scale=scale)
        lim = _Limits(tiles.q.dtype)
        acc = tiles.q.dtype
        direct = tiles.logit_bound() <= lim.direct
        if direct:
            # |X| is bounded: plain sums of exp(X), no stabiliser.
            sum_r = torch.zeros(tiles.n, dtype=acc, device=q.device)
            sum_c = torch.zeros(tiles.m if symmetric else 0, dtype=acc, device=q.device)
            ones = torch.ones(tr, dtype=acc, device=q.device)
            for r0, r1, c0, c1, x in tiles:
                e = x.exp_()
                sum_r[r0:r1] += e.sum(1)
                if symmetric:  # a matrix-vector product sums columns faster than sum(0)
                    sum_c[c0:c1].addmv_(e.T, ones[: r1 - r0])
            lse_r, lse_c = sum_r.log_(), sum_c.log_()
        else:
            lse_r = torch.full((tiles.n,), _NEG_INF, dtype=acc, device=q.device)
            lse_c = torch.full((tiles.m if symmetric else 0,), _NEG_INF, dtype=acc, device=q.device)
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
        tiles = _Tiles(q, k, row_bias, col_bias, ctx.masks, ctx.tr, ctx.tc, n_buffers=2, scale=scale)
        lim = _Limits(tiles.q.dtype)
        acc, n, m = tiles.q.dtype, tiles.n, tiles.m
        use_r = g_r is not None and bool(g_r.any())
        use_c = ctx.symmetric and g_c is not None and bool(g_c.any())
        # dq accumulates the gradient with respect to the scaled rows s q
        dq = torch.zeros_like(tiles.q) if (need_q or need_s) else None
        dk = torch.zeros_like(tiles.k) if need_k else None
        drb = torch.zeros(n, dtype=acc, device=q.device) if need_rb else None
        dcb = torch.zeros(m, dtype=acc, device=q.device) if need_cb else None
        if use_r or use_c:
            lr = _finite_or_zero(lse_r)
            gr = torch.where(torch.isfinite(lse_r), g_r.to(acc), torch.zeros_like(lr)) if use_r else torch.zeros_like(lr)
            if use_c:
                lc = _finite_or_zero(lse_c)
                gc = torch.where(torch.isfinite(lse_c), g_c.to(acc), torch.zeros_like(lc))
            direct = ctx.direct
            if direct:
                # P_ij = exp(X_ij) exp(-lse_i): fold exp(-lse) into the row / column weights.
                gr = gr * torch.where(torch.isfinite(lse_r), (-lr).exp(), torch.zeros_like(lr))
                if use_c:
                    gc = gc * torch.where(torch.isfinite(lse_c), (-lc).exp(), torch.zeros_like(lc))
            # Row-only: dX = diag(g) P, so g is applied to O(N d) operands, not to tiles.
            fold_rows = not use_c
            if fold_rows:
                gq = tiles.q * (gr if tiles.scale is None else gr * tiles.scale)[:, None]
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
                if dq is not None:
                    dq[r0:r1].addmm_(dx, tiles.k[c0:c1])
                if dk is not None:
                    dk[c0:c1].addmm_(dx.T, tiles.rows(r0, r1))
                if drb is not None:
                    drb[r0:r1] += dx.sum(1)
                if dcb is not None:
                    dcb[c0:c1] += dx.sum(0)
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
        dscale = None
        if dq is not None and tiles.scale is not None:
            # X = s_i q_i . k_j: d/ds_i = q_i . dX_i K, and d/dq_i = s_i dX_i K
            if need_s:
                per_row = torch.bmm(tiles.q.unsqueeze(1), dq.unsqueeze(2)).reshape(n)
                dscale = per_row.sum().reshape(scale.shape) if scale.numel() == 1 else per_row
                dscale = dscale.to(scale.dtype)
            dq = dq.mul_(tiles.scale[:, None]) if need_q else None
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if drb is None else drb.to(row_bias.dtype),
            None if dcb is None else dcb.to(col_bias.dtype),
            dscale,
            None, None, None, None, None,
        )


def _check_problem(q, k, row_bias, col_bias, scale, masks) -> Tuple[int, int]:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled_logsumexp needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n, m = q.shape[0], k.shape[0]
    for name, b, size in (("row_bias", row_bias, n), ("col_bias", col_bias, m)):
        if b is not None and (b.dim() != 1 or b.shape[0] != size):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(b.shape)}")
    if scale is not None and (scale.dim() > 1 or scale.numel() not in (1, n)):
        raise ValueError(f"scale must be a scalar or have shape ({n},), got {tuple(scale.shape)}")
    for mask in masks:
        mask.check(n, m, q.device)
    return n, m


def tiled_logsumexp(
    q: Tensor,
    k: Tensor,
    *,
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
    scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) log-sum-exp of ``s q @ k.T + row_bias[:, None] + col_bias[None, :]``.

    ``scale`` (a scalar tensor or one per row, (N,); differentiable) multiplies the
    anchors inside the engine, one row block at a time, so that ``q / temperature`` is
    never materialised; its gradient is the O(N d) ``sum_i q_i . (dX K)_i``.

    Exact, differentiable in ``q``, ``k`` and the biases, and memory-bounded: no
    N x M matrix is kept, only tiles of ``tile_size`` (see :func:`choose_tile`).
    Masked entries are left out; a row whose entries are all masked gets ``-inf``
    (and no gradient). Returns ``(lse_rows (N,), lse_cols (M,) or None)`` in float32
    (float64 for float64 inputs; bfloat16 / float16 inputs are accumulated in float32).
    """
    n, m = _check_problem(q, k, row_bias, col_bias, scale, masks)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
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
    scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """:func:`tiled_logsumexp` plus the positive logits ``s_i q_i . k_{positives_i}``
    (0 where ``positives_i == -1``) from the same Function, so that their backward adds
    into the engine's gradient buffers in place instead of allocating N x d terms.

    Returns ``(lse_rows, lse_cols or None, positive_logits)``. The positive logits do not
    include ``row_bias``.

    Example::

        lse, _, pos = tiled_logsumexp_with_positives(q, k, torch.arange(len(q)), scale=torch.tensor(20.0))
        loss = (lse - pos).mean()
    """
    n, m = _check_problem(q, k, row_bias, col_bias, scale, masks)
    if positives.dim() != 1 or positives.shape[0] != n:
        raise ValueError(f"positives must have shape ({n},), got {tuple(positives.shape)}")
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    lse_r, lse_c, pos = _TiledLSE.apply(q, k, row_bias, col_bias, scale, positives.long(), tuple(masks),
                                        bool(symmetric), tr, tc)
    return lse_r, (lse_c if symmetric else None), pos.to(q.dtype)
