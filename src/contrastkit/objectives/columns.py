"""(anchor, positive, negative_1, ..., negative_n) columns -> any contrastkit objective.

One description of the column layout, read by every path that holds a batch of
(query, positive document, hard negatives): the main job's training step
(:mod:`contrastkit.recipes.text_steps`), the sentence-transformers and Lightning
integrations. The layout is read from the objective's ``forward`` signature:

- ``"hard_negatives"``: a var-positional argument, ``MultipleNegativesRanking(anchors,
  candidates, *hard_negatives, masks=())``: ``objective(anchor, positive, *negatives)``;
- ``"positives"``: a ``positives`` argument (InfoNCE, DCL / DCLW, debiased / hard-negative,
  SigLIP): ``objective(anchor, cat([positive, *negatives]), positives=arange(N))``, the
  column layout of sentence-transformers' MNRL (row i's positive is column i, the
  negatives follow block by block);
- ``"pairs"``: two aligned tensors and nothing else (NT-Xent, alignment / uniformity, CWCL):
  ``objective(anchor, positive)``; hard negatives cannot be given to it.

False-negative ``masks`` (:class:`~contrastkit.engine.TileMask` over anchors x the columns
above) reach the objectives of the first two layouts that take ``masks=``; an objective on
(features, labels) (SupCon, multi-view, I-Con) is not a column objective. Whatever cannot
be honoured raises a ValueError; nothing is dropped silently. An objective whose
denominator needs a negative (DCL / DCLW, debiased / hard-negative: an ``empty_rows``
argument) is called with ``empty_rows="skip"``: a row that the masks leave without any
negative in one batch leaves that batch's loss with a RuntimeWarning instead of stopping a
training run (MNRL's row would give loss 0 and no gradient).

Example::

    import torch, contrastkit as ck
    from contrastkit.objectives.columns import call_with_columns
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    loss = call_with_columns(ck.losses.InfoNCE(temperature=0.05), a, p, [n])
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..engine import TileMask
from .base import Work

__all__ = ["call_with_columns", "column_layout", "takes_column_masks", "ColumnObjective", "LAYOUTS"]

LAYOUTS = ("hard_negatives", "positives", "pairs")
_NOT_COLUMNS = ("features", "labels")  # (features, labels) objectives: SupCon, multi-view, I-Con


def _parameters(objective: Callable[..., Tensor]):
    # a module instance or class: its forward; a plain function: itself
    target = objective.forward if isinstance(objective, (nn.Module, type)) else objective
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # not introspectable
        return None
    return [p for p in params if p.name != "self"]


def column_layout(objective: Callable[..., Tensor]) -> str:
    """How ``objective`` (a module, a module class or a function) takes (anchor, positive,
    negatives) columns: one of :data:`LAYOUTS` (see the module doc). Raises ValueError
    naming the objective when it is not a column objective ((features, labels) or a single
    tensor)."""
    name = objective.__name__ if isinstance(objective, type) else type(objective).__name__
    params = _parameters(objective)
    if params is None:  # not introspectable: assume the MNRL layout
        return "hard_negatives"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and (positional[0].name in _NOT_COLUMNS or
                       (len(positional) > 1 and positional[1].name in _NOT_COLUMNS)):
        raise ValueError(
            f"objective {name} takes ({', '.join(p.name for p in positional[:2])}): it is not an "
            "(anchor, positive, negatives) column objective; use contrastkit.scale.GradCache.embed with it directly")
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return "hard_negatives"
    if len(positional) < 2:
        raise ValueError(
            f"objective {name} takes one tensor ({', '.join(p.name for p in positional) or 'none'}): it is not an "
            "(anchor, positive, negatives) column objective; use contrastkit.scale.GradCache.embed with it directly")
    if any(p.name == "positives" for p in params):
        return "positives"
    return "pairs"


def takes_column_masks(objective: Callable[..., Tensor]) -> bool:
    """Whether ``objective`` takes false-negative ``masks=`` over anchors x columns (the
    ``hard_negatives`` and ``positives`` layouts with a ``masks`` argument; a ``pairs``
    objective's own masks, NT-Xent's, index another layout)."""
    params = _parameters(objective)
    if params is None:
        return True
    return column_layout(objective) != "pairs" and any(p.name == "masks" for p in params)


def call_with_columns(objective: Callable[..., Tensor], anchor: Tensor, positive: Tensor,
                      negatives: Sequence[Tensor] = (), *, masks: Sequence[TileMask] = ()) -> Tensor:
    """Run ``objective`` on (anchor, positive, negative_1, ..., negative_n) columns, laid out
    as :func:`column_layout` says; ``masks`` (anchors x [positive, negatives...] columns) are
    passed when given. ValueError when the objective cannot take the negatives or the masks.

    Example::

        import torch, contrastkit as ck
        from contrastkit.objectives.columns import call_with_columns
        a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
        call_with_columns(ck.losses.InfoNCE(temperature=0.05), a, p, [n])
    """
    return _call(objective, column_layout(objective), takes_column_masks(objective), anchor, positive, negatives,
                 tuple(masks), _takes_empty_rows(objective))


def _takes_empty_rows(objective: Callable[..., Tensor]) -> bool:
    params = _parameters(objective)
    return params is not None and any(p.name == "empty_rows" for p in params)


def _call(objective, layout: str, takes_masks: bool, anchor: Tensor, positive: Tensor, negatives: Sequence[Tensor],
          masks: Sequence[TileMask], skip_empty: bool = False) -> Tensor:
    """:func:`call_with_columns` with the objective's layout already read."""
    name = type(objective).__name__
    if masks and not takes_masks:
        raise ValueError(f"objective {name} takes no false-negative masks over (anchor x positive, negatives) "
                         "columns; drop the masks or use an objective that takes masks= (MultipleNegativesRanking, "
                         "InfoNCE, DCL, DebiasedContrastive, HardNegativeContrastive, SigLIP)")
    extra = {"masks": masks} if masks else {}
    if skip_empty and layout != "pairs":
        extra["empty_rows"] = "skip"
    if layout == "hard_negatives":
        return objective(anchor, positive, *negatives, **extra)
    if layout == "positives":
        if not negatives:
            return objective(anchor, positive, **extra)
        candidates = torch.cat([positive, *negatives])
        index = torch.arange(anchor.shape[0], device=anchor.device)
        return objective(anchor, candidates, positives=index, **extra)
    if negatives:
        raise ValueError(
            f"objective {name} takes no hard negatives (no *hard_negatives and no positives= argument), but the "
            f"batch has {len(negatives)} negative column(s); use (anchor, positive) pairs or an objective such as "
            "MultipleNegativesRanking or InfoNCE")
    return objective(anchor, positive)


