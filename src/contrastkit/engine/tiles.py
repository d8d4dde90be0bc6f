"""The one tile walker of the engine and the helpers every autograd Function shares.

Every Function of the engine (:mod:`.tiled_lse`, :mod:`.multi_lse`, :mod:`.tiled_pairwise`,
:mod:`.tiled_softplus`) reduces tiles of the same matrix

    X_ij = s_i q_i . k_j + r_i + c_j          (entries dropped by masks: -inf)

with ``s`` the scale (1 / temperature: none, one number, or one per anchor row) and
``r``, ``c`` optional row / column offsets. :class:`Tiles` walks X tile by tile into
one reused buffer; the Functions only say what to do with each tile. The scale is
applied to one row block of Q at a time (``q / temperature`` is never materialised)
and its exact gradient is the O(N d) :func:`scale_grad`.

Example::

    import torch
    from contrastkit.engine.tiles import Tiles
    q, k = torch.randn(300, 16), torch.randn(500, 16)
    tiles = Tiles(q, k, scale=torch.tensor(10.0), tile=(128, 256))
    total = sum(float(x.exp().sum()) for *_, x in tiles)    # sum_ij exp(10 q_i . k_j)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .masks import TileMask

__all__ = ["Tiles", "Limits", "accumulate_dtype", "finite_or_zero", "lse", "as_scale", "scale_grad",
           "check_problem", "stable_softplus", "NEG_INF"]

NEG_INF = float("-inf")

Scale = Union[None, float, Tensor]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype tiles are accumulated in: float64 for float64 inputs, float32 otherwise
    (bfloat16 / float16 inputs are summed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_or_zero(v: Tensor) -> Tensor:
    """``v`` with its non-finite entries (``-inf`` of an all-dropped row) replaced by 0."""
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


class Limits:
    """Numerical limits per accumulation dtype.

    ``flush``: exponents below ``-flush`` are clamped there before ``exp``; their terms
    (at most e^-80 in float32, e^-700 in float64, relative to the row maximum of 1) are
    far below rounding, and clamping keeps ``exp`` out of denormals (100x slower on CPUs)
    and maps masked ``-inf`` entries to a term that is numerically 0.
    ``col_floor``: a column sum rebuilt from row-stabilised terms below this is recomputed
    exactly (its own maximum) instead of trusting it.
    ``pair_range``: the fused symmetric backward needs |lse_row_i - lse_col_j| below this
    within a tile; otherwise the tile takes the two-exponential path.
    ``direct``: when every logit is provably within +-direct (:meth:`Tiles.logit_bound`),
    exp(X) neither overflows nor leaves the normal range even summed over 2^31 terms, so no
    stabiliser, clamp or running maximum is needed: the *direct* regime, which saves half
    the element-wise passes. Cosine logits at temperature >= 1/32 in float32 are in it.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype == torch.float64:
            self.flush, self.col_floor, self.pair_range, self.direct = 700.0, 1e-250, 600.0, 300.0
        else:
            self.flush, self.col_floor, self.pair_range, self.direct = 80.0, 1e-20, 40.0, 32.0


def lse(x: Tensor, dim: int, flush: float = 80.0) -> Tensor:
    """Exact log-sum-exp of ``x`` along ``dim`` (``-inf`` for all ``-inf`` slices); consumes
    ``x`` (it is overwritten)."""
    m = x.amax(dim, keepdim=True)
    finite = torch.isfinite(m)
    m = torch.where(finite, m, torch.zeros_like(m))
    s = x.sub_(m).clamp_min_(-flush).exp_().sum(dim, keepdim=True)
    out = s.log_().add_(m)
    return torch.where(finite, out, torch.full_like(out, NEG_INF)).squeeze(dim)


def stable_softplus(u: Tensor) -> Tensor:
    """``softplus(u) = log(1 + e^u)`` as ``log1p(exp(-|u|)) + max(u, 0)``: finite for every
    finite ``u`` in every dtype (``log1p(exp(u))`` overflows above 88.7 in float32), and
    exact to rounding (no threshold switch). Out of place; differentiable by autograd
    (d/du = sigmoid(u))."""
    return torch.log1p(torch.exp(-u.abs())).add_(u.clamp(min=0))


