"""Decoupled contrastive learning, DCL and DCLW (Yeh et al. 2022, "Decoupled Contrastive
Learning", ECCV).

InfoNCE with the positive removed from the denominator (the negative-positive coupling
term is gone), and in DCLW the positive term weighted by a von Mises-Fisher factor:

    loss_i = -w_i X_ip + log sum_{j != p(i), j != i} exp(X_ij),     X = sim / t
    w_i = 1                                             (DCL)
    w_i = 2 - n * softmax_i( sim(a_i, c_p(i)) / sigma )  (DCLW; no gradient through w)

Two layouts:

- ``two_view=False`` (retrieval form): anchors (N, d) against candidates (M, d); the
  positive of anchor i is candidate ``positives[i]`` (default i); every other candidate
  is a negative.
- ``two_view=True`` (two-view form, SimCLR / the paper / lightly's ``DCLLoss``):
  ``anchors`` and ``candidates`` are two views of the same N samples; all 2N views are
  anchors, each against the other 2N - 2 views (itself and its positive dropped), and
  the loss is the mean over the 2N rows, i.e. the average of the two directions.

Extra candidates (e.g. a memory queue) are further negatives in both layouts. In the
retrieval form, ``masks=`` (as for :func:`~contrastkit.objectives.info_nce.info_nce`)
drop further entries of each anchor's denominator, e.g. in-batch documents that are
another known positive of the query (false negatives).

Example::

    import torch, contrastkit as ck
    view1, view2 = torch.randn(16, 8), torch.randn(16, 8)
    loss = ck.functional.dcl(view1, view2, temperature=0.1, two_view=True)
    loss = ck.losses.DCLW(temperature=0.1, sigma=0.5, two_view=True)(view1, view2)

(``two_view`` was called ``symmetric`` before the API freeze; ``symmetric`` now means
"add the column direction" in every objective, so passing it here is a ValueError.)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine import DiagonalMask, IndexMask, TileMask, positive_logits, tiled_logsumexp
from ..engine.tiling import TileSize
from ..validation import check_index, check_reduction, check_scale
from ._rows import append_candidates, expand_temperature, reject_symmetric, two_view_layout
from .base import Objective, Work
from .common import default_positives, finish_rows, inverse_temperature, leave_out_empty_rows, prepare

__all__ = ["dcl", "DCL", "DCLW", "CITATION"]

CITATION = """@inproceedings{yeh2022dcl,
  title     = {Decoupled Contrastive Learning},
  author    = {Yeh, Chun-Hsiao and Hong, Cheng-Yao and Hsu, Yen-Chi and Liu, Tyng-Luh and Chen, Yubei and
               LeCun, Yann},
  booktitle = {ECCV},
  year      = {2022},
  note      = {arXiv:2110.06848}
}"""


def _vmf_weights(sim_pos: Tensor, valid: Tensor, sigma: float) -> Tensor:
    """``2 - n softmax(sim_pos / sigma)`` over the rows with a positive, detached."""
    s = sim_pos.detach() / sigma
    s = torch.where(valid, s, torch.full_like(s, float("-inf")))
    w = 2.0 - int(valid.sum()) * torch.softmax(s, dim=0)
    return torch.where(valid, w, torch.zeros_like(w))


def dcl(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    extra_candidates: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.1,
    two_view: bool = False,
    weighted: bool = False,
    sigma: float = 0.5,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    reduction: str = "mean",
    symmetric: Optional[bool] = None,
    empty_rows: str = "raise",
) -> Tensor:
    """Decoupled contrastive loss (DCL, or DCLW with ``weighted=True``), exact and tiled.

    Args:
        temperature: float, scalar tensor (learnable) or one per anchor row ((N,); in
            the two-view form (N,) per sample or (2N,) per view row).
        two_view: the two-view form (see the module docstring); equals lightly's
            ``DCLLoss`` / ``DCLWLoss``.
        weighted: DCLW's von Mises-Fisher weight on the positive term (computed
            without gradient, over the rows of one direction).
        sigma: DCLW's weight temperature.
        positives: (retrieval form only) column of each anchor's positive, -1 for none.
        extra_candidates: more negatives (E, d), e.g. ``queue.candidates()``.
        masks: (retrieval form only) extra entries to drop from each anchor's
            denominator (a sequence of :class:`~contrastkit.engine.TileMask`, e.g. an
            ``IndexMask`` of known false negatives per anchor), in the coordinates of the
            columns ``cat(candidates, extra_candidates)``. The positive is out of the
            denominator already. The two-view form takes none (a ValueError).
        empty_rows: an anchor row with a positive but no negative left (its denominator
            is empty, the loss undefined): ``"raise"`` (default) a ValueError naming it;
            ``"skip"`` leave it out of the loss like a row without positive, with a
            RuntimeWarning counting such rows (what the main job's training step uses).
        reduction: ``"mean"`` over rows with a positive, ``"sum"`` or ``"none"``.

    Example::

        import torch, contrastkit as ck
        a, b = torch.randn(64, 128), torch.randn(64, 128)
        ck.functional.dcl(a, b, temperature=0.1, two_view=True)
    """
    reject_symmetric(symmetric, "dcl")
    check_reduction(reduction)
    if weighted:
        check_scale("sigma", sigma)
        sigma = float(sigma)
    user_masks = tuple(masks)
    a, c = prepare(similarity, anchors=anchors, candidates=candidates)
    if two_view:
        if positives is not None:
            raise ValueError("positives= is for the retrieval form; the two-view form (two_view=True) pairs view i with view i")
        if user_masks:
            raise ValueError("masks= is for the retrieval form (two_view=False): the two-view form (two_view=True) "
                             "takes no masks")
        n = a.shape[0]
        z, index = two_view_layout(a, c)
        q, k = z, append_candidates(z, extra_candidates, similarity)
        masks = [DiagonalMask(0), IndexMask(index)]
        temperature = expand_temperature(temperature, n, 2 * n)
    else:
        n = a.shape[0]
        m = c.shape[0]
        q, k = a, append_candidates(c, extra_candidates, similarity)
        index = check_index("positives", default_positives(positives, n, m, a.device), n, m, a.device)
        masks = ([DiagonalMask(0)] if positives is None else [IndexMask(index)]) + list(user_masks)
    valid = index >= 0
    if not bool(valid.any()):
        raise ValueError("no anchor row has a positive (every entry of positives is -1)")
    s = inverse_temperature(temperature, q)          # inside the engine's walk: q / t is never formed
    lse, _ = tiled_logsumexp(q, k, masks=masks, tile_size=tile_size, scale=s)
    sim_pos = positive_logits(q, k, index)
    pos = sim_pos * s
    lse = lse.to(pos.dtype)
    valid = leave_out_empty_rows(valid, ~torch.isfinite(lse), empty_rows, "dcl")
    if weighted:
        if two_view:
            w = _vmf_weights(sim_pos[:n], valid[:n], sigma)
            w = torch.cat([w, w])  # sim(a_i, b_i) is the same for both directions
        else:
            w = _vmf_weights(sim_pos, valid, sigma)
        pos = pos * w.to(pos.dtype)
    row_losses = lse - pos
    return finish_rows(row_losses, valid, reduction)


class DCL(Objective):
    """Decoupled contrastive loss module: ``forward(anchors, candidates, positives=None,
    extra_candidates=None, *, masks=(), empty_rows="raise")`` (``masks``: retrieval form
    only); see :func:`dcl`.
    ``DCL(two_view=True)`` is lightly's ``DCLLoss`` on two views.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.DCL(temperature=0.1, two_view=True)
        v1, v2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        loss_fn(v1, v2).backward()
    """

    citation = CITATION
    weighted = False

    def __init__(self, *, temperature: float = 0.1, two_view: bool = False, learn_temperature: bool = False,
                 similarity: str = "cosine", tile_size: TileSize = None, reduction: str = "mean",
                 symmetric: Optional[bool] = None) -> None:
        reject_symmetric(symmetric, type(self).__name__)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction)
        self.two_view = bool(two_view)
        self.sigma = 0.5

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates"), index={"positives": "candidates"}, shared=("extra_candidates",),
                    positives="index", self_position=self.two_view, dropped=("positive", "masks"),
                    weighted="von Mises-Fisher" if self.weighted else None)

    def forward(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None,
                extra_candidates: Optional[Tensor] = None, *, masks: Sequence[TileMask] = (),
                empty_rows: str = "raise") -> Tensor:
        return dcl(anchors, candidates, positives, extra_candidates, two_view=self.two_view,
                   weighted=self.weighted, sigma=self.sigma, masks=masks, empty_rows=empty_rows, **self._settings())

    def extra_repr(self) -> str:
        return f"two_view={self.two_view}, " + super().extra_repr()


class DCLW(DCL):
    """DCL with von Mises-Fisher weighting of the positive term (``sigma``, default 0.5).
    ``DCLW(two_view=True)`` is lightly's ``DCLWLoss``.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.DCLW(temperature=0.1, sigma=0.5, two_view=True)
        v1, v2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        loss_fn(v1, v2).backward()
    """

    weighted = True

    def __init__(self, *, temperature: float = 0.1, sigma: float = 0.5, two_view: bool = False,
                 learn_temperature: bool = False, similarity: str = "cosine", tile_size: TileSize = None,
                 reduction: str = "mean", symmetric: Optional[bool] = None) -> None:
        super().__init__(temperature=temperature, two_view=two_view, learn_temperature=learn_temperature,
                         similarity=similarity, tile_size=tile_size, reduction=reduction, symmetric=symmetric)
        check_scale("sigma", sigma)
        self.sigma = float(sigma)
