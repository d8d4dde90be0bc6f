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

The functions take features as given (the paper applies them to normalised
features); pass ``normalize=True`` to L2-normalise first. The ``*_metric`` helpers
normalise by default and return floats without gradient, for diagnostics.

Example::

    import contrastkit as ck
    loss = ck.functional.align_uniform(F.normalize(x, dim=-1), F.normalize(y, dim=-1))
    print(ck.objectives.align_uniform.uniformity_metric(emb))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..engine.normalize import l2_normalize
from ..engine import DiagonalMask, tiled_logsumexp
from ..engine.tiling import TileSize
from ..engine.validation import check_embeddings, check_pair

__all__ = [
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
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0, normalize: bool = False) -> Tensor:
    """Mean over positive pairs of ``||x_i - y_i||^alpha`` (x, y: (N, d), row i paired with row i).

    Example::

        x, y = torch.randn(8, 4), torch.randn(8, 4)
        alignment(F.normalize(x, dim=-1), F.normalize(y, dim=-1))   # in [0, 4]
    """
    alpha = _positive_number("alpha", alpha)
    check_embeddings("x", x)
    check_embeddings("y", y)
    check_pair("x", x, "y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of rows (positive pairs), got {x.shape[0]} and {y.shape[0]}")
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    sq = (x - y).pow(2).sum(1)
    if alpha == 2.0:
        return sq.mean()
    # ||d||^alpha = (||d||^2)^(alpha/2); its gradient at d = 0 is taken as 0 (no NaN for alpha <= 1)
    tiny = torch.finfo(sq.dtype).tiny
    return torch.where(sq > 0, sq.clamp(min=tiny).pow(alpha / 2), torch.zeros_like(sq)).mean()


def uniformity(x: Tensor, *, t: float = 2.0, normalize: bool = False, tile_size: TileSize = None) -> Tensor:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the rows of ``x`` (N >= 2), exact and tiled.

    Example::

        z = F.normalize(torch.randn(64, 8), dim=-1)
        uniformity(z)          # about -3.6 for uniform points on S^7; lower is more uniform
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
                  normalize: bool = False, tile_size: TileSize = None) -> Tensor:
    """Wang & Isola's combined loss: ``alignment(x, y) + lam * (uniformity(x) + uniformity(y)) / 2``.

    Example::

        x, y = F.normalize(torch.randn(32, 8), dim=-1), F.normalize(torch.randn(32, 8), dim=-1)
        align_uniform(x, y, uniformity_weight=1.0)
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

        alignment_metric(query_emb, doc_emb)      # 0 = perfectly aligned, 4 = opposite
    """
    return float(alignment(x.detach(), y.detach(), alpha=alpha, normalize=normalize))


@torch.no_grad()
def uniformity_metric(x: Tensor, *, t: float = 2.0, normalize: bool = True, tile_size: TileSize = None) -> float:
    """Uniformity of embeddings as a float (no gradient; L2-normalised by default).

    Example::

        uniformity_metric(doc_emb)                # lower = more uniform on the sphere
    """
    return float(uniformity(x.detach(), t=t, normalize=normalize, tile_size=tile_size))


class Alignment(nn.Module):
    """Alignment loss module: ``forward(x, y)``; see :func:`alignment`.

    Example::

        loss = Alignment(alpha=2)(F.normalize(x, dim=-1), F.normalize(y, dim=-1))
        loss.backward()
    """

    def __init__(self, alpha: float = 2.0, normalize: bool = False) -> None:
        super().__init__()
        self.alpha, self.normalize = _positive_number("alpha", alpha), normalize

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return alignment(x, y, alpha=self.alpha, normalize=self.normalize)


class Uniformity(nn.Module):
    """Uniformity loss module: ``forward(x)``; see :func:`uniformity`.

    Example::

        loss = Uniformity(t=2)(F.normalize(z, dim=-1))
        loss.backward()
    """

    def __init__(self, t: float = 2.0, normalize: bool = False, tile_size: TileSize = None) -> None:
        super().__init__()
        self.t, self.normalize, self.tile_size = _positive_number("t", t), normalize, tile_size

    def forward(self, x: Tensor) -> Tensor:
        return uniformity(x, t=self.t, normalize=self.normalize, tile_size=self.tile_size)


class AlignUniform(nn.Module):
    """Alignment + weighted uniformity of both sides (Wang & Isola 2020): ``forward(x, y)``.

    ``normalize=True`` (default here) L2-normalises both sides, as the paper trains.

    Example::

        loss_fn = AlignUniform(alpha=2, t=2, uniformity_weight=1.0)
        loss = loss_fn(encoder(x1), encoder(x2))
        loss.backward()
    """

    def __init__(self, alpha: float = 2.0, t: float = 2.0, uniformity_weight: float = 1.0, normalize: bool = True,
                 tile_size: TileSize = None) -> None:
        super().__init__()
        self.alpha, self.t = _positive_number("alpha", alpha), _positive_number("t", t)
        self.uniformity_weight, self.normalize, self.tile_size = float(uniformity_weight), normalize, tile_size

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return align_uniform(x, y, alpha=self.alpha, t=self.t, uniformity_weight=self.uniformity_weight,
                             normalize=self.normalize, tile_size=self.tile_size)
