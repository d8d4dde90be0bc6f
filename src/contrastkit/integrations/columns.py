"""Dataset columns -> a contrastkit objective: (anchor, positive, negative_1, ..., negative_n).

Shared by the trainer integrations (:mod:`contrastkit.integrations.sentence_transformers`,
:mod:`contrastkit.integrations.lightning`); the layout itself lives in
:mod:`contrastkit.objectives.columns`, which the main job's training step reads too.

Example::

    import torch, contrastkit as ck
    from contrastkit.integrations.columns import call_with_columns
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    loss = call_with_columns(ck.losses.MultipleNegativesRanking(scale=20.0), a, p, [n])
"""

from ..objectives.columns import call_with_columns, column_layout

__all__ = ["call_with_columns", "column_layout"]
