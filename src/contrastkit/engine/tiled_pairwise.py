"""Exact tiled sums of element-wise functions of the logit matrix, never materialised.

For anchors Q (N x d) and candidates K (M x d) the base tile is

    U_ij = q_i . k_j + r_i + c_j              (r, c optional row / column offsets)

and a :class:`TileOp` turns each tile of U into S element-wise tiles V^s (for
instance SigLIP's ``softplus(U)``, a target-weighted kernel ``w_ij X(U_ij)`` or a
kernel ``X(U_ij)`` whose log-sum-exp is wanted). :func:`tiled_pairwise` reduces
each of them over the columns (and, on request, over the rows):

    out_s[i] = sum_j V^s_ij            ("sum" outputs)
    out_s[i] = log sum_j exp(V^s_ij)   ("lse" outputs; running max, exact)

The forward pass keeps only these O(S (N + M)) statistics. The backward pass
recomputes each tile, forms the coefficient of each output

    C^s_ij = g^s_i                     ("sum")
    C^s_ij = g^s_i exp(V^s_ij - out_s[i])   ("lse")   (+ the column terms)

lets the op turn them into dU_ij = sum_s C^s_ij dV^s_ij / dU_ij, and forms
dQ = dU K, dK = dU^T Q, dr = row sums, dc = column sums. Peak extra memory is
O((N + M) d + a few tiles).

Per-tile inputs of an op (targets from labels, teacher embeddings, neighbour lists)
are small tensors (N, ...) that the op turns into a tile of weights on the fly
(:class:`TileWeights`), so no N x M weight matrix exists either. Ops and weights
carry no gradient: teachers are frozen.

Entries dropped by masks (:mod:`contrastkit.engine.masks`) contribute 0 to "sum"
outputs and ``exp(-inf) = 0`` to "lse" outputs, and receive no gradient.

A temperature / scale is folded into Q by the caller (so autograd gives its
gradient); a scalar bias can be passed as ``row_bias=b.expand(N)``.

Example::

    from contrastkit.engine.tiled_pairwise import Softplus, tiled_pairwise
    diag = torch.arange(len(x))
    rows, _ = tiled_pairwise(x / 0.1, y, Softplus(diag), row_bias=b.expand(len(x)))
    loss = rows[0].sum()          # sum_ij -log sigmoid(z_ij (x_i . y_j / 0.1 + b))
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .masks import TileMask
from .tiling import TileSize, choose_tile

__all__ = [
    "tiled_pairwise",
    "TileOp",
    "Softplus",
    "KernelStats",
    "TileWeights",
    "LabelWeights",
    "IndexWeights",
    "SoftmaxWeights",
    "KERNELS",
]

_NEG_INF = float("-inf")
KERNELS = ("linear", "student_t")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse(x: Tensor, dim: int) -> Tensor:
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).exp_().sum(dim).log_().add_(m.squeeze(dim))


def _safe(lse: Tensor) -> Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _diagonal_cells(offset: int, r0: int, r1: int, c0: int, c1: int):
    """Local (rows, cols) of the entries (i, i + offset) inside a tile, or None."""
    lo = max(r0, c0 - offset)
    hi = min(r1, c1 - offset)
    if hi <= lo:
        return None
    rows = torch.arange(lo - r0, hi - r0)
    return rows, rows + (r0 + offset - c0)


# --------------------------------------------------------------------------- weights


class TileWeights:
    """Target weights w_ij given per tile from small inputs (never an N x M tensor)."""

    def tile(self, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        raise NotImplementedError

    def check(self, n_rows: int, n_cols: int) -> None:
        """Raise ValueError when the weights do not fit an n_rows x n_cols problem."""


def _zero_self(w: Tensor, offset: Optional[int], r0, r1, c0, c1) -> Tensor:
    if offset is None:
        return w
    cells = _diagonal_cells(offset, r0, r1, c0, c1)
    if cells is not None:
        rows, cols = cells
        w[rows.to(w.device), cols.to(w.device)] = 0
    return w


class LabelWeights(TileWeights):
    """w_ij = row_scale_i if label_i == label_j (and j != i + self_offset), else 0.

    With ``row_scale = 1 / count_i`` this is the uniform distribution over the
    positives of row i (SupCon's / I-Con's label supervision).
    """

    def __init__(self, row_labels: Tensor, col_labels: Tensor, row_scale: Tensor,
                 self_offset: Optional[int] = None) -> None:
        self.row_labels, self.col_labels = row_labels, col_labels
        self.row_scale, self.self_offset = row_scale, self_offset

    def check(self, n_rows, n_cols):
        if self.row_labels.shape != (n_rows,) or self.col_labels.shape != (n_cols,) \
                or self.row_scale.shape != (n_rows,):
            raise ValueError(f"LabelWeights do not fit a {n_rows} x {n_cols} problem")

    def tile(self, r0, r1, c0, c1, dtype, device):
        same = self.row_labels[r0:r1, None] == self.col_labels[None, c0:c1]
        w = same.to(dtype) * self.row_scale[r0:r1, None].to(dtype)
        return _zero_self(w, self.self_offset, r0, r1, c0, c1)


class IndexWeights(TileWeights):
    """w_ij = row_scale_i for the listed columns ``columns[i]`` (N, k), -1 = none."""

    def __init__(self, columns: Tensor, row_scale: Tensor) -> None:
        if columns.dim() == 1:
            columns = columns[:, None]
        self.columns, self.row_scale = columns.long(), row_scale

    def check(self, n_rows, n_cols):
        c = self.columns
        if c.dim() != 2 or c.shape[0] != n_rows or self.row_scale.shape != (n_rows,):
            raise ValueError(f"IndexWeights columns must have shape ({n_rows}, k), got {tuple(c.shape)}")
        if c.numel() and (int(c.max()) >= n_cols or int(c.min()) < -1):
            raise ValueError(f"IndexWeights columns must lie in [-1, {n_cols})")

    def tile(self, r0, r1, c0, c1, dtype, device):
        w = torch.zeros(r1 - r0, c1 - c0, dtype=dtype, device=device)
        cols = self.columns[r0:r1]
        inside = (cols >= c0) & (cols < c1)
        if bool(inside.any()):
            rows, which = inside.nonzero(as_tuple=True)
            vals = self.row_scale[r0:r1].to(dtype)[rows]
            w.index_put_((rows, cols[rows, which] - c0), vals, accumulate=True)
        return w


class SoftmaxWeights(TileWeights):
    """w_ij = exp(a_i . b_j - lse_i): a row softmax of teacher logits (``a`` already
    scaled by 1 / teacher temperature), with ``lse`` its row log-sum-exp (computed by
    the caller, e.g. with :func:`tiled_logsumexp`). Entry (i, i + self_offset) is 0."""

    def __init__(self, a: Tensor, b: Tensor, row_lse: Tensor, self_offset: Optional[int] = None) -> None:
        self.a, self.b, self.row_lse, self.self_offset = a, b, row_lse, self_offset

    def check(self, n_rows, n_cols):
        if self.a.shape[0] != n_rows or self.b.shape[0] != n_cols or self.row_lse.shape != (n_rows,):
            raise ValueError(f"SoftmaxWeights do not fit a {n_rows} x {n_cols} problem")

    def tile(self, r0, r1, c0, c1, dtype, device):
        acc = _accumulate_dtype(self.a.dtype)
        t = self.a[r0:r1].to(acc) @ self.b[c0:c1].to(acc).T
        t.sub_(self.row_lse[r0:r1, None].to(acc)).exp_()
        return _zero_self(t.to(dtype), self.self_offset, r0, r1, c0, c1)


# --------------------------------------------------------------------------- ops


class TileOp:
    """Element-wise statistics of a tile of U. Subclasses set ``reductions`` (one of
    "sum" / "lse" per output) and ``differentiable`` (False: no gradient flows from
    that output, e.g. a teacher entropy), and implement :meth:`values` / :meth:`grad`."""

    reductions: Tuple[str, ...] = ("sum",)
    differentiable: Tuple[bool, ...] = (True,)

    def check(self, n_rows: int, n_cols: int) -> None:
        pass

    def values(self, u: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tuple[List[Tensor], Any]:
        """Element-wise output tiles (same shape as ``u``) and a context for :meth:`grad`."""
        raise NotImplementedError

    def grad(self, u: Tensor, ctx: Any, vals: List[Tensor], coefs: List[Optional[Tensor]]) -> Tensor:
        """dU = sum_s coefs[s] * dV^s/dU (``coefs[s]`` None: that output has no gradient)."""
        raise NotImplementedError


class Softplus(TileOp):
    """SigLIP's pairwise term: V = -log sigmoid(z U) with z = +1 at the positive cell
    (i, positives[i]) of each row (-1: none) and z = -1 elsewhere, i.e.
    V = softplus(U) off the positives and softplus(-U) on them, computed stably
    (no cancellation for confident pairs); dV/dU = sigmoid(U) - [positive].

    Without ``positives`` every pair is a negative: V = softplus(U).
    """

    reductions = ("sum",)
    differentiable = (True,)

    def __init__(self, positives: Optional[Tensor] = None) -> None:
        self.positives = None if positives is None else positives.long()

    def check(self, n_rows, n_cols):
        p = self.positives
        if p is not None:
            if p.shape != (n_rows,):
                raise ValueError(f"Softplus positives must have shape ({n_rows},), got {tuple(p.shape)}")
            if p.numel() and (int(p.max()) >= n_cols or int(p.min()) < -1):
                raise ValueError(f"Softplus positives must lie in [-1, {n_cols})")

    def _cells(self, r0, r1, c0, c1):
        if self.positives is None:
            return None
        cols = self.positives[r0:r1]
        inside = (cols >= c0) & (cols < c1)
        if not bool(inside.any()):
            return None
        rows = inside.nonzero().squeeze(1)
        return rows, cols[rows] - c0

    @staticmethod
    def _softplus(u: Tensor) -> Tensor:
        return torch.log1p(torch.exp(-u.abs())).add_(u.clamp(min=0))

    def values(self, u, r0, r1, c0, c1):
        v = self._softplus(u)
        cells = self._cells(r0, r1, c0, c1)
        if cells is not None:
            v[cells] = self._softplus(-u[cells])
        return [v], cells

    def grad(self, u, ctx, vals, coefs):
        s = torch.sigmoid(u)
        if ctx is not None:
            s[ctx] = -torch.sigmoid(-u[ctx])
        return s.mul_(coefs[0])


class KernelStats(TileOp):
    """Statistics of a kernel X = f(U) with optional target weights w (a :class:`TileWeights`):

    - ``sum_j w_ij X_ij``         (when ``weights`` is given; "sum")
    - ``log sum_j exp(X_ij)``     (when ``lse``; "lse")
    - ``sum_j w_ij log w_ij``     (when ``weight_entropy``; "sum", no gradient)

    in this order. Kernels: ``"linear"`` X = U (scaled dot, cosine, or the Gaussian
    kernel written as a dot with row / column offsets), ``"student_t"``
    X = -log(1 + ||a - b||^2) with U = -||a - b||^2 / 2 (pass q = a, k = b,
    r = -|a|^2 / 2, c = -|b|^2 / 2).
    """

    def __init__(self, kernel: str = "linear", weights: Optional[TileWeights] = None, lse: bool = False,
                 weight_entropy: bool = False) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if weight_entropy and weights is None:
            raise ValueError("weight_entropy needs weights")
        self.kernel, self.weights, self.lse, self.weight_entropy = kernel, weights, bool(lse), bool(weight_entropy)
        red, diff = [], []
        if weights is not None:
            red.append("sum"), diff.append(True)
        if lse:
            red.append("lse"), diff.append(True)
        if weight_entropy:
            red.append("sum"), diff.append(False)
        if not red:
            raise ValueError("KernelStats needs weights or lse=True")
        self.reductions, self.differentiable = tuple(red), tuple(diff)

    def check(self, n_rows, n_cols):
        if self.weights is not None:
            self.weights.check(n_rows, n_cols)

    def _kernel(self, u: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.kernel == "linear":
            return u, None
        d2 = u.mul(-2.0).clamp_(min=0)
        return torch.log1p(d2).neg_(), d2

    def values(self, u, r0, r1, c0, c1):
        x, d2 = self._kernel(u)
        out = []
        w = None
        if self.weights is not None:
            w = self.weights.tile(r0, r1, c0, c1, u.dtype, u.device)
            out.append(w * x)
        if self.lse:
            out.append(x)
        if self.weight_entropy:
            out.append(torch.special.xlogy(w, w))
        return out, (w, d2)

    def grad(self, u, ctx, vals, coefs):
        w, d2 = ctx
        total = None
        s = 0
        if self.weights is not None:
            if coefs[0] is not None:
                total = coefs[0] * w
            s = 1
        if self.lse and coefs[s] is not None:
            total = coefs[s] if total is None else total + coefs[s]
        if total is None:
            return torch.zeros_like(u)
        if total.shape != u.shape:
            total = total.expand_as(u).clone()
        if self.kernel == "student_t":
            total = total * (2.0 / (1.0 + d2))
        return total


# --------------------------------------------------------------------------- engine


def _drop_tile(masks: Sequence[TileMask], r0, r1, c0, c1, dtype, device) -> Optional[Tensor]:
    touching = [m for m in masks if m.touches(r0, r1, c0, c1)]
    if not touching:
        return None
    z = torch.zeros(r1 - r0, c1 - c0, dtype=dtype, device=device)
    for m in touching:
        m.apply_(z, r0, r1, c0, c1)
    return torch.isinf(z)


def _base(qb, kb, rb, cb, r0, r1, c0, c1):
    u = qb @ kb.T
    if rb is not None:
        u += rb[r0:r1, None]
    if cb is not None:
        u += cb[None, c0:c1]
    return u


def _masked_values(op, u, drop, r0, r1, c0, c1):
    vals, ctx = op.values(u, r0, r1, c0, c1)
    if drop is not None:
        vals = [v.masked_fill(drop, 0.0 if red == "sum" else _NEG_INF) for v, red in zip(vals, op.reductions)]
    return vals, ctx


class _TiledPairwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, col_bias, op, masks, columns, tr, tc):
        acc = _accumulate_dtype(q.dtype)
        qa, ka = q.to(acc), k.to(acc)
        rb = None if row_bias is None else row_bias.to(acc)
        cb = None if col_bias is None else col_bias.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        S = len(op.reductions)
        init = [0.0 if red == "sum" else _NEG_INF for red in op.reductions]
        rows = torch.stack([torch.full((n,), v, dtype=acc, device=q.device) for v in init])
        cols = torch.stack([torch.full((m if columns else 0,), v, dtype=acc, device=q.device) for v in init])
        for r0 in range(0, n, tr):
            r1 = min(n, r0 + tr)
            qb = qa[r0:r1]
            for c0 in range(0, m, tc):
                c1 = min(m, c0 + tc)
                u = _base(qb, ka[c0:c1], rb, cb, r0, r1, c0, c1)
                drop = _drop_tile(masks, r0, r1, c0, c1, acc, q.device)
                vals, _ = _masked_values(op, u, drop, r0, r1, c0, c1)
                for s in range(S):
                    v = vals[s]
                    if op.reductions[s] == "sum":
                        rows[s, r0:r1] += v.sum(1)
                        if columns:
                            cols[s, c0:c1] += v.sum(0)
                    else:
                        run = rows[s, r0:r1]
                        torch.logaddexp(run, _lse(v, 1), out=run)
                        if columns:
                            cs = cols[s, c0:c1]
                            torch.logaddexp(cs, _lse(v, 0), out=cs)
        ctx.save_for_backward(q, k, row_bias, col_bias, rows, cols)
        ctx.op, ctx.masks, ctx.columns, ctx.tr, ctx.tc = op, masks, columns, tr, tc
        if not columns:
            ctx.mark_non_differentiable(cols)
        return rows, cols

    @staticmethod
    def backward(ctx, g_rows, g_cols):
        q, k, row_bias, col_bias, rows, cols = ctx.saved_tensors
        op, masks, columns, tr, tc = ctx.op, ctx.masks, ctx.columns, ctx.tr, ctx.tc
        acc = rows.dtype
        qa, ka = q.to(acc), k.to(acc)
        rb = None if row_bias is None else row_bias.to(acc)
        cb = None if col_bias is None else col_bias.to(acc)
        n, m = qa.shape[0], ka.shape[0]
        S = len(op.reductions)
        use_r = [g_rows is not None and op.differentiable[s] and bool(g_rows[s].any()) for s in range(S)]
        use_c = [columns and g_cols is not None and op.differentiable[s] and bool(g_cols[s].any())
                 for s in range(S)]
        need_q, need_k, need_rb, need_cb = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(qa) if need_q else None
        dk = torch.zeros_like(ka) if need_k else None
        drb = torch.zeros(n, dtype=acc, device=q.device) if need_rb else None
        dcb = torch.zeros(m, dtype=acc, device=q.device) if need_cb else None
        if any(use_r) or any(use_c):
            gr = g_rows.to(acc) if any(use_r) else None
            gc = g_cols.to(acc) if any(use_c) else None
            lr = _safe(rows)
            lc = _safe(cols) if columns else None
            for r0 in range(0, n, tr):
                r1 = min(n, r0 + tr)
                qb = qa[r0:r1]
                for c0 in range(0, m, tc):
                    c1 = min(m, c0 + tc)
                    kb = ka[c0:c1]
                    u = _base(qb, kb, rb, cb, r0, r1, c0, c1)
                    drop = _drop_tile(masks, r0, r1, c0, c1, acc, q.device)
                    vals, octx = _masked_values(op, u, drop, r0, r1, c0, c1)
                    coefs: List[Optional[Tensor]] = []
                    for s in range(S):
                        c = None
                        if op.reductions[s] == "sum":
                            if use_r[s]:
                                c = gr[s, r0:r1, None]
                            if use_c[s]:
                                cc = gc[s, None, c0:c1]
                                c = cc if c is None else c + cc
                        else:
                            if use_r[s]:
                                c = (vals[s] - lr[s, r0:r1, None]).exp_().mul_(gr[s, r0:r1, None])
                            if use_c[s]:
                                cc = (vals[s] - lc[s, None, c0:c1]).exp_().mul_(gc[s, None, c0:c1])
                                c = cc if c is None else c.add_(cc)
                        coefs.append(c)
                    du = op.grad(u, octx, vals, coefs)
                    if du.shape != u.shape:
                        du = du.expand_as(u).clone()
                    if drop is not None:
                        du = du.masked_fill(drop, 0.0)
                    if dq is not None:
                        dq[r0:r1].addmm_(du, kb)
                    if dk is not None:
                        dk[c0:c1].addmm_(du.T, qb)
                    if drb is not None:
                        drb[r0:r1] += du.sum(1)
                    if dcb is not None:
                        dcb[c0:c1] += du.sum(0)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if drb is None else drb.to(row_bias.dtype),
            None if dcb is None else dcb.to(col_bias.dtype),
            None, None, None, None, None,
        )


def tiled_pairwise(
    q: Tensor,
    k: Tensor,
    op: TileOp,
    *,
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    masks: Sequence[TileMask] = (),
    columns: bool = False,
    tile_size: TileSize = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) reductions of ``op`` over ``U = q @ k.T + row_bias[:, None] + col_bias[None, :]``.

    Exact, differentiable in ``q``, ``k`` and the biases, memory-bounded (tiles of
    ``tile_size``, see :func:`choose_tile`). Returns ``(rows (S, N), cols (S, M) or None)``
    with one line per output of ``op``, in float32 (float64 for float64 inputs).

    Example::

        rows, _ = tiled_pairwise(x, y, Softplus())
        total = rows[0].sum()                       # sum_ij softplus(x_i . y_j)
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"tiled_pairwise needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(op, TileOp):
        raise ValueError(f"op must be a TileOp, got {type(op).__name__}")
    n, m = q.shape[0], k.shape[0]
    for name, b, size in (("row_bias", row_bias, n), ("col_bias", col_bias, m)):
        if b is not None and (b.dim() != 1 or b.shape[0] != size):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(b.shape)}")
    for mask in masks:
        mask.check(n, m, q.device)
    op.check(n, m)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    rows, cols = _TiledPairwise.apply(q, k, row_bias, col_bias, op, tuple(masks), bool(columns), tr, tc)
    return rows, (cols if columns else None)
