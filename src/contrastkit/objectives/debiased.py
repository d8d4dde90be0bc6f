"""Debiased contrastive loss (Chuang et al. 2020) and hard-negative reweighting
(Robinson et al. 2021), exact and tiled.

For anchor i with positive logit P = X_ip and negatives X_ij (j in the Q_i = the
candidates other than the anchor itself and its positive), X = sim / t:

    R_i  = log( Q_i * sum_j exp((1 + beta) X_ij) / sum_j exp(beta X_ij) )   (beta = 0: log sum_j exp(X_ij))
    Ng_i = max( (exp(R_i) - tau_plus * Q_i * exp(P)) / (1 - tau_plus),  Q_i * e^{-1/t} )
    loss_i = -log( exp(P) / (exp(P) + Ng_i) )

``tau_plus`` is the class prior (probability that a "negative" shares the anchor's
class); the clamp at Q e^{-1/t} (the smallest value exp(cos / t) can take) is the
published one. With ``beta = 0`` this is the debiased loss of Chuang et al.; with
``beta > 0`` the negatives are importance-weighted by exp(beta X) (hard negatives count
more), Robinson et al.'s loss; ``tau_plus = 0, beta = 0`` is plain InfoNCE / NT-Xent.

Both log-sum-exps come from one walk over the tiles
(:func:`contrastkit.engine.tiled_multi_logsumexp`); Ng is formed in log space with a
stable ``log(1 - exp(.))``, so nothing overflows at small temperatures.

Layouts as in :mod:`contrastkit.objectives.dcl`: ``two_view=True`` takes two views and
uses all 2N views as anchors, each against the other 2N - 2 (the papers' SimCLR form,
Q = 2N - 2); ``two_view=False`` takes anchors against candidates with positive
``positives[i]`` (default i) and Q = M - 1. Extra candidates (a memory queue) add to the
negatives and to Q. In the retrieval form ``masks=`` (as for
:func:`~contrastkit.objectives.info_nce.info_nce`) drop known false negatives; then Q_i is
each row's own count of the negatives it keeps, counted in the same walk (see
:func:`debiased_contrastive`).

Example::

    import torch, contrastkit as ck
    v1, v2 = torch.randn(16, 8), torch.randn(16, 8)
    loss = ck.functional.debiased_contrastive(v1, v2, temperature=0.5, tau_plus=0.1, two_view=True)
    loss = ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1)(v1, v2)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine import (DiagonalMask, IndexMask, LSEStat, TileMask, positive_logits, tiled_logsumexp,
                      tiled_multi_logsumexp)
from ..engine.tiling import TileSize
from ..validation import check_index, check_reduction
from ._rows import append_candidates, expand_temperature, log1mexp, reject_symmetric, two_view_layout
from .base import Objective, Work
from .common import default_positives, finish_rows, inverse_temperature, leave_out_empty_rows, prepare

__all__ = ["debiased_contrastive", "hard_negative_contrastive", "DebiasedContrastive", "HardNegativeContrastive",
           "CITATION", "HARD_NEGATIVE_CITATION"]

CITATION = """@inproceedings{chuang2020debiased,
  title     = {Debiased Contrastive Learning},
  author    = {Chuang, Ching-Yao and Robinson, Joshua and Lin, Yen-Chen and Torralba, Antonio and Jegelka, Stefanie},
  booktitle = {NeurIPS},
  year      = {2020},
  note      = {arXiv:2007.00224}
}"""

HARD_NEGATIVE_CITATION = """@inproceedings{robinson2021hard,
  title     = {Contrastive Learning with Hard Negative Samples},
  author    = {Robinson, Joshua and Chuang, Ching-Yao and Sra, Suvrit and Jegelka, Stefanie},
  booktitle = {ICLR},
  year      = {2021},
  note      = {arXiv:2010.04592}
}"""


def _check_hyper(tau_plus, beta):
    try:
        tau_plus, beta = float(tau_plus), float(beta)
    except (TypeError, ValueError):
        raise ValueError("tau_plus and beta must be numbers") from None
    if not (0.0 <= tau_plus < 1.0):
        raise ValueError(f"tau_plus (the class prior) must lie in [0, 1), got {tau_plus!r}")
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"beta (the hardness concentration) must be finite and >= 0, got {beta!r}")
    return tau_plus, beta


def debiased_contrastive(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    extra_candidates: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.5,
    tau_plus: float = 0.1,
    beta: float = 0.0,
    two_view: bool = False,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    reduction: str = "mean",
    symmetric: Optional[bool] = None,
    empty_rows: str = "raise",
) -> Tensor:
    """Debiased contrastive loss (Chuang et al. 2020); ``beta`` > 0 adds Robinson et al.'s
    hard-negative reweighting. See the module docstring for the formula.

    Args:
        temperature: float, scalar tensor (learnable) or one per anchor row.
        tau_plus: class prior in [0, 1).
        beta: hardness concentration >= 0 (0: no reweighting).
        two_view: the two-view (SimCLR) form with 2N anchors and 2N - 2 negatives each.
        positives: (retrieval form) column of each anchor's positive, -1 for none.
        extra_candidates: more negatives (E, d), e.g. ``queue.candidates()``.
        similarity: ``"cosine"`` (the published setting, for which the clamp is meant) or ``"dot"``.
        masks: (retrieval form only) extra entries to drop from each anchor's negatives (a
            sequence of :class:`~contrastkit.engine.TileMask`, e.g. an ``IndexMask`` of known
            false negatives per anchor), in the coordinates of the columns
            ``cat(candidates, extra_candidates)``. The estimator's Q becomes per row: Q_i =
            the negatives row i keeps (its positive is out already), in R_i, the floor
            Q_i e^{-1/t} and tau_plus * Q_i. The two-view form takes none (a ValueError).
        reduction: ``"mean"`` over rows with a positive, ``"sum"`` or ``"none"``.
        empty_rows: a row with a positive and Q_i = 0 (the estimator is undefined):
            ``"raise"`` (default) a ValueError naming it; ``"skip"`` leave it out of the loss
            like a row without positive, with a RuntimeWarning counting such rows (what the
            main job's training step uses).

    Example::

        import torch, contrastkit as ck
        v1, v2 = torch.randn(64, 128), torch.randn(64, 128)
        ck.functional.debiased_contrastive(v1, v2, temperature=0.5, tau_plus=0.1, two_view=True)
    """
    reject_symmetric(symmetric, "debiased_contrastive")
    tau_plus, beta = _check_hyper(tau_plus, beta)
    check_reduction(reduction)
    user_masks = tuple(masks)
    a, c = prepare(similarity, anchors=anchors, candidates=candidates)
    n = a.shape[0]
    if two_view:
        if positives is not None:
            raise ValueError("positives= is for the retrieval form; the two-view form (two_view=True) pairs view i with view i")
        if user_masks:
            raise ValueError("masks= is for the retrieval form (two_view=False): the two-view form (two_view=True) "
                             "takes no masks")
        z, index = two_view_layout(a, c)
        q, k = z, append_candidates(z, extra_candidates, similarity)
        masks = [DiagonalMask(0), IndexMask(index)]
        n_neg = k.shape[0] - 2
        temperature = expand_temperature(temperature, n, 2 * n)
    else:
        m = c.shape[0]
        q, k = a, append_candidates(c, extra_candidates, similarity)
        index = check_index("positives", default_positives(positives, n, m, a.device), n, m, a.device)
        masks = ([DiagonalMask(0)] if positives is None else [IndexMask(index)]) + list(user_masks)
        n_neg = k.shape[0] - 1
    valid = index >= 0
    if not bool(valid.any()):
        raise ValueError("no anchor row has a positive (every entry of positives is -1)")
    if n_neg < 1:
        raise ValueError("the debiased loss needs at least one negative per anchor")
    rows = q.shape[0]
    s = inverse_temperature(temperature, q)          # inside the engine's walk: q / t is never formed
    pos = positive_logits(q, k, index) * s
    if user_masks:
        # Q_i = the negatives each row keeps after the masks, counted in the same walk
        r, log_q, log_tau_q, valid = _masked_statistics(q, k, masks, s, beta, tau_plus, valid, tile_size, pos.dtype,
                                                        empty_rows)
    else:
        log_q = math.log(n_neg)
        log_tau_q = math.log(tau_plus * n_neg) if tau_plus > 0.0 else None
        if beta == 0.0:
            r, _ = tiled_logsumexp(q, k, masks=masks, tile_size=tile_size, scale=s)
            r = r.to(pos.dtype)
        else:
            hi, lo = tiled_multi_logsumexp(q, k, [LSEStat(1.0 + beta), LSEStat(beta)], masks=masks,
                                           tile_size=tile_size, scale=s).to(pos.dtype)
            r = log_q + hi - lo
    floor = log_q - s.expand(rows).to(pos.dtype)
    if tau_plus > 0.0:
        # log(exp(R) - tau+ Q exp(P)) = R + log(1 - exp(log(tau+ Q) + P - R)), when the argument is < 0
        x = log_tau_q + pos - r
        ok = x < 0
        x_safe = torch.where(ok, x, torch.full_like(x, -1.0))
        raw = r + log1mexp(x_safe) - math.log1p(-tau_plus)
        log_ng = torch.where(ok & (raw > floor), raw, floor)
    else:
        log_ng = torch.where(r > floor, r, floor)
    # log(exp(P) + Ng) - P = softplus(log Ng - P); F.softplus cuts off above 20, so use logaddexp
    d = log_ng - pos
    row_losses = torch.logaddexp(d, torch.zeros_like(d))
    return finish_rows(row_losses, valid, reduction)


def _masked_statistics(q, k, masks, s, beta, tau_plus, valid, tile_size, dtype, empty_rows):
    """With user masks: ``(R, log Q, log(tau+ Q), valid)`` per row, Q_i the count of
    negatives row i keeps (its positive and every masked entry left out), from one walk: the
    loss's statistic(s) and the engine's count of kept entries. A row with a positive and
    Q_i = 0 is a ValueError, or left out of ``valid`` with ``empty_rows="skip"``
    (:func:`~contrastkit.objectives.common.leave_out_empty_rows`); a row with Q_i = 0 gets
    finite placeholders (it is out of the loss)."""
    stats = [LSEStat(1.0)] if beta == 0.0 else [LSEStat(1.0 + beta), LSEStat(beta)]
    out, kept = tiled_multi_logsumexp(q, k, stats, masks=masks, tile_size=tile_size, scale=s, count=True)
    count = kept.double()
    empty = count == 0
    valid = leave_out_empty_rows(valid, empty, empty_rows, "debiased_contrastive")
    log_q = torch.where(empty, torch.zeros_like(count), count.log()).to(dtype)
    zero = torch.zeros_like(log_q)
    if beta == 0.0:
        r = out[0].to(dtype)
    else:
        r = log_q + out[0].to(dtype) - out[1].to(dtype)
    r = torch.where(empty, zero, r)                  # rows without positive and without negatives
    log_tau_q = math.log(tau_plus) + log_q if tau_plus > 0.0 else None
    return r, log_q, log_tau_q, valid


def hard_negative_contrastive(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    extra_candidates: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.5,
    beta: float = 1.0,
    tau_plus: float = 0.1,
    two_view: bool = False,
    similarity: str = "cosine",
    masks: Sequence[TileMask] = (),
    tile_size: TileSize = None,
    reduction: str = "mean",
    symmetric: Optional[bool] = None,
    empty_rows: str = "raise",
) -> Tensor:
    """Hard-negative reweighted contrastive loss (Robinson et al. 2021, "Contrastive Learning
    with Hard Negative Samples"): :func:`debiased_contrastive` with ``beta`` > 0 (default 1);
    the arguments (``masks`` included: retrieval form only, Q per row; ``empty_rows``) are its.

    Example::

        import torch, contrastkit as ck
        q, d = torch.randn(64, 128), torch.randn(64, 128)
        ck.functional.hard_negative_contrastive(q, d, temperature=0.5, beta=1.0, tau_plus=0.1)
    """
    reject_symmetric(symmetric, "hard_negative_contrastive")
    return debiased_contrastive(anchors, candidates, positives, extra_candidates, temperature=temperature,
                                tau_plus=tau_plus, beta=beta, two_view=two_view, similarity=similarity,
                                masks=masks, tile_size=tile_size, reduction=reduction, empty_rows=empty_rows)


class DebiasedContrastive(Objective):
    """Debiased contrastive loss module (Chuang et al. 2020): ``forward(anchors, candidates,
    positives=None, extra_candidates=None, *, masks=())`` (``masks``: retrieval form only);
    see :func:`debiased_contrastive`.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.DebiasedContrastive(temperature=0.5, tau_plus=0.1, two_view=True)
        v1, v2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        loss_fn(v1, v2).backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 0.0,
                 two_view: bool = False, learn_temperature: bool = False, similarity: str = "cosine",
                 tile_size: TileSize = None, reduction: str = "mean", symmetric: Optional[bool] = None) -> None:
        reject_symmetric(symmetric, type(self).__name__)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction)
        self.tau_plus, self.beta = _check_hyper(tau_plus, beta)
        self.two_view = bool(two_view)

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates"), index={"positives": "candidates"}, shared=("extra_candidates",),
                    positives="index", self_position=self.two_view, dropped=("positive", "masks"),
                    weighted="hardness" if self.beta else "debiased")

    def forward(self, anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None,
                extra_candidates: Optional[Tensor] = None, *, masks: Sequence[TileMask] = (),
                empty_rows: str = "raise") -> Tensor:
        return debiased_contrastive(anchors, candidates, positives, extra_candidates, tau_plus=self.tau_plus,
                                    beta=self.beta, two_view=self.two_view, masks=masks, empty_rows=empty_rows,
                                    **self._settings())

    def extra_repr(self) -> str:
        return f"tau_plus={self.tau_plus}, beta={self.beta}, two_view={self.two_view}, " + super().extra_repr()


class HardNegativeContrastive(DebiasedContrastive):
    """Hard-negative reweighted loss module (Robinson et al. 2021); ``beta`` default 1.0.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1, two_view=True)
        v1, v2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
        loss_fn(v1, v2).backward()
    """

    citation = HARD_NEGATIVE_CITATION

    def __init__(self, *, temperature: float = 0.5, beta: float = 1.0, tau_plus: float = 0.1,
                 two_view: bool = False, learn_temperature: bool = False, similarity: str = "cosine",
                 tile_size: TileSize = None, reduction: str = "mean", symmetric: Optional[bool] = None) -> None:
        super().__init__(temperature=temperature, tau_plus=tau_plus, beta=beta, two_view=two_view,
                         learn_temperature=learn_temperature, similarity=similarity, tile_size=tile_size,
                         reduction=reduction, symmetric=symmetric)
