"""The exact tiled pairwise engine (bottom layer: imports nothing above it).

Public pieces:
- :func:`tiled_logsumexp`: row / column log-sum-exp of Q K^T with O(N + M) saved state.
- :func:`tiled_multi_logsumexp`: several scaled / masked row log-sum-exps in one walk
  (hard-negative reweighting, SupCon L_in).
- masks (:class:`DiagonalMask`, :class:`LabelMask`, :class:`IndexMask`): entries left
  out of the denominator, applied per tile.
- :func:`positive_logits` and :func:`label_positive_logits`: the O(N d) numerator terms.
- input checks in :mod:`contrastkit.engine.validation`.
"""

from .masks import DiagonalMask, DifferentLabelMask, IndexMask, LabelMask, TileMask
from .multi_lse import LSEStat, tiled_multi_logsumexp
from .positives import label_positive_logits, positive_logits
from .tiled_lse import tiled_logsumexp, tiled_logsumexp_with_positives
from .tiling import choose_tile

__all__ = [
    "tiled_logsumexp",
    "tiled_logsumexp_with_positives",
    "choose_tile",
    "TileMask",
    "DiagonalMask",
    "LabelMask",
    "DifferentLabelMask",
    "tiled_multi_logsumexp",
    "LSEStat",
    "IndexMask",
    "positive_logits",
    "label_positive_logits",
]