def as_scale(scale: Scale, n: int, like: Tensor) -> Optional[Tensor]:
    """Validate the ``scale=`` argument of an engine Function and return it as a tensor.

    ``scale`` is None (no scale), a python number, a 0-dim / one-element tensor (possibly
    requiring grad: a learnable 1 / temperature) or an (N,) tensor (one per anchor row).
    Raises ValueError for another shape, a non-floating tensor or a non-finite number.
    """
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if not scale.dtype.is_floating_point:
            raise ValueError(f"scale must be a floating tensor, got {scale.dtype}")
        if scale.dim() > 1 or scale.numel() not in (1, n):
            raise ValueError(f"scale must be a number, a scalar tensor or have shape ({n},), "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"scale is on {scale.device} but q is on {like.device}")
        return scale
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or a tensor, got {type(scale).__name__}") from None
    if not (abs(s) < float("inf")):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return torch.tensor(s, dtype=accumulate_dtype(like.dtype), device=like.device)


def scale_grad(q: Tensor, dq: Tensor, scale: Optional[Tensor], need_scale: bool,
               need_q: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Turn ``dq``, the gradient with respect to the scaled rows ``s_i q_i``, into
    ``(d/dq, d/ds)``: ``d/dq_i = s_i dq_i`` and ``d/ds_i = q_i . dq_i`` (summed over rows for a
    scalar scale). ``q`` is in the accumulation dtype; ``dq`` is consumed."""
    if scale is None:
        return (dq if need_q else None), None
    n = q.shape[0]
    dscale = None
    if need_scale:
        per_row = torch.bmm(q.unsqueeze(1), dq.unsqueeze(2)).reshape(n)
        dscale = (per_row.sum() if scale.numel() == 1 else per_row).reshape(scale.shape).to(scale.dtype)
    s = scale.to(dq.dtype).reshape(-1)
    return (dq.mul_(s[:, None]) if need_q else None), dscale


def check_problem(name: str, q: Tensor, k: Tensor, row_bias: Optional[Tensor] = None,
                  col_bias: Optional[Tensor] = None, masks: Sequence[TileMask] = ()) -> Tuple[int, int]:
    """Shapes of an engine call: q (N, d), k (M, d), row_bias (N,), col_bias (M,), masks that fit."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"{name} needs q (N, d) and k (M, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n, m = q.shape[0], k.shape[0]
    for bname, b, size in (("row_bias", row_bias, n), ("col_bias", col_bias, m)):
        if b is not None and (b.dim() != 1 or b.shape[0] != size):
            raise ValueError(f"{bname} must have shape ({size},), got {tuple(b.shape)}")
    for mask in masks:
        mask.check(n, m, q.device)
    return n, m


class Tiles:
    """Walks the tiles of X = diag(s) Q K^T + r 1^T + 1 c^T (masked entries -inf).

    ``tile`` is the (rows, cols) shape from :func:`contrastkit.engine.choose_tile`. Tiles
    are written into ``n_buffers`` reused buffers (``mm(out=...)``: no fresh multi-megabyte
    allocation and its page faults per tile); buffer 0 holds the tile being yielded, the
    others are scratch space for the caller (:meth:`view`). Iterating yields
    ``(r0, r1, c0, c1, x)`` with ``x`` the tile of rows [r0, r1) and columns [c0, c1);
    ``x`` is only valid until the next step. :attr:`touched` says whether a mask dropped
    entries of the last tile.
    """

    def __init__(self, q: Tensor, k: Tensor, row_bias: Optional[Tensor] = None, col_bias: Optional[Tensor] = None,
                 masks: Sequence[TileMask] = (), tile: Tuple[int, int] = (1024, 2048), n_buffers: int = 1,
                 scale: Optional[Tensor] = None) -> None:
        acc = accumulate_dtype(q.dtype)
        self.q, self.k = q.to(acc), k.to(acc)
        self.n, self.m = self.q.shape[0], self.k.shape[0]
        # per-row scale (N,) or None, applied to one row block at a time
        self.scale = None if scale is None else scale.detach().to(acc).reshape(-1).expand(self.n)
        self.rb = None if row_bias is None else row_bias.to(acc)
        self.cb = None if col_bias is None else col_bias.to(acc)
        self.masks = tuple(masks)
        self.tr, self.tc = max(1, min(tile[0], self.n)), max(1, min(tile[1], self.m))
        self.buffers = [torch.empty(self.tr * self.tc, dtype=acc, device=q.device) for _ in range(n_buffers)]
        self._block: Tuple[Optional[Tuple[int, int]], Optional[Tensor]] = (None, None)
        self.touched = False

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def rows(self, r0: int, r1: int) -> Tensor:
        """Scaled anchor rows ``s_i q_i`` for i in [r0, r1) (cached while the column loop runs)."""
        if self.scale is None:
            return self.q[r0:r1]
        if self._block[0] != (r0, r1):
            self._block = ((r0, r1), self.q[r0:r1] * self.scale[r0:r1, None])
        return self._block[1]

    def scaled_q(self) -> Tensor:
        """All scaled anchor rows (N, d): for the O(N d) operands of a backward pass."""
        return self.q if self.scale is None else self.q * self.scale[:, None]

    def logit_bound(self) -> float:
        """An upper bound of |X_ij| over the whole matrix: max|s_i| |q_i| max|k_j| + max|r| + max|c|."""
        if self.n == 0 or self.m == 0:
            return 0.0
        qn = self.q.norm(dim=1)
        if self.scale is not None:
            qn = qn * self.scale.abs()
        bound = qn.max() * self.k.norm(dim=1).max()
        for b in (self.rb, self.cb):
            if b is not None:
                bound = bound + b.abs().max()
        return float(bound)

    def direct(self, factor: float = 1.0) -> bool:
        """Whether ``factor * |X|`` provably stays within :attr:`Limits.direct` (the direct
        regime: ``exp`` without stabiliser)."""
        return self.logit_bound() * factor <= Limits(self.dtype).direct

    def view(self, which: int, rows: int, cols: int) -> Tensor:
        """A (rows, cols) view of reused buffer ``which``."""
        return self.buffers[which][: rows * cols].view(rows, cols)

    def __iter__(self):
        for r0 in range(0, self.n, self.tr):
            r1 = min(self.n, r0 + self.tr)
            for c0 in range(0, self.m, self.tc):
                c1 = min(self.m, c0 + self.tc)
                yield r0, r1, c0, c1, self.logits(r0, r1, c0, c1)

    def logits(self, r0: int, r1: int, c0: int, c1: int, buffer: int = 0) -> Tensor:
        """The tile rows [r0, r1) x columns [c0, c1) of X, written into buffer ``buffer``."""
        x = torch.mm(self.rows(r0, r1), self.k[c0:c1].T, out=self.view(buffer, r1 - r0, c1 - c0))
        if self.rb is not None:
            x += self.rb[r0:r1, None]
        if self.cb is not None:
            x += self.cb[None, c0:c1]
        self.touched = False
        for mask in self.masks:
            if mask.touches(r0, r1, c0, c1):
                mask.apply_(x, r0, r1, c0, c1)
                self.touched = True
        return x

    def accumulate(self, dx: Tensor, r0: int, r1: int, c0: int, c1: int, dq: Optional[Tensor],
                   dk: Optional[Tensor], drb: Optional[Tensor] = None, dcb: Optional[Tensor] = None) -> None:
        """Add a tile's dX into dq (w.r.t. the scaled rows), dk and the bias gradients."""
        if dq is not None:
            dq[r0:r1].addmm_(dx, self.k[c0:c1])
        if dk is not None:
            dk[c0:c1].addmm_(dx.T, self.rows(r0, r1))
        if drb is not None:
            drb[r0:r1] += dx.sum(1)
        if dcb is not None:
            dcb[c0:c1] += dx.sum(0)
