"""The exact tiled pairwise engine (bottom layer: imports nothing above it).

One tile walker (:class:`contrastkit.engine.tiles.Tiles`: tiles of
``X = s q k^T + r + c`` in reused buffers, masks, numerical limits, the direct regime)
under four autograd Functions, each taking ``scale=`` (1 / temperature: a number, a
learnable 0-dim tensor or one per anchor row) with its exact gradient:

- :func:`tiled_logsumexp` / :func:`tiled_logsumexp_with_positives`: row / column
  log-sum-exp with O(N + M) saved state (and the positive logits).
- :func:`tiled_multi_logsumexp`: several scaled / masked row log-sum-exps in one walk
  (hard-negative reweighting, SupCon L_in).
- :func:`contrastkit.engine.tiled_pairwise.tiled_pairwise` (not re-exported here, so that
  the module keeps its name): weighted kernel sums and log-sum-exps (Gaussian / Student-t /
  soft targets: I-Con).
- :func:`tiled_softplus_rows`: SigLIP's pairwise softplus sums.
- masks (:class:`DiagonalMask`, :class:`LabelMask`, :class:`IndexMask`, ...): entries
  left out, applied per tile.
- :func:`positive_logits` and :func:`label_positive_logits`: the O(N d) numerator terms.

Example::

    import torch
    from contrastkit.engine import tiled_logsumexp
    q, k = torch.randn(256, 32), torch.randn(256, 32)
    rows, _ = tiled_logsumexp(q, k, scale=0.5)
"""

from .masks import DiagonalMask, DifferentLabelMask, IndexMask, LabelMask, TileMask
from .multi_lse import LSEStat, tiled_multi_logsumexp
from .positives import label_positive_logits, positive_logits
from .tiled_lse import tiled_logsumexp, tiled_logsumexp_with_positives
from .tiled_softplus import tiled_softplus_rows
from .tiling import choose_tile

__all__ = [
    "tiled_logsumexp",
    "tiled_logsumexp_with_positives",
    "tiled_multi_logsumexp",
    "tiled_softplus_rows",
    "choose_tile",
    "TileMask",
    "DiagonalMask",
    "LabelMask",
    "DifferentLabelMask",
    "LSEStat",
    "IndexMask",
    "positive_logits",
    "label_positive_logits",
]
