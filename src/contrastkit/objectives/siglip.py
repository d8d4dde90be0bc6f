"""SigLIP: the pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training").

Every (anchor, candidate) pair is an independent binary classification:

    loss = (1/N) sum_i sum_j -log sigmoid(z_ij (s x_i . y_j + b)),   s = 1 / temperature

with z_ij = +1 for the positive pair (default j = i) and -1 otherwise. As in the
paper (and open_clip's ``SigLipLoss``) it is summed over pairs and divided by the
number of anchors N. Exact and tiled: the loss
is one tiled walk (:func:`contrastkit.engine.tiled_softplus.tiled_softplus_rows` with
``positives=``): softplus(U) over the negative pairs and softplus(-U) at each positive
cell; no N x M matrix is kept.

``masks=`` (as for :func:`~contrastkit.objectives.info_nce.info_nce`: a sequence of
:class:`~contrastkit.engine.TileMask`) leave (anchor, candidate) pairs out of the sum, e.g.
a document that is another known positive of the query (a false negative, not to be pushed
away). They drop negative pairs only: a mask covering a row's positive pair is a ValueError.

The paper initialises the learnable log-scale t' = log 10 (temperature 0.1) and the
bias b = -10; :class:`SigLIP` does the same.

Example::

    import torch, contrastkit as ck
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    loss = ck.functional.siglip(img, txt, temperature=0.1, bias=-10.0)
    loss = ck.losses.SigLIP()(img, txt)            # learnable temperature and bias
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..engine import TileMask
from ..engine.tiled_softplus import tiled_softplus_rows
from ..engine.tiling import TileSize
from ..validation import check_index, check_reduction
from .base import Objective, Work
from .common import default_positives, inverse_temperature, prepare, reduce_rows

__all__ = ["siglip", "SigLIP", "CITATION"]

CITATION = """@inproceedings{zhai2023siglip,
  title     = {Sigmoid Loss for Language Image Pre-Training},
  author    = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle = {ICCV},
  year      = {2023},
  note      = {arXiv:2303.15343}
}"""


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


def _check_masked_positives(masks: Sequence[TileMask], positives: Tensor, n: int, m: int, device) -> None:
    """Raise ValueError when a mask covers a row's positive pair (SigLIP's masks drop negative
    pairs only): each mask answers for the positive cells itself (:meth:`TileMask.drops`)."""
    has = positives >= 0
    covered = torch.zeros(n, dtype=torch.bool, device=positives.device)
    for mask in masks:
        if not isinstance(mask, TileMask):
            raise ValueError(f"masks must be a sequence of contrastkit.engine.TileMask, got {type(mask).__name__}")
        mask.check(n, m, device)
        covered |= mask.drops(positives)
    bad = covered & has
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"masks= cover the positive pair of anchor row {i} (column {int(positives[i])}): SigLIP's "
                         "masks leave negative pairs out of the sum, never a positive one; take the positive "
                         "column out of the mask")


def siglip(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.1,
    bias: Union[float, Tensor] = -10.0,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """SigLIP loss of ``anchors`` (N, d) against ``candidates`` (M, d); exact, tiled.

    Args:
        positives: column of each anchor's positive (LongTensor (N,), -1: the row has
            none in these candidates, all its pairs are negatives); default the
            diagonal. A rank holding a slice of the global candidates passes its
            global offset here (``arange(N) + offset``).
        temperature: float, scalar tensor (learnable), or one per anchor row (N,);
            the paper's logit scale is ``1 / temperature``.
        bias: the logit bias b (float or scalar tensor, learnable).
        similarity: ``"cosine"`` (L2-normalise) or ``"dot"`` (as given, like open_clip).
        masks: (anchor, candidate) pairs left out of the sum (a sequence of
            :class:`~contrastkit.engine.TileMask`, e.g. an ``IndexMask`` of known false
            negatives per anchor), in the candidates' column layout. Negative pairs only:
            a mask that covers a row's positive pair is a ValueError (naming the row).
        reduction: ``"mean"`` = sum over the kept pairs / N (the paper's; masks do not
            change the divisor), ``"sum"``, or ``"none"`` (per-anchor sums over its kept pairs).

    The positive term softplus(-U) is finite for any finite logit (a noisy pair at a small
    temperature gives a large, exact loss: ``x = [[1, 0]], y = [[-1, 0]]`` at t = 0.01,
    b = -10 is 110).

    Example::

        import torch, contrastkit as ck
        x, y = torch.randn(8, 16), torch.randn(8, 16)
        ck.functional.siglip(x, y, temperature=0.1, bias=-10.0)
    """
    check_reduction(reduction)
    q, k = prepare(similarity, anchors=anchors, candidates=candidates)
    n, m = q.shape[0], k.shape[0]
    positives = check_index("positives", default_positives(positives, n, m, q.device), n, m, q.device)
    masks = tuple(masks)
    if masks:
        _check_masked_positives(masks, positives, n, m, q.device)
    scale = inverse_temperature(temperature, q)
    b = _bias_vector(bias, n, q)
    # one walk: softplus(U) over the negative pairs (less the masked ones), softplus(-U) at
    # each positive cell (stable for any finite logit), never an N x M matrix
    rows = tiled_softplus_rows(q, k, row_bias=b, scale=scale, positives=positives, masks=masks,
                               tile_size=tile_size).to(q.dtype)
    return reduce_rows(rows, reduction)


class SigLIP(Objective):
    """SigLIP loss with a learnable temperature and bias (paper init: t' = log 10, b = -10).

    The temperature is log-parameterised and clamped to [0.01, 100] (see
    :class:`~contrastkit.objectives.base.Temperature`); ``learn_temperature=False`` keeps
    the temperature and the bias fixed (``learnable`` is accepted as an alias).
    ``forward(anchors, candidates, positives=None, *, masks=())``; see :func:`siglip`.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.SigLIP()                           # temperature 0.1, bias -10
        image_emb, text_emb = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        loss_fn(image_emb, text_emb).backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.1, bias: float = -10.0, learn_temperature: bool = True,
                 similarity: str = "cosine", tile_size: TileSize = None, reduction: str = "mean",
                 learnable: Optional[bool] = None) -> None:
        if learnable is not None:
            learn_temperature = bool(learnable)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction)
        b = torch.tensor(float(_bias_vector(float(bias), 1, torch.zeros(1, dtype=torch.float64))[0]),
                         dtype=torch.float64)
        if learn_temperature:
            self.bias = nn.Parameter(b)
        else:
            self.register_buffer("bias", b)

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates"), index={"positives": "candidates"}, positives="pairs",
                    dropped=("masks",), weighted="bias", local="pairs", ring=True)

    def forward(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *,
                masks: Sequence[TileMask] = ()) -> Tensor:
        return siglip(anchors, candidates, positives, bias=self.bias, masks=masks, **self._settings())

    def pair_rows(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *,
                  masks: Sequence[TileMask] = ()):
        """This rank's prepared ``(anchors, candidates, positives, temperature, bias)``
        (the scaling layer's local pair path, which takes no masks: a ValueError)."""
        if tuple(masks):
            raise ValueError("SigLIP masks= are not offered on DistributedLoss's local pair path (they index the "
                             "concatenated batch); evaluate the loss on the whole batch instead")
        q, k = prepare(self.similarity, anchors=anchors, candidates=candidates)
        n, m = q.shape[0], k.shape[0]
        positives = check_index("positives", default_positives(positives, n, m, q.device), n, m, q.device)
        return q, k, positives, self.temperature(), self.bias

    def extra_repr(self) -> str:
        return f"bias={float(self.bias):.4g}, " + super().extra_repr()
