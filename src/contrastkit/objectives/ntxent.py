"""NT-Xent (SimCLR, Chen et al. 2020): two views of N samples, 2N anchors.

Each of the 2N views is an anchor; its positive is the other view of the same
sample, its negatives the other 2N - 2 views (itself is masked). Rows are laid out
``[z1; z2]`` (row i is view 1 of sample i, row N + i its view 2):

    loss_i = -s z_i . z_{i'} + log sum_{j != i} exp(s z_i . z_j),  mean over 2N rows

Example::

    import torch, contrastkit as ck
    view1, view2 = torch.randn(16, 8), torch.randn(16, 8)
    loss = ck.losses.NTXent(temperature=0.5)(view1, view2)
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..engine import DiagonalMask, TileMask
from ..engine.tiling import TileSize
from ..validation import check_number
from .base import IndexRows, Objective, Work
from .common import index_target_loss, inverse_temperature, prepare

__all__ = ["nt_xent", "NTXent", "CITATION"]

CITATION = """@inproceedings{chen2020simclr,
  title     = {A Simple Framework for Contrastive Learning of Visual Representations},
  author    = {Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey},
  booktitle = {ICML},
  year      = {2020},
  note      = {arXiv:2002.05709}
}"""


def _views(z1: Tensor, z2: Tensor, similarity: str):
    a, b = prepare(similarity, z1=z1, z2=z2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"z1 and z2 must hold the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    idx = torch.arange(n, device=a.device)
    return a, b, torch.cat([idx + n, idx])


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: Union[float, Tensor] = 0.5, similarity: str = "cosine",
            masks: Sequence[TileMask] = (), margin: float = 0.0, tile_size: TileSize = None,
            reduction: str = "mean") -> Tensor:
    """NT-Xent over two views ``z1``, ``z2`` (N, d); see the module docstring.

    Args:
        temperature: float, 0-d tensor, or one per view row (2N,).
        masks: extra entries dropped from the denominators, in the 2N x 2N layout ``[z1; z2]``.
        margin: additive margin (similarity units) subtracted from each positive
            similarity before scaling, in the numerator and the denominator (NT-Xent-AM).
        reduction: ``"mean"`` over the 2N rows, ``"sum"`` or ``"none"`` (2N,).

    Example::

        import torch, contrastkit as ck
        ck.functional.nt_xent(torch.randn(16, 8), torch.randn(16, 8), temperature=0.5)
    """
    a, b, positives = _views(z1, z2, similarity)
    z = torch.cat([a, b])
    scale = inverse_temperature(temperature, z)
    margin = check_number("margin", margin)
    shift = margin * scale.expand(z.shape[0]) if margin else None
    return index_target_loss(z, z, positives, masks=[DiagonalMask(0), *masks], tile_size=tile_size, shift=shift,
                             scale=scale, reduction=reduction)


class NTXent(Objective):
    """SimCLR's NT-Xent loss: ``forward(z1, z2, *, masks=())`` with the 2N views, self masked.

    Example::

        import torch, contrastkit as ck
        x = torch.randn(16, 8)
        proj = torch.nn.Linear(8, 4)
        loss = ck.losses.NTXent(temperature=0.5)(proj(x + 0.1 * torch.randn_like(x)), proj(x))
        loss.backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.5, learn_temperature: bool = False, similarity: str = "cosine",
                 margin: float = 0.0, tile_size: TileSize = None, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction, margin=margin)

    @property
    def work(self) -> Work:
        return Work(rows=("z1", "z2"), positives="views", self_position=True, dropped=("masks",),
                    margin=self.margin, local="index", ring=True)

    def forward(self, z1: Tensor, z2: Tensor, *, masks: Sequence[TileMask] = ()) -> Tensor:
        return nt_xent(z1, z2, margin=self.margin, masks=masks, **self._settings())

    def index_rows(self, z1: Tensor, z2: Tensor, *, masks: Sequence[TileMask] = ()) -> IndexRows:
        """This rank's 2n view rows against the views [z1; z2] (each block gathered on its own)."""
        a, b, positives = _views(z1, z2, self.similarity)
        z = torch.cat([a, b])
        return IndexRows([a, b], [a, b], positives, inverse_temperature(self.temperature(), z),
                         self_index=torch.arange(z.shape[0], device=z.device), margin=self.margin,
                         masks=tuple(masks), tile_size=self.tile_size)
