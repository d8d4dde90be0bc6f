"""Supervised contrastive loss, SupCon (Khosla et al. 2020, "Supervised Contrastive Learning").

Anchors are all views of all samples; the positives P(i) of anchor i are the other
views with its label (itself excluded), the denominator A(i) every other view. With
X_ij = sim(z_i, z_j) / t:

    L_out:  loss_i = -1/|P(i)| sum_{p in P(i)} [ X_ip - log sum_{a in A(i)} exp(X_ia) ]
    L_in:   loss_i = -log( 1/|P(i)| sum_{p in P(i)} exp(X_ip) / sum_{a in A(i)} exp(X_ia) )

averaged over the anchors that have at least one positive (rows without one are left
out and counted in :class:`SupConStats`). ``L_out`` (the default, the paper's better
variant) is the mean positive logit, an O(N d) class-sum, minus the tiled log-sum-exp;
``L_in`` needs the log-sum-exp over the positives only, which the engine computes in the
same tile walk as the one over the negatives (complementary label masks).

With ``margin`` m > 0 every positive similarity is lowered by m before scaling, in the
numerator and in the denominator (additive margin, NT-Xent-AM style).

Extra candidates with labels (a memory queue of past embeddings) join the candidates:
their same-label entries are positives, the others negatives.

Example::

    import torch, contrastkit as ck
    features, labels = torch.randn(16, 2, 8), torch.randint(0, 4, (16,))
    loss = ck.losses.SupCon(temperature=0.1)(features, labels)        # features (N, V, d)
    loss, stats = ck.functional.supcon(features, labels, temperature=0.1, return_stats=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..engine import (
    DiagonalMask,
    DifferentLabelMask,
    LabelMask,
    LSEStat,
    label_positive_logits,
    tiled_logsumexp,
    tiled_multi_logsumexp,
)
from ..engine.tiling import TileSize
from ..validation import check_choice, check_embeddings, check_labels, check_number, check_reduction
from ._rows import append_candidates, expand_temperature
from .base import SIMILARITIES, Objective, Work
from .common import finish_rows, inverse_temperature

__all__ = ["supcon", "SupCon", "SupConStats", "CITATION"]

CITATION = """@inproceedings{khosla2020supcon,
  title     = {Supervised Contrastive Learning},
  author    = {Khosla, Prannay and Teterwak, Piotr and Wang, Chen and Sarna, Aaron and Tian, Yonglong and
               Isola, Phillip and Maschinot, Aaron and Liu, Ce and Krishnan, Dilip},
  booktitle = {NeurIPS},
  year      = {2020},
  note      = {arXiv:2004.11362}
}"""

VARIANTS = ("out", "in")


@dataclass(frozen=True)
class SupConStats:
    """What a SupCon call saw: anchors, anchors without any positive (left out of the
    mean), and the mean number of positives of the anchors that have some.

    Example::

        import torch, contrastkit as ck
        z, y = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 1, 2])   # one view; label 2 is alone
        loss, stats = ck.functional.supcon(z, y, temperature=0.1, return_stats=True)
        assert stats.n_rows == 6 and stats.n_rows_without_positive == 1
    """

    n_rows: int
    n_rows_without_positive: int
    mean_positives: float


def _flatten_views(features: Tensor, labels, name: str = "features") -> Tuple[Tensor, Tensor, int]:
    if not isinstance(features, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 3:
        check_embeddings(name, features, ndim=3)
        n, v, _ = features.shape
        if v == 0:
            raise ValueError(f"{name} has 0 views (shape {tuple(features.shape)})")
        labels = check_labels("labels", labels, n, features.device)
        # view-major, as the reference implementation: row v * N + i is view v of sample i
        z = features.transpose(0, 1).reshape(n * v, features.shape[-1])
        return z, labels.repeat(v), n
    check_embeddings(name, features)
    labels = check_labels("labels", labels, features.shape[0], features.device)
    return features, labels, features.shape[0]


def supcon(
    features: Tensor,
    labels: Tensor,
    extra_candidates: Optional[Tensor] = None,
    extra_labels: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.1,
    variant: str = "out",
    margin: float = 0.0,
    similarity: str = "cosine",
    tile_size: TileSize = None,
    reduction: str = "mean",
    return_stats: bool = False,
) -> Union[Tensor, Tuple[Tensor, SupConStats]]:
    """SupCon of ``features`` (N, d) or (N, V, d) with integer ``labels`` (N,), exact and tiled.

    Args:
        temperature: a float, a scalar tensor (learnable) or one per anchor: (N,) per
            sample (repeated over the views) or (N * V,) per view row.
        variant: ``"out"`` (mean of log-probabilities over the positives, default) or
            ``"in"`` (log of the mean probability over the positives).
        margin: additive margin (similarity units) subtracted from every positive.
        extra_candidates, extra_labels: more candidates (E, d) with labels (E,), e.g.
            ``queue.candidates()`` / ``queue.labels()`` of a :class:`~contrastkit.negatives.MemoryQueue`.
        similarity: ``"cosine"`` (L2-normalise) or ``"dot"``.
        reduction: ``"mean"`` over anchors with a positive, ``"sum"``, or ``"none"``
            (one loss per view row, view-major, 0 for rows without positive).
        return_stats: also return a :class:`SupConStats`.

    Raises ValueError when no anchor has a positive (every label unique in the batch).

    Example::

        import torch, contrastkit as ck
        z, y = torch.randn(32, 2, 128), torch.randint(0, 4, (32,))
        ck.functional.supcon(z, y, temperature=0.1)        # two views per sample
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("similarity", similarity, SIMILARITIES)
    check_reduction(reduction)
    margin = check_number("margin", margin)
    z, row_labels, n_samples = _flatten_views(features, labels)
    if similarity == "cosine":
        z = l2_normalize(z)
    rows = z.shape[0]
    k, col_labels = z, row_labels
    if (extra_candidates is None) != (extra_labels is None):
        raise ValueError("extra_candidates and extra_labels must be given together (SupCon needs the labels)")
    if extra_candidates is not None:
        if not isinstance(extra_candidates, Tensor) or extra_candidates.dim() != 2:
            shape = tuple(extra_candidates.shape) if isinstance(extra_candidates, Tensor) else type(extra_candidates).__name__
            raise ValueError(f"extra_candidates must have shape (E, d), got {shape}")
        extra_labels = check_labels("extra_labels", extra_labels, extra_candidates.shape[0], z.device)
        k = append_candidates(z, extra_candidates, similarity)
        if k is not z:
            col_labels = torch.cat([row_labels, extra_labels])
    temperature = expand_temperature(temperature, n_samples, rows)
    s = inverse_temperature(temperature, z)          # inside the engine's walk: z / t is never formed

    mean_pos, count = label_positive_logits(z, k, row_labels, col_labels, self_offset=0)
    mean_pos = mean_pos * s
    valid = count > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(
            "no anchor has a positive: every label occurs once (pass several views, "
            "or batches with at least two samples of some class)"
        )
    if variant == "out" and not margin:
        lse, _ = tiled_logsumexp(z, k, masks=[DiagonalMask(0)], tile_size=tile_size, scale=s)
        row_losses = lse.to(mean_pos.dtype) - mean_pos
    else:
        neg, pos = tiled_multi_logsumexp(
            z, k,
            [LSEStat(1.0, (LabelMask(row_labels, col_labels),)),
             LSEStat(1.0, (DifferentLabelMask(row_labels, col_labels), DiagonalMask(0)))],
            tile_size=tile_size, scale=s,
        ).to(mean_pos.dtype)
        shift = margin * s.expand(rows) if margin else None
        if shift is not None:
            pos = pos - shift
            mean_pos = mean_pos - shift
        # keep rows without positive finite (they are dropped below)
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        den = torch.logaddexp(neg, pos)
        if variant == "out":
            row_losses = den - mean_pos
        else:
            row_losses = den - pos + count.clamp(min=1).to(pos.dtype).log()
    loss = finish_rows(row_losses, valid, reduction)
    if not return_stats:
        return loss
    stats = SupConStats(
        n_rows=rows,
        n_rows_without_positive=rows - n_valid,
        mean_positives=float(count[valid].double().mean()),
    )
    return loss, stats


