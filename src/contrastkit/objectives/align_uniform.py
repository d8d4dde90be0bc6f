"""Alignment and uniformity (Wang & Isola 2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere").

    alignment(x, y)  = mean_i ||x_i - y_i||^alpha                           (alpha = 2)
    uniformity(x)    = log mean_{i<j} exp(-t ||x_i - x_j||^2)               (t = 2)

The mean over pairs i < j equals the mean over all ordered pairs i != j, so the
uniformity is a log-mean-exp over a Gaussian tile with the diagonal masked:
-t||a - b||^2 = 2t a.b - t|a|^2 - t|b|^2 is a dot product with row and column
offsets, i.e. :func:`contrastkit.engine.tiled_logsumexp` with a ``DiagonalMask``.
Exact for any N, O(N d) memory.

The paper's combined loss (its reference code) is
``alignment(x, y) + lam * (uniformity(x) + uniformity(y)) / 2`` on L2-normalised
features: :func:`align_uniform` / :class:`AlignUniform`.

Everything L2-normalises its inputs by default (``normalize=True``, the paper's
setting, like ``similarity="cosine"`` elsewhere); ``normalize=False`` takes the
features as given. The ``*_metric`` helpers return floats without gradient, for
diagnostics.

Example::

    import torch, contrastkit as ck
    from contrastkit.objectives.align_uniform import uniformity_metric
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    loss = ck.functional.align_uniform(x, y)
    print(uniformity_metric(x))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..engine import DiagonalMask, tiled_logsumexp
from ..engine.tiling import TileSize
from ..validation import check_choice, check_embeddings, check_number, check_pair
from .base import Objective, Work

CITATION = """@inproceedings{wang2020hypersphere,
  title     = {Understanding Contrastive Representation Learning through Alignment and Uniformity on the Hypersphere},
  author    = {Wang, Tongzhou and Isola, Phillip},
  booktitle = {ICML},
  year      = {2020},
  note      = {arXiv:2005.10242}
}"""

__all__ = [
    "CITATION",
    "alignment",
    "uniformity",
    "align_uniform",
    "Alignment",
    "Uniformity",
    "AlignUniform",
    "alignment_metric",
    "uniformity_metric",
]


def _positive_number(name: str, value) -> float:
    return check_number(name, value, strict=True)


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0, normalize: bool = True,
              reduction: str = "mean") -> Tensor:
    """Mean over positive pairs of ``||x_i - y_i||^alpha`` (x, y: (N, d), row i paired with row i).

    ``reduction``: ``"mean"`` (the paper's), ``"sum"`` or ``"none"`` (per pair).

    Example::

        import torch, contrastkit as ck
        x, y = torch.randn(8, 4), torch.randn(8, 4)
        ck.functional.alignment(x, y)          # normalised: in [0, 4]
    """
    alpha = _positive_number("alpha", alpha)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_embeddings("x", x)
    check_embeddings("y", y)
    check_pair("x", x, "y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of rows (positive pairs), got {x.shape[0]} and {y.shape[0]}")
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    sq = (x - y).pow(2).sum(1)
    if alpha != 2.0:
        # ||d||^alpha = (||d||^2)^(alpha/2); its gradient at d = 0 is taken as 0 (no NaN for alpha <= 1)
        tiny = torch.finfo(sq.dtype).tiny
        sq = torch.where(sq > 0, sq.clamp(min=tiny).pow(alpha / 2), torch.zeros_like(sq))
    return sq if reduction == "none" else sq.mean() if reduction == "mean" else sq.sum()


def uniformity(x: Tensor, *, t: float = 2.0, normalize: bool = True, tile_size: TileSize = None) -> Tensor:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the rows of ``x`` (N >= 2), exact and tiled.

    Example::

        import torch, contrastkit as ck
        ck.functional.uniformity(torch.randn(64, 8))   # about -3.6 for uniform points on S^7
    """
    t = _positive_number("t", t)
    check_embeddings("x", x)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 rows (it averages over pairs), got {n}")
    if normalize:
        x = l2_normalize(x)
    sq = x.pow(2).sum(-1) * (-t)
    lse_r, _ = tiled_logsumexp(x * (2.0 * t), x, row_bias=sq, col_bias=sq, masks=[DiagonalMask(0)],
                               tile_size=tile_size)
    return torch.logsumexp(lse_r, 0) - math.log(n * (n - 1))


def align_uniform(x: Tensor, y: Tensor, *, alpha: float = 2.0, t: float = 2.0, uniformity_weight: float = 1.0,
                  normalize: bool = True, tile_size: TileSize = None) -> Tensor:
    """Wang & Isola's combined loss: ``alignment(x, y) + lam * (uniformity(x) + uniformity(y)) / 2``.

    Example::

        import torch, contrastkit as ck
        x, y = torch.randn(32, 8), torch.randn(32, 8)
        ck.functional.align_uniform(x, y, uniformity_weight=1.0)
    """
    lam = float(uniformity_weight)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"uniformity_weight must be a finite number >= 0, got {uniformity_weight!r}")
    a = alignment(x, y, alpha=alpha, normalize=normalize)
    u = 0.5 * (uniformity(x, t=t, normalize=normalize, tile_size=tile_size)
               + uniformity(y, t=t, normalize=normalize, tile_size=tile_size))
    return a + lam * u


