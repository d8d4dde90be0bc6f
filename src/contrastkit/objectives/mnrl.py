"""Multiple negatives ranking loss (Henderson et al. 2017; sentence-transformers' MNRL).

Anchors (queries) against the concatenation of their positives and any hard
negatives; the positive of anchor i is candidate i, every other candidate (other
anchors' positives, all hard negatives) is a negative:

    loss_i = -s cos(a_i, p_i) + log( sum_j exp(s cos(a_i, p_j)) + sum_{j,h} exp(s cos(a_i, n_jh)) )

with s = 1 / temperature. ``temperature`` is the library-wide name; sentence-transformers'
``scale`` (= 1 / temperature, default 20) is accepted as a documented alias.

Example::

    import torch, contrastkit as ck
    q, p, n = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    loss = ck.losses.MultipleNegativesRanking(temperature=0.05)(q, p, n)
    same = ck.losses.MultipleNegativesRanking(scale=20.0)(q, p, n)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine import TileMask
from ..engine.tiling import TileSize
from .base import IndexRows, Objective, Work, resolve_temperature
from .common import index_target_loss, inverse_temperature, prepare

__all__ = ["multiple_negatives_ranking", "MultipleNegativesRanking", "CITATION"]

CITATION = """@article{henderson2017efficient,
  title   = {Efficient Natural Language Response Suggestion for Smart Reply},
  author  = {Henderson, Matthew and Al-Rfou, Rami and Strope, Brian and Sung, Yun-Hsuan and
             Lukacs, Laszlo and Guo, Ruiqi and Kumar, Sanjiv and Miklos, Balint and Kurzweil, Ray},
  journal = {arXiv preprint arXiv:1705.00652},
  year    = {2017}
}"""

DEFAULT_TEMPERATURE = 0.05  # sentence-transformers' scale 20


def _flatten_negatives(anchors: Tensor, hard_negatives) -> List[Tensor]:
    out = []
    for h, neg in enumerate(hard_negatives):
        if not isinstance(neg, Tensor):
            raise ValueError(f"hard_negatives[{h}] must be a tensor, got {type(neg).__name__}")
        if neg.dim() == 3:  # (N, k, d): k negatives per anchor
            if neg.shape[0] != anchors.shape[0]:
                raise ValueError(
                    f"hard_negatives[{h}] has {neg.shape[0]} rows for {anchors.shape[0]} anchors (shape (N, k, d))"
                )
            out.extend(neg.unbind(1))
        else:
            out.append(neg)
    return out


def _prepared_blocks(anchors: Tensor, candidates: Tensor, hard_negatives, similarity: str) -> List[Tensor]:
    negs = _flatten_negatives(anchors, hard_negatives)
    named = {"anchors": anchors, "candidates": candidates}
    named.update({f"hard_negatives[{h}]": n for h, n in enumerate(negs)})
    prepared = list(prepare(similarity, **named))
    if prepared[0].shape[0] != prepared[1].shape[0]:
        raise ValueError(f"anchors and candidates (their positives) must have the same number of rows, got "
                         f"{prepared[0].shape[0]} and {prepared[1].shape[0]}")
    return prepared


def multiple_negatives_ranking(anchors: Tensor, candidates: Tensor, *hard_negatives: Tensor,
                               temperature: Union[float, Tensor, None] = None,
                               scale: Union[float, Tensor, None] = None, symmetric: bool = False,
                               similarity: str = "cosine", masks: Sequence[TileMask] = (),
                               tile_size: TileSize = None, reduction: str = "mean") -> Tensor:
    """MNRL: cross-entropy of anchor i to candidate i among all candidates and hard negatives.

    ``candidates`` (N, d) holds each anchor's positive (row i for anchor i). Each hard
    negative tensor is (N, d) (one per anchor) or (N, k, d); any number may be given; the
    columns are ``[candidates, hard_negatives[0], ...]`` (an (N, k, d) tensor contributes
    its k slices in order). Exactly sentence-transformers' MultipleNegativesRankingLoss
    for ``similarity="cosine"``; ``symmetric=True`` adds the candidate -> anchor direction
    (its MultipleNegativesSymmetricRankingLoss, over the positive columns).

    Args:
        temperature: 1 / scale (default 0.05); float, 0-d tensor or one per anchor (N,).
        scale: alias of ``1 / temperature`` (sentence-transformers' name); not with temperature.
        masks: entries dropped from the denominators (false negatives), in the column layout above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (not with symmetric).

    Example::

        import torch, contrastkit as ck
        q, p, n = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
        ck.functional.multiple_negatives_ranking(q, p, n, temperature=0.05)
    """
    temperature = resolve_temperature(temperature, scale, DEFAULT_TEMPERATURE, "multiple_negatives_ranking")
    prepared = _prepared_blocks(anchors, candidates, hard_negatives, similarity)
    a = prepared[0]
    k = torch.cat(prepared[1:]) if len(prepared) > 2 else prepared[1]
    index = torch.arange(a.shape[0], device=a.device)
    return index_target_loss(a, k, index, masks=masks, symmetric=symmetric, tile_size=tile_size,
                             scale=inverse_temperature(temperature, a), reduction=reduction)


class MultipleNegativesRanking(Objective):
    """MNRL module: ``forward(anchors, candidates, *hard_negatives, masks=())``; see
    :func:`multiple_negatives_ranking`. ``scale=`` is accepted as an alias of ``1 / temperature``.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.MultipleNegativesRanking(temperature=0.05)      # or scale=20.0
        q, p, n = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16), torch.randn(8, 16)
        loss_fn(q, p, n).backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: Optional[float] = None, scale: Optional[float] = None,
                 learn_temperature: bool = False, symmetric: bool = False, similarity: str = "cosine",
                 tile_size: TileSize = None, reduction: str = "mean") -> None:
        t = resolve_temperature(temperature, scale, DEFAULT_TEMPERATURE, "MultipleNegativesRanking")
        super().__init__(temperature=float(t), learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction, symmetric=symmetric)

    @property
    def scale(self) -> float:
        """1 / temperature (sentence-transformers' name)."""
        return float(1.0 / self.temperature())

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates", "*hard_negatives"), positives="index", dropped=("masks",),
                    symmetric=self.symmetric, local="index", ring=True)

    def forward(self, anchors: Tensor, candidates: Tensor, *hard_negatives: Tensor,
                masks: Sequence[TileMask] = ()) -> Tensor:
        return multiple_negatives_ranking(anchors, candidates, *hard_negatives, symmetric=self.symmetric,
                                          masks=masks, **self._settings())

    def index_rows(self, anchors: Tensor, candidates: Tensor, *hard_negatives: Tensor,
                   masks: Sequence[TileMask] = ()) -> IndexRows:
        """This rank's rows: anchors against [candidates, hard negatives...] (blocks gathered separately)."""
        prepared = _prepared_blocks(anchors, candidates, hard_negatives, self.similarity)
        a = prepared[0]
        return IndexRows([a], prepared[1:], torch.arange(a.shape[0], device=a.device),
                         inverse_temperature(self.temperature(), a), symmetric=self.symmetric,
                         masks=tuple(masks), tile_size=self.tile_size)