class SupCon(Objective):
    """SupCon loss module: ``forward(features, labels, extra_candidates=None, extra_labels=None)``.

    ``features`` is (N, d) or (N, V, d); see :func:`supcon`. The statistics of the last
    call (anchors without positive, mean positives) are kept in ``last_stats``.
    ``learn_temperature=True`` makes the temperature a parameter (log-parameterised,
    clamped to [0.01, 100]).

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.SupCon(temperature=0.1)
        feats = torch.randn(16, 2, 8, requires_grad=True)
        loss = loss_fn(feats, torch.randint(0, 3, (16,)))
        loss.backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.1, variant: str = "out", margin: float = 0.0,
                 learn_temperature: bool = False, similarity: str = "cosine", tile_size: TileSize = None,
                 reduction: str = "mean") -> None:
        check_choice("variant", variant, VARIANTS)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction, margin=margin)
        self.variant = variant
        self.last_stats: Optional[SupConStats] = None

    @property
    def work(self) -> Work:
        return Work(rows=("features",), labels=("labels",), shared=("extra_candidates", "extra_labels"),
                    positives="labels", self_position=True, margin=self.margin)

    def forward(self, features: Tensor, labels: Tensor, extra_candidates: Optional[Tensor] = None,
                extra_labels: Optional[Tensor] = None) -> Tensor:
        loss, self.last_stats = supcon(features, labels, extra_candidates, extra_labels, variant=self.variant,
                                       margin=self.margin, return_stats=True, **self._settings())
        return loss

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, " + super().extra_repr()
