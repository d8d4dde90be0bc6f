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
from .tiling import TileSize, choose_tile

__all__ = ["tiled_logsumexp"]

_NEG_INF = float("-inf")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(qb: Tensor, kb: Tensor, rb: Optional[Tensor], cb: Optional[Tensor],
          masks: Sequence[TileMask], r0: int, r1: int, c0: int, c1: int) -> Tensor:
    """Logits of the tile rows [r0, r1) x columns [c0, c1)."""
    x = qb @ kb.T
    if rb is not None:
        x += rb[r0:r1, None]
    if cb is not None:
        x += cb[None, c0:c1]
    for m in masks:
        if m.touches(r0, r1, c0, c1):
            m.apply_(x, r0, r1, c0, c1)
    return x


def _lse(x: Tensor, dim: int) -> Tensor:
    """log-sum-exp along ``dim`` that returns -inf (not NaN) for all -inf slices."""
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (x - m).exp_().sum(dim)
    return s.log_().add_(m.squeeze(dim))


def _safe(lse: Tensor) -> Tensor:
    """Replace -inf (rows with nothing in the denominator) by 0 to avoid inf - inf."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, col_bias, masks, symmetric, tr, tc):
        acc = _accumulate_dtype(q.dtype)
        qa, ka = q.to(acc), k.to(acc)
        rb = None if row_bias is None else row_bias.to(acc)
        cb = None if col_bias is None else col_bias.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        lse_r = torch.full((n,), _NEG_INF, dtype=acc, device=q.device)
        lse_c = torch.full((m if symmetric else 0,), _NEG_INF, dtype=acc, device=q.device)
        for r0 in range(0, n, tr):
            r1 = min(n, r0 + tr)
            qb = qa[r0:r1]
            run = lse_r[r0:r1]
            for c0 in range(0, m, tc):
                c1 = min(m, c0 + tc)
                x = _tile(qb, ka[c0:c1], rb, cb, masks, r0, r1, c0, c1)
                torch.logaddexp(run, _lse(x, 1), out=run)
                if symmetric:
                    cs = lse_c[c0:c1]
                    torch.logaddexp(cs, _lse(x, 0), out=cs)
        ctx.save_for_backward(q, k, row_bias, col_bias, lse_r, lse_c)
        ctx.masks, ctx.symmetric, ctx.tr, ctx.tc = masks, symmetric, tr, tc
        if not symmetric:
            ctx.mark_non_differentiable(lse_c)
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r, g_c):
        q, k, row_bias, col_bias, lse_r, lse_c = ctx.saved_tensors
        masks, symmetric, tr, tc = ctx.masks, ctx.symmetric, ctx.tr, ctx.tc
        acc = lse_r.dtype
        qa, ka = q.to(acc), k.to(acc)
        rb = None if row_bias is None else row_bias.to(acc)
        cb = None if col_bias is None else col_bias.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        use_r = g_r is not None and bool(g_r.any())
        use_c = symmetric and g_c is not None and bool(g_c.any())
        need_q, need_k, need_rb, need_cb = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(qa) if need_q else None
        dk = torch.zeros_like(ka) if need_k else None
        drb = torch.zeros(n, dtype=acc, device=q.device) if need_rb else None
        dcb = torch.zeros(m, dtype=acc, device=q.device) if need_cb else None
        if use_r or use_c:
            lr = _safe(lse_r)
            gr = g_r.to(acc) if use_r else None
            if use_c:
                lc = _safe(lse_c)
                gc = g_c.to(acc)
            for r0 in range(0, n, tr):
                r1 = min(n, r0 + tr)
                qb = qa[r0:r1]
                for c0 in range(0, m, tc):
                    c1 = min(m, c0 + tc)
                    kb = ka[c0:c1]
                    x = _tile(qb, kb, rb, cb, masks, r0, r1, c0, c1)
                    if use_c:
                        dx = (x - lc[None, c0:c1]).exp_().mul_(gc[None, c0:c1])
                        if use_r:
                            x.sub_(lr[r0:r1, None]).exp_().mul_(gr[r0:r1, None])
                            dx.add_(x)
                    else:
                        dx = x.sub_(lr[r0:r1, None]).exp_().mul_(gr[r0:r1, None])
                    if dq is not None:
                        dq[r0:r1].addmm_(dx, kb)
                    if dk is not None:
                        dk[c0:c1].addmm_(dx.T, qb)
                    if drb is not None:
                        drb[r0:r1] += dx.sum(1)
                    if dcb is not None:
                        dcb[c0:c1] += dx.sum(0)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if drb is None else drb.to(row_bias.dtype),
            None if dcb is None else dcb.to(col_bias.dtype),
            None, None, None, None,
        )


def tiled_logsumexp(
    q: Tensor,
    k: Tensor,
    *,
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) log-sum-exp of ``q @ k.T + row_bias[:, None] + col_bias[None, :]``.

    Exact, differentiable in ``q``, ``k`` and the biases, and memory-bounded: no
    N x M matrix is kept, only tiles of ``tile_size`` (see :func:`choose_tile`).
    Masked entries are left out; a row whose entries are all masked gets ``-inf``
    (and no gradient). Returns ``(lse_rows (N,), lse_cols (M,) or None)`` in float32
    (float64 for float64 inputs; bfloat16 / float16 inputs are accumulated in float32).
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled_logsumexp needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n, m = q.shape[0], k.shape[0]
    for name, b, size in (("row_bias", row_bias, n), ("col_bias", col_bias, m)):
        if b is not None and (b.dim() != 1 or b.shape[0] != size):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(b.shape)}")
    for mask in masks:
        mask.check(n, m, q.device)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    lse_r, lse_c = _TiledLSE.apply(q, k, row_bias, col_bias, tuple(masks), bool(symmetric), tr, tc)
    return lse_r, (lse_c if symmetric else None)
