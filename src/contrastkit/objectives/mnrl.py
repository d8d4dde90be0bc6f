"""Multiple negatives ranking loss (Henderson et al. 2017; sentence-transformers' MNRL).

Anchors (queries) against the concatenation of their positives and any hard
negatives; the positive of anchor i is candidate i, every other candidate (other
anchors' positives, all hard negatives) is a negative:

    loss_i = -s cos(a_i, p_i) + log( sum_j exp(s cos(a_i, p_j)) + sum_{j,h} exp(s cos(a_i, n_jh)) )

``scale`` is 1 / temperature (sentence-transformers' default 20).

Example::

    loss = ck.losses.MultipleNegativesRanking(scale=20.0)(queries, positives, hard_negatives)
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from ..engine.tiling import TileSize
from ..engine.validation import check_scale
from .common import index_target_loss, inverse_temperature, prepare

__all__ = ["multiple_negatives_ranking", "MultipleNegativesRanking"]


def _flatten_negatives(anchors: Tensor, hard_negatives) -> list:
    out = []
    for h, neg in enumerate(hard_negatives):
        if not isinstance(neg, Tensor):
            raise ValueError(f"hard_negatives[{h}] must be a tensor, got {type(neg).__name__}")
        if neg.dim() == 3:  # (N, k, d): k negatives per anchor
            if neg.shape[0] != anchors.shape[0]:
                raise ValueError(
                    f"hard_negatives[{h}] has {neg.shape[0]} rows for {anchors.shape[0]} anchors (shape (N, k, d))"
                )
            neg = neg.transpose(0, 1).reshape(-1, neg.shape[-1])
        out.append(neg)
    return out


def multiple_negatives_ranking(anchors: Tensor, positives: Tensor, *hard_negatives: Tensor,
                               scale: Union[float, Tensor] = 20.0, similarity: str = "cosine",
                               symmetric: bool = False, tile_size: TileSize = None) -> Tensor:
    """MNRL: cross-entropy of anchor i to positive i among all positives and hard negatives.

    Each hard negative tensor is (N, d) (one per anchor) or (N, k, d); any number may be
    given. Exactly sentence-transformers' MultipleNegativesRankingLoss for
    ``similarity="cosine"``; ``symmetric=True`` adds the positive -> anchor direction
    (its MultipleNegativesSymmetricRankingLoss, over the positive columns).

    Example::

        multiple_negatives_ranking(q, p, n, scale=20.0)
    """
    negs = _flatten_negatives(anchors, hard_negatives)
    named = {"anchors": anchors, "positives": positives}
    named.update({f"hard_negatives[{h}]": n for h, n in enumerate(negs)})
    prepared = prepare(similarity, **named)
    a, p = prepared[0], prepared[1]
    if a.shape[0] != p.shape[0]:
        raise ValueError(f"anchors and positives must have the same number of rows, got {a.shape[0]} and {p.shape[0]}")
    check_scale("scale", scale, like=a, n_rows=a.shape[0])
    k = torch.cat(prepared[1:]) if len(prepared) > 2 else p
    temperature = 1.0 / scale if isinstance(scale, Tensor) else 1.0 / float(scale)
    index = torch.arange(a.shape[0], device=a.device)
    return index_target_loss(a, k, index, symmetric=symmetric, tile_size=tile_size,
                             scale=inverse_temperature(temperature, a))


class MultipleNegativesRanking(nn.Module):
    """MNRL module: ``forward(anchors, positives, *hard_negatives)``.

    Example::

        loss_fn = MultipleNegativesRanking(scale=20.0)
        loss = loss_fn(q_emb, pos_emb, neg_emb)
    """

    def __init__(self, scale: float = 20.0, similarity: str = "cosine", symmetric: bool = False,
                 tile_size: TileSize = None) -> None:
        super().__init__()
        check_scale("scale", scale)
        self.scale = float(scale)
        self.similarity = similarity
        self.symmetric = symmetric
        self.tile_size = tile_size

    def forward(self, anchors: Tensor, positives: Tensor, *hard_negatives: Tensor) -> Tensor:
        return multiple_negatives_ranking(anchors, positives, *hard_negatives, scale=self.scale,
                                          similarity=self.similarity, symmetric=self.symmetric,
                                          tile_size=self.tile_size)
