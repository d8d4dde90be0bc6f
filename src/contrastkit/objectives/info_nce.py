"""InfoNCE / CLIP: cross-entropy of each anchor to its positive among all candidates.

    loss_i = -s q_i . k_{p(i)} + log sum_j exp(s q_i . k_j),     s = 1 / temperature

(van den Oord et al. 2018; with ``symmetric=True`` the CLIP loss of Radford et al.
2021: the column direction is added and the two are averaged.)

Example::

    import contrastkit as ck
    loss = ck.functional.info_nce(queries, documents, temperature=0.05)
    loss = ck.losses.InfoNCE(temperature=0.07, symmetric=True)(images, texts)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..engine import TileMask
from ..engine.tiling import TileSize
from ._rows import check_margin
from .common import Temperature, default_positives, index_target_loss, inverse_temperature, prepare

__all__ = ["info_nce", "InfoNCE"]


def info_nce(
    anchors: Tensor,
    candidates: Tensor,
    *,
    temperature: Union[float, Tensor],
    positives: Optional[Tensor] = None,
    symmetric: bool = False,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    reduction: str = "mean",
    margin: float = 0.0,
) -> Tensor:
    """InfoNCE of ``anchors`` (N, d) against ``candidates`` (M, d), exact and tiled.

    Args:
        temperature: a float, a scalar tensor (learnable: its gradient is exact) or
            one temperature per anchor row (shape (N,)).
        positives: column of each anchor's positive (LongTensor (N,), -1 for a row
            without positive, left out of the mean); default the diagonal (needs M >= N).
            Candidates that are nobody's positive are negatives, e.g. hard negatives
            appended after the positives.
        symmetric: add the column direction (CLIP); needs each positive column shared by
            at least one row.
        similarity: ``"cosine"`` (L2-normalise both sides) or ``"dot"`` (use as given).
        masks: extra entries to drop from the denominator (see contrastkit.engine).
        tile_size: tile of the logit matrix walked at a time (int or (rows, cols));
            default chosen from the sizes and free memory.
        reduction: ``"mean"`` over rows with a positive, ``"sum"``, or ``"none"``.
        margin: additive margin (similarity units) subtracted from each positive
            similarity before scaling, in the numerator and the denominator
            (NT-Xent-AM); 0 is plain InfoNCE. See :func:`~contrastkit.objectives.common.index_target_loss`.

    Example::

        q, d = torch.randn(8, 32), torch.randn(8, 32)
        info_nce(q, d, temperature=0.05)                     # diagonal positives
    """
    q, k = prepare(similarity, anchors=anchors, candidates=candidates)
    n, m = q.shape[0], k.shape[0]
    positives = default_positives(positives, n, m, q.device)
    scale = inverse_temperature(temperature, q)
    margin = check_margin(margin)
    shift = margin * scale.expand(n) if margin else None
    return index_target_loss(q, k, positives, masks=masks, symmetric=symmetric, scale=scale,
                             tile_size=tile_size, reduction=reduction, shift=shift)


class InfoNCE(nn.Module):
    """InfoNCE / CLIP loss module.

    ``forward(anchors, candidates, positives=None)``; see :func:`info_nce`.
    ``learn_temperature=True`` makes the temperature a parameter (log-parameterised
    and clamped to [0.01, 100] like CLIP's logit scale).

    Example::

        loss_fn = InfoNCE(temperature=0.05)
        loss = loss_fn(query_emb, doc_emb)
        loss.backward()
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, learn_temperature: bool = False,
                 similarity: str = "cosine", tile_size: TileSize = None, margin: float = 0.0) -> None:
        super().__init__()
        self.temperature = Temperature(temperature, learnable=learn_temperature)
        self.symmetric = symmetric
        self.similarity = similarity
        self.tile_size = tile_size
        self.margin = check_margin(margin)

    def forward(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None) -> Tensor:
        return info_nce(anchors, candidates, temperature=self.temperature(), positives=positives,
                        symmetric=self.symmetric, similarity=self.similarity, tile_size=self.tile_size,
                        margin=self.margin)
