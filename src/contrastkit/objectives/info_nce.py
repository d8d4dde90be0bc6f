"""InfoNCE / CLIP: cross-entropy of each anchor to its positive among all candidates.

    loss_i = -s q_i . k_{p(i)} + log sum_j exp(s q_i . k_j),     s = 1 / temperature

(van den Oord et al. 2018; with ``symmetric=True`` the CLIP loss of Radford et al.
2021: the column direction is added and the two are averaged.)

Example::

    import torch, contrastkit as ck
    queries, documents = torch.randn(8, 32), torch.randn(8, 32)     # row i of each is a pair
    loss = ck.functional.info_nce(queries, documents, temperature=0.05)
    images, texts = torch.randn(8, 32), torch.randn(8, 32)
    loss = ck.losses.InfoNCE(temperature=0.07, symmetric=True)(images, texts)   # CLIP
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from ..engine import TileMask
from ..engine.tiling import TileSize
from ..validation import check_index, check_number
from .base import IndexRows, Objective, Work
from .common import default_positives, index_target_loss, inverse_temperature, prepare

__all__ = ["info_nce", "InfoNCE", "CITATION"]

CITATION = """@article{oord2018cpc,
  title   = {Representation Learning with Contrastive Predictive Coding},
  author  = {van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
  journal = {arXiv preprint arXiv:1807.03748},
  year    = {2018}
}
@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle = {ICML},
  year      = {2021},
  note      = {arXiv:2103.00020}
}"""


def info_nce(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.05,
    symmetric: bool = False,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    margin: float = 0.0,
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE of ``anchors`` (N, d) against ``candidates`` (M, d), exact and tiled.

    Args:
        positives: column of each anchor's positive (LongTensor (N,), -1 for a row
            without positive, left out of the mean); default the diagonal (needs M >= N).
            Candidates that are nobody's positive are negatives, e.g. hard negatives
            appended after the positives.
        temperature: a float, a scalar tensor (learnable: its gradient is exact) or
            one temperature per anchor row (shape (N,)).
        symmetric: add the column direction (CLIP); needs each positive column shared by
            at least one row.
        similarity: ``"cosine"`` (L2-normalise both sides) or ``"dot"`` (use as given).
        masks: extra entries to drop from the denominator (a sequence of
            :class:`~contrastkit.engine.TileMask`, e.g. ``IndexMask`` of known false
            negatives per anchor).
        margin: additive margin (similarity units) subtracted from each positive
            similarity before scaling, in the numerator and the denominator
            (NT-Xent-AM); 0 is plain InfoNCE. See :func:`~contrastkit.objectives.common.index_target_loss`.
        tile_size: tile of the logit matrix walked at a time (int or (rows, cols));
            default chosen from the sizes and free memory.
        reduction: ``"mean"`` over rows with a positive, ``"sum"``, or ``"none"``.

    Example::

        import torch, contrastkit as ck
        q, d = torch.randn(8, 32), torch.randn(8, 32)
        ck.functional.info_nce(q, d, temperature=0.05)              # diagonal positives
    """
    q, k = prepare(similarity, anchors=anchors, candidates=candidates)
    n, m = q.shape[0], k.shape[0]
    positives = default_positives(positives, n, m, q.device)
    scale = inverse_temperature(temperature, q)
    margin = check_number("margin", margin)
    shift = margin * scale.expand(n) if margin else None
    return index_target_loss(q, k, positives, masks=masks, symmetric=symmetric, scale=scale,
                             tile_size=tile_size, reduction=reduction, shift=shift)


class InfoNCE(Objective):
    """InfoNCE / CLIP loss module: ``forward(anchors, candidates, positives=None, *, masks=())``;
    see :func:`info_nce`.

    ``learn_temperature=True`` makes the temperature a parameter (log-parameterised and
    clamped to [0.01, 100] like CLIP's logit scale).

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.InfoNCE(temperature=0.05)
        query_emb, doc_emb = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        loss = loss_fn(query_emb, doc_emb)
        loss.backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.05, learn_temperature: bool = False, symmetric: bool = False,
                 similarity: str = "cosine", margin: float = 0.0, tile_size: TileSize = None,
                 reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction, symmetric=symmetric, margin=margin)

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates"), index={"positives": "candidates"}, positives="index",
                    dropped=("masks",), symmetric=self.symmetric, margin=self.margin, local="index", ring=True)

    def forward(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *,
                masks: Sequence[TileMask] = ()) -> Tensor:
        return info_nce(anchors, candidates, positives, symmetric=self.symmetric, margin=self.margin, masks=masks,
                        **self._settings())

    def index_rows(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *,
                   masks: Sequence[TileMask] = ()) -> IndexRows:
        """This rank's rows (see :class:`~contrastkit.objectives.base.IndexRows`)."""
        q, k = prepare(self.similarity, anchors=anchors, candidates=candidates)
        n, m = q.shape[0], k.shape[0]
        positives = check_index("positives", default_positives(positives, n, m, q.device), n, m, q.device)
        return IndexRows([q], [k], positives, inverse_temperature(self.temperature(), q), margin=self.margin,
                         symmetric=self.symmetric, masks=tuple(masks), tile_size=self.tile_size)
