"""Exact tiled sums of element-wise functions of the logit matrix, never materialised.

For anchors Q (N x d) and candidates K (M x d) the base tile is

    U_ij = s_i q_i . k_j + r_i + c_j          (s: optional ``scale=``, 1 / temperature;
                                               r, c: optional row / column offsets)

walked by the engine's one walker (:class:`contrastkit.engine.tiles.Tiles`: reused tile
buffer, masks, in-engine scale). A :class:`TileOp` turns each tile of U into S
element-wise tiles V^s (a target-weighted kernel ``w_ij X(U_ij)``, a kernel ``X(U_ij)``
whose log-sum-exp is wanted, the entropy of the weights). :func:`tiled_pairwise` reduces
each of them over the columns (and, on request, over the rows):

    out_s[i] = sum_j V^s_ij            ("sum" outputs)
    out_s[i] = log sum_j exp(V^s_ij)   ("lse" outputs; exact)

The forward pass keeps only these O(S (N + M)) statistics; when every "lse" value is
provably within the direct range (:class:`contrastkit.engine.tiles.Limits`) the sums of
exp need no running maximum. The backward pass recomputes each tile, forms the
coefficient of each output

    C^s_ij = g^s_i                          ("sum")
    C^s_ij = g^s_i exp(V^s_ij - out_s[i])   ("lse")   (+ the column terms)

lets the op turn them into dU_ij = sum_s C^s_ij dV^s_ij / dU_ij, and forms
dQ = diag(s) dU K, dK = dU^T diag(s) Q, ds_i = q_i . (dU K)_i, dr = row sums,
dc = column sums. Peak extra memory is O((N + M) d + a few tiles).

Per-tile inputs of an op (targets from labels, teacher embeddings, neighbour lists)
are small tensors (N, ...) that the op turns into a tile of weights on the fly
(:class:`TileWeights`), so no N x M weight matrix exists either. Ops and weights
carry no gradient: teachers are frozen.

Entries dropped by masks (:mod:`contrastkit.engine.masks`) contribute 0 to "sum"
outputs and ``exp(-inf) = 0`` to "lse" outputs, and receive no gradient.

(SigLIP's softplus has its own Function, :mod:`contrastkit.engine.tiled_softplus`.)

Example::

    import torch
    from contrastkit.engine.tiled_pairwise import KernelStats, LabelWeights, tiled_pairwise
    x = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
    y = torch.randint(0, 4, (32,))
    count = (torch.bincount(y)[y] - 1).clamp(min=1).double()
    op = KernelStats("linear", weights=LabelWeights(y, y, 1.0 / count, self_offset=0), lse=True)
    rows, _ = tiled_pairwise(x, x, op, scale=10.0)
    # rows[0]_i = sum_j p_ij 10 x_i . x_j,  rows[1]_i = log sum_j exp(10 x_i . x_j)
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import math

import torch
from torch import Tensor

from .masks import TileMask, tile_diagonal
from .tiles import NEG_INF, Limits, Scale, Tiles, accumulate_dtype, as_scale, check_problem, finite_or_zero, \
    lse, scale_grad
from .tiling import TileSize, choose_tile

__all__ = [
    "tiled_pairwise",
    "TileOp",
    "KernelStats",
    "TileWeights",
    "LabelWeights",
    "IndexWeights",
    "SoftmaxWeights",
    "KERNELS",
]

KERNELS = ("linear", "student_t")


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
    cells = tile_diagonal(w, offset, r0, r1, c0, c1)
    if cells is not None:
        cells.fill_(0)
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
        acc = accumulate_dtype(self.a.dtype)
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

    def value_bound(self, u_bound: float) -> Optional[float]:
        """A bound of |V^s| for the "lse" outputs given |U| <= ``u_bound`` (None: unknown,
        the log-sum-exps are then stabilised by their running maximum)."""
        return None

    def values(self, u: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tuple[List[Tensor], Any]:
        """Element-wise output tiles (same shape as ``u``) and a context for :meth:`grad`."""
        raise NotImplementedError

    def grad(self, u: Tensor, ctx: Any, vals: List[Tensor], coefs: List[Optional[Tensor]]) -> Tensor:
        """dU = sum_s coefs[s] * dV^s/dU (``coefs[s]`` None: that output has no gradient)."""
        raise NotImplementedError


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

    def value_bound(self, u_bound):
        # linear: X = U; student_t: X = -log(1 + d2) with 0 <= d2 = -2U <= 2 |U|
        return u_bound if self.kernel == "linear" else math.log1p(2.0 * u_bound)

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
            # d/dU -log(1 + max(-2U, 0)) = 2 / (1 + d2) where U <= 0, and 0 where the clamp holds
            total = total * torch.where(u <= 0, 2.0 / (1.0 + d2), torch.zeros_like(d2))
        return total


# --------------------------------------------------------------------------- engine


def _values(op: TileOp, tiles: Tiles, u: Tensor, r0, r1, c0, c1):
    """The op's output tiles with the masked entries (``-inf`` in ``u`` from the walker) set
    to 0 ("sum") / -inf ("lse"); ``u`` itself has them replaced by 0. Returns
    (values, op context, bool tile of dropped entries or None)."""
    drop = None
    if tiles.touched:
        drop = torch.isneginf(u)
        u.masked_fill_(drop, 0.0)
    vals, octx = op.values(u, r0, r1, c0, c1)
    if drop is not None:
        vals = [v.masked_fill(drop, 0.0 if red == "sum" else NEG_INF) for v, red in zip(vals, op.reductions)]
    return vals, octx, drop


class _TiledPairwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, row_bias, col_bias, scale, op, masks, columns, tr, tc):
        tiles = Tiles(q, k, row_bias, col_bias, masks, (tr, tc), n_buffers=2, scale=scale)
        lim, acc, dev = Limits(tiles.dtype), tiles.dtype, q.device
        vb = op.value_bound(tiles.logit_bound()) if "lse" in op.reductions else None
        direct = vb is not None and vb <= lim.direct
        # "sum" outputs and direct "lse" outputs start from 0, stabilised "lse" outputs from -inf
        init = [NEG_INF if red == "lse" and not direct else 0.0 for red in op.reductions]
        rows = torch.tensor(init, dtype=acc, device=dev)[:, None].repeat(1, tiles.n)
        cols = torch.tensor(init, dtype=acc, device=dev)[:, None].repeat(1, tiles.m if columns else 0)
        for r0, r1, c0, c1, u in tiles:
            vals, _, _ = _values(op, tiles, u, r0, r1, c0, c1)
            for s, (v, red) in enumerate(zip(vals, op.reductions)):
                if red == "sum" or direct:
                    if red == "lse":
                        v = torch.exp(v, out=tiles.view(1, r1 - r0, c1 - c0))
                    rows[s, r0:r1] += v.sum(1)
                    if columns:
                        cols[s, c0:c1] += v.sum(0)
                    continue
                run = rows[s, r0:r1]
                torch.logaddexp(run, lse(tiles.view(1, r1 - r0, c1 - c0).copy_(v), 1, lim.flush), out=run)
                if columns:
                    cs = cols[s, c0:c1]
                    torch.logaddexp(cs, lse(tiles.view(1, r1 - r0, c1 - c0).copy_(v), 0, lim.flush), out=cs)
        if direct:
            for s, red in enumerate(op.reductions):
                if red == "lse":
                    rows[s].log_()
                    cols[s].log_()
        ctx.save_for_backward(q, k, row_bias, col_bias, scale, rows, cols)
        ctx.op, ctx.masks, ctx.columns, ctx.tr, ctx.tc = op, masks, columns, tr, tc
        if not columns:
            ctx.mark_non_differentiable(cols)
        return rows, cols

    @staticmethod
    def backward(ctx, g_rows, g_cols):
        q, k, row_bias, col_bias, scale, rows, cols = ctx.saved_tensors
        op, columns = ctx.op, ctx.columns
        S = len(op.reductions)
        use_r = [g_rows is not None and op.differentiable[s] and bool(g_rows[s].any()) for s in range(S)]
        use_c = [columns and g_cols is not None and op.differentiable[s] and bool(g_cols[s].any())
                 for s in range(S)]
        need_q, need_k, need_rb, need_cb, need_s = ctx.needs_input_grad[:5]
        tiles = Tiles(q, k, row_bias, col_bias, ctx.masks, (ctx.tr, ctx.tc), scale=scale)
        acc, dev, n, m = tiles.dtype, q.device, tiles.n, tiles.m
        dq = torch.zeros_like(tiles.q) if (need_q or need_s) else None
        dk = torch.zeros_like(tiles.k) if need_k else None
        drb = torch.zeros(n, dtype=acc, device=dev) if need_rb else None
        dcb = torch.zeros(m, dtype=acc, device=dev) if need_cb else None
        if any(use_r) or any(use_c):
            # an all-dropped row / column (-inf log-sum-exp) gets no gradient
            gr = torch.where(torch.isfinite(rows), g_rows.to(acc), torch.zeros_like(rows)) if any(use_r) else None
            gc = torch.where(torch.isfinite(cols), g_cols.to(acc), torch.zeros_like(cols)) if any(use_c) else None
            lr, lc = finite_or_zero(rows), finite_or_zero(cols)
            for r0, r1, c0, c1, u in tiles:
                vals, octx, drop = _values(op, tiles, u, r0, r1, c0, c1)
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
                tiles.accumulate(du, r0, r1, c0, c1, dq, dk, drb, dcb)
        dq, dscale = (None, None) if dq is None else scale_grad(tiles.q, dq, scale, need_s, need_q)
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if drb is None else drb.to(row_bias.dtype),
            None if dcb is None else dcb.to(col_bias.dtype),
            dscale,
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
    scale: Scale = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) reductions of ``op`` over ``U = s q @ k.T + row_bias[:, None] + col_bias[None, :]``.

    ``scale`` (s = 1 / temperature): a python number, a 0-dim tensor (possibly requiring
    grad) or one per anchor row (N,); it multiplies the dot product only, inside the walk,
    with its exact gradient. Exact, differentiable in ``q``, ``k``, the biases and
    ``scale``, memory-bounded (tiles of ``tile_size``, see :func:`choose_tile`). Returns
    ``(rows (S, N), cols (S, M) or None)`` with one line per output of ``op``, in float32
    (float64 for float64 inputs).

    Example::

        import torch
        from contrastkit.engine.tiled_pairwise import KernelStats, tiled_pairwise
        x, y = torch.randn(16, 4), torch.randn(24, 4)
        rows, cols = tiled_pairwise(x, y, KernelStats("linear", lse=True), columns=True, scale=0.5)
        # rows[0] = logsumexp(0.5 x @ y.T, dim=1), cols[0] = logsumexp(0.5 x @ y.T, dim=0)
    """
    if not isinstance(op, TileOp):
        raise ValueError(f"op must be a TileOp, got {type(op).__name__}")
    n, m = check_problem("tiled_pairwise", q, k, row_bias, col_bias, masks)
    scale = as_scale(scale, n, q)
    op.check(n, m)
    tr, tc = choose_tile(n, m, q.shape[1], q.device, tile_size, element_size=4)
    rows, cols = _TiledPairwise.apply(q, k, row_bias, col_bias, scale, op, tuple(masks), bool(columns), tr, tc)
    return rows, (cols if columns else None)