class ColumnObjective(nn.Module):
    """Any column objective behind MultipleNegativesRanking's call,
    ``forward(anchors, candidates, *hard_negatives, masks=())`` -> :func:`call_with_columns`.

    Its :class:`~contrastkit.objectives.base.Work` names every argument a per-row block, so
    :class:`~contrastkit.scale.DistributedLoss` gathers each block over the processes on its
    own (all positives, then all first negatives, ...: the global column layout the masks
    index) and evaluates the wrapped objective on the whole batch on every process. The
    wrapped objective's parameters (a learned temperature, SigLIP's bias) are this module's.

    Example::

        import torch, contrastkit as ck
        from contrastkit.objectives.columns import ColumnObjective
        loss_fn = ColumnObjective(ck.losses.DCL(temperature=0.05))
        q, d, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
        loss = loss_fn(q, d, n)
    """

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        # read once, not at every step; raises for a (features, labels) objective
        self.layout = column_layout(objective)
        self.takes_masks = takes_column_masks(objective)
        self.skip_empty = _takes_empty_rows(objective)
        self.objective = objective

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates", "*hard_negatives"), positives="index", dropped=("masks",),
                    local=None)

    @property
    def reduction(self) -> str:
        return getattr(self.objective, "reduction", "mean")

    def forward(self, anchors: Tensor, candidates: Tensor, *hard_negatives: Tensor,
                masks: Sequence[TileMask] = ()) -> Tensor:
        return _call(self.objective, self.layout, self.takes_masks, anchors, candidates, hard_negatives, tuple(masks),
                     self.skip_empty)