@torch.no_grad()
def alignment_metric(x: Tensor, y: Tensor, *, alpha: float = 2.0, normalize: bool = True) -> float:
    """Alignment of paired embeddings as a float (no gradient; L2-normalised by default).

    Example::

        import torch
        from contrastkit.objectives.align_uniform import alignment_metric
        query_emb = torch.randn(32, 8)
        assert alignment_metric(query_emb, query_emb) == 0.0     # 0 = perfectly aligned
        assert alignment_metric(query_emb, -query_emb) == 4.0    # 4 = opposite
    """
    return float(alignment(x.detach(), y.detach(), alpha=alpha, normalize=normalize))


@torch.no_grad()
def uniformity_metric(x: Tensor, *, t: float = 2.0, normalize: bool = True, tile_size: TileSize = None) -> float:
    """Uniformity of embeddings as a float (no gradient; L2-normalised by default).

    Example::

        import torch
        from contrastkit.objectives.align_uniform import uniformity_metric
        doc_emb = torch.randn(64, 8)
        collapsed = doc_emb[:1] + 1e-3 * torch.randn(64, 8)     # all near one point
        assert uniformity_metric(doc_emb) < uniformity_metric(collapsed)   # lower = more uniform
    """
    return float(uniformity(x.detach(), t=t, normalize=normalize, tile_size=tile_size))


class Alignment(Objective):
    """Alignment loss module: ``forward(x, y)``; see :func:`alignment`.

    Example::

        import torch, contrastkit as ck
        x = torch.randn(8, 4, requires_grad=True)
        ck.losses.Alignment(alpha=2)(x, torch.randn(8, 4)).backward()
    """

    citation = CITATION

    def __init__(self, *, alpha: float = 2.0, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.alpha, self.normalize = _positive_number("alpha", alpha), bool(normalize)

    @property
    def work(self) -> Work:
        return Work(rows=("x", "y"), positives="aligned", scale=None)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return alignment(x, y, alpha=self.alpha, normalize=self.normalize, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, normalize={self.normalize}, reduction={self.reduction!r}"


class Uniformity(Objective):
    """Uniformity loss module: ``forward(x)``; see :func:`uniformity` (a log-mean over all
    pairs: ``reduction`` is ``"mean"`` only).

    Example::

        import torch, contrastkit as ck
        z = torch.randn(32, 8, requires_grad=True)
        ck.losses.Uniformity(t=2)(z).backward()
    """

    citation = CITATION
    reductions = ("mean",)

    def __init__(self, *, t: float = 2.0, normalize: bool = True, tile_size: TileSize = None,
                 reduction: str = "mean") -> None:
        super().__init__(tile_size=tile_size, reduction=reduction)
        self.t, self.normalize = _positive_number("t", t), bool(normalize)

    @property
    def work(self) -> Work:
        return Work(rows=("x",), positives="none", self_position=True, scale="kernel")

    def forward(self, x: Tensor) -> Tensor:
        return uniformity(x, t=self.t, normalize=self.normalize, tile_size=self.tile_size)

    def extra_repr(self) -> str:
        return f"t={self.t}, normalize={self.normalize}"


class AlignUniform(Objective):
    """Alignment + weighted uniformity of both sides (Wang & Isola 2020): ``forward(x, y)``.

    ``normalize=True`` (default, as everywhere) L2-normalises both sides, as the paper trains.
    ``reduction`` is ``"mean"`` only (uniformity is a log-mean over pairs).

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.AlignUniform(alpha=2, t=2, uniformity_weight=1.0)
        x1 = torch.randn(16, 8, requires_grad=True)
        loss_fn(x1, x1 + 0.1 * torch.randn(16, 8)).backward()
    """

    citation = CITATION
    reductions = ("mean",)

    def __init__(self, *, alpha: float = 2.0, t: float = 2.0, uniformity_weight: float = 1.0, normalize: bool = True,
                 tile_size: TileSize = None, reduction: str = "mean") -> None:
        super().__init__(tile_size=tile_size, reduction=reduction)
        self.alpha, self.t = _positive_number("alpha", alpha), _positive_number("t", t)
        self.uniformity_weight = check_number("uniformity_weight", uniformity_weight)
        self.normalize = bool(normalize)

    @property
    def work(self) -> Work:
        return Work(rows=("x", "y"), positives="aligned", self_position=True, scale="kernel")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return align_uniform(x, y, alpha=self.alpha, t=self.t, uniformity_weight=self.uniformity_weight,
                             normalize=self.normalize, tile_size=self.tile_size)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, t={self.t}, uniformity_weight={self.uniformity_weight}, normalize={self.normalize}"
