"""Dataset columns -> a contrastkit objective: (anchor, positive, negative_1, ..., negative_n).

Shared by the trainer integrations (:mod:`contrastkit.integrations.sentence_transformers`,
:mod:`contrastkit.integrations.lightning`).

Example::

    import torch, contrastkit as ck
    from contrastkit.integrations.columns import call_with_columns
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    loss = call_with_columns(ck.losses.MultipleNegativesRanking(scale=20.0), a, p, [n])
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["call_with_columns"]


_NOT_COLUMNS = ("features", "labels")  # (features, labels) objectives: SupCon, multi-view, I-Con


def call_with_columns(objective: Callable[..., Tensor], anchor: Tensor, positive: Tensor,
                      negatives: Sequence[Tensor] = ()) -> Tensor:
    """Run an index-target objective on (anchor, positive, negative_1, ..., negative_n) columns.

    The layout is read from the objective's ``forward`` signature:

    - a var-positional argument (``MultipleNegativesRanking(anchors, candidates, *hard_negatives)``):
      ``objective(anchor, positive, *negatives)``;
    - no negatives: ``objective(anchor, positive)`` (InfoNCE, NT-Xent, SigLIP, DCL, CWCL,
      alignment / uniformity...: row i of ``positive`` is anchor i's positive);
    - negatives and a ``positives`` argument (InfoNCE, DCL, debiased, SigLIP):
      ``objective(anchor, cat([positive, *negatives]), positives=arange(N))``, the column
      layout of sentence-transformers' MNRL.

    An objective on (features, labels) (SupCon, multi-view, I-Con) is not a column
    objective and raises a ValueError, as does one that cannot take the negatives.

    Example::

        import torch, contrastkit as ck
        from contrastkit.integrations.columns import call_with_columns
        a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
        call_with_columns(ck.losses.InfoNCE(temperature=0.05), a, p, [n])
    """
    name = type(objective).__name__
    target = objective.forward if isinstance(objective, nn.Module) else objective
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # not introspectable: assume the MNRL layout
        return objective(anchor, positive, *negatives)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name == "self":
        positional = positional[1:]
    if positional and (positional[0].name in _NOT_COLUMNS or
                       (len(positional) > 1 and positional[1].name in _NOT_COLUMNS)):
        raise ValueError(
            f"objective {name} takes ({', '.join(p.name for p in positional[:2])}): it is not an "
            "(anchor, positive, negatives) column objective; use contrastkit.scale.GradCache.embed with it directly")
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return objective(anchor, positive, *negatives)
    if len(positional) < 2:
        raise ValueError(
            f"objective {name} takes one tensor ({', '.join(p.name for p in positional) or 'none'}): it is not an "
            "(anchor, positive, negatives) column objective; use contrastkit.scale.GradCache.embed with it directly")
    if not negatives:
        return objective(anchor, positive)
    if any(p.name == "positives" for p in params):
        candidates = torch.cat([positive, *negatives])
        index = torch.arange(anchor.shape[0], device=anchor.device)
        return objective(anchor, candidates, positives=index)
    raise ValueError(
        f"objective {name} takes no hard negatives (no *hard_negatives and no positives= argument), but the "
        f"dataset has {len(negatives)} negative column(s); use (anchor, positive) pairs or an objective such as "
        "MultipleNegativesRanking or InfoNCE")
