"""SigLIP: the pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training").

Every (anchor, candidate) pair is an independent binary classification:

    loss = (1/N) sum_i sum_j -log sigmoid(z_ij (s x_i . y_j + b)),   s = 1 / temperature

with z_ij = +1 for the positive pair (default j = i) and -1 otherwise. As in the
paper (and open_clip's ``SigLipLoss``) it is summed over pairs and divided by the
number of anchors N. Exact and tiled: the loss
is the tiled row sum of softplus(U) over the negative pairs (positive cells masked;
:func:`contrastkit.engine.tiled_softplus.tiled_softplus_rows`, backward sigmoid(U))
plus softplus(-U) of the positive logits, an O(N d) gather; no N x M matrix is kept.

The paper initialises the learnable log-scale t' = log 10 (temperature 0.1) and the
bias b = -10; :class:`SigLIP` does the same.

Example::

    import contrastkit as ck
    loss = ck.functional.siglip(img, txt, temperature=0.1, bias=-10.0)
    loss = ck.losses.SigLIP()(img, txt)            # learnable temperature and bias
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..engine.masks import DiagonalMask, IndexMask
from ..engine.positives import positive_logits
from ..engine.tiled_softplus import tiled_softplus_rows
from ..engine.tiling import TileSize
from ..engine.validation import check_index
from .common import REDUCTIONS, Temperature, default_positives, inverse_temperature, prepare, reduce_rows

__all__ = ["siglip", "SigLIP"]


def _bias_vector(bias: Union[float, Tensor], n: int, like: Tensor) -> Tensor:
    if isinstance(bias, Tensor):
        if bias.numel() != 1:
            raise ValueError(f"bias must be a number or a scalar tensor, got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
        if not bool(torch.isfinite(bias.detach()).all()):
            raise ValueError(f"bias must be finite, got {bias.detach().item()!r}")
        if bias.device != like.device:
            raise ValueError(f"bias is on {bias.device} but the embeddings are on {like.device}")
        return bias.to(like.dtype).reshape(1).expand(n)
    try:
        b = float(bias)
    except (TypeError, ValueError):
        raise ValueError(f"bias must be a number or a tensor, got {type(bias).__name__}") from None
    if b != b or b in (float("inf"), float("-inf")):
        raise ValueError(f"bias must be finite, got {bias!r}")
    return torch.full((n,), b, dtype=like.dtype, device=like.device)


def siglip(
    x: Tensor,
    y: Tensor,
    *,
    temperature: Union[float, Tensor],
    bias: Union[float, Tensor] = -10.0,
    positives: Optional[Tensor] = None,
    similarity: str = "cosine",
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """SigLIP loss of anchors ``x`` (N, d) against candidates ``y`` (M, d); exact, tiled.

    Args:
        temperature: float, scalar tensor (learnable), or one per anchor row (N,);
            the paper's logit scale is ``1 / temperature``.
        bias: the logit bias b (float or scalar tensor, learnable).
        positives: column of each anchor's positive (LongTensor (N,), -1: the row has
            none in these candidates, all its pairs are negatives); default the
            diagonal. A rank holding a slice of the global candidates passes its
            global offset here (``arange(N) + offset``).
        similarity: ``"cosine"`` (L2-normalise) or ``"dot"`` (as given, like open_clip).
        reduction: ``"mean"`` = sum over pairs / N (the paper's), ``"sum"``, or ``"none"``
            (per-anchor sums over its M pairs).

    Example::

        x, y = torch.randn(8, 16), torch.randn(8, 16)
        siglip(x, y, temperature=0.1, bias=-10.0)
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    q, k = prepare(similarity, x=x, y=y)
    n, m = q.shape[0], k.shape[0]
    positives = check_index("positives", default_positives(positives, n, m, q.device), n, m, q.device)
    scale = inverse_temperature(temperature, q)
    b = _bias_vector(bias, n, q)
    # negatives: tiled sum of softplus(U) with the positive cells masked; positives:
    # softplus(-U_ip) from an O(N d) gather (stable, no cancellation for confident pairs)
    diagonal = n <= m and bool((positives == torch.arange(n, device=q.device)).all())
    mask = DiagonalMask(0) if diagonal else IndexMask(positives)
    rows = tiled_softplus_rows(q, k, row_bias=b, scale=scale, masks=[mask], tile_size=tile_size).to(q.dtype)
    pos = positive_logits(q, k, positives) * scale + b
    rows = rows + torch.where(positives >= 0, torch.nn.functional.softplus(-pos, threshold=1000.0),
                              torch.zeros_like(pos))
    return reduce_rows(rows, reduction)


class SigLIP(nn.Module):
    """SigLIP loss with a learnable temperature and bias (paper init: t' = log 10, b = -10).

    The temperature is log-parameterised and clamped to [0.01, 100] (see
    :class:`Temperature`); ``learnable=False`` keeps both fixed.
    ``forward(x, y, positives=None)``; see :func:`siglip`.

    Example::

        loss_fn = SigLIP()                               # temperature 0.1, bias -10
        loss = loss_fn(image_emb, text_emb)
        loss.backward()
    """

    def __init__(self, temperature: float = 0.1, bias: float = -10.0, learnable: bool = True,
                 similarity: str = "cosine", tile_size: TileSize = None) -> None:
        super().__init__()
        self.temperature = Temperature(temperature, learnable=learnable)
        b = torch.tensor(float(bias), dtype=torch.float32)
        if learnable:
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("bias", b)
        self.similarity = similarity
        self.tile_size = tile_size

    def forward(self, x: Tensor, y: Tensor, positives: Optional[Tensor] = None) -> Tensor:
        return siglip(x, y, temperature=self.temperature(), bias=self.bias, positives=positives,
                      similarity=self.similarity, tile_size=self.tile_size)

    def extra_repr(self) -> str:
        return f"bias={float(self.bias):.4g}"
