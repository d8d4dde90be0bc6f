"""NT-Xent (SimCLR, Chen et al. 2020): two views of N samples, 2N anchors.

Each of the 2N views is an anchor; its positive is the other view of the same
sample, its negatives the other 2N - 2 views (itself is masked):

    loss_i = -s z_i . z_{i'} + log sum_{j != i} exp(s z_i . z_j),  mean over 2N rows

Example::

    loss = ck.losses.NTXent(temperature=0.5)(view1, view2)
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from ..engine import DiagonalMask
from ..engine.tiling import TileSize
from ._rows import check_margin
from .common import Temperature, index_target_loss, inverse_temperature, prepare

__all__ = ["nt_xent", "NTXent"]


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: Union[float, Tensor] = 0.5, similarity: str = "cosine",
            tile_size: TileSize = None, margin: float = 0.0) -> Tensor:
    """NT-Xent over two views ``z1``, ``z2`` (N, d); see the module docstring.

    ``margin`` > 0 subtracts an additive margin (similarity units) from each positive
    similarity before scaling, in the numerator and the denominator (NT-Xent-AM).

    Example::

        nt_xent(torch.randn(16, 8), torch.randn(16, 8), temperature=0.5)
    """
    a, b = prepare(similarity, z1=z1, z2=z2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"z1 and z2 must hold the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    z = torch.cat([a, b])
    idx = torch.arange(n, device=z.device)
    positives = torch.cat([idx + n, idx])
    scale = inverse_temperature(temperature, z)
    margin = check_margin(margin)
    shift = margin * scale.expand(2 * n) if margin else None
    return index_target_loss(z, z, positives, masks=[DiagonalMask(0)], tile_size=tile_size, shift=shift,
                             scale=scale)


class NTXent(nn.Module):
    """SimCLR's NT-Xent loss: ``forward(z1, z2)`` with the 2N views, self masked.

    Example::

        loss = NTXent(temperature=0.5)(proj(aug1(x)), proj(aug2(x)))
    """

    def __init__(self, temperature: float = 0.5, learn_temperature: bool = False, similarity: str = "cosine",
                 tile_size: TileSize = None, margin: float = 0.0) -> None:
        super().__init__()
        self.temperature = Temperature(temperature, learnable=learn_temperature)
        self.similarity = similarity
        self.tile_size = tile_size
        self.margin = check_margin(margin)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, temperature=self.temperature(), similarity=self.similarity,
                       tile_size=self.tile_size, margin=self.margin)
