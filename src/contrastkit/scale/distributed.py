"""Kept for imports written before the split: the pieces now live in
:mod:`.collectives` (all-gather with grad, shape checks, gradient averaging),
:mod:`.ring` (ring passing) and :mod:`.distributed_loss` (:class:`DistributedLoss`)."""

from .collectives import (  # noqa: F401
    all_gather_with_grad,
    average_gradients,
    check_same_shapes,
    mean_over_ranks,
    rank_and_world,
)
from .distributed_loss import DistributedLoss, distributed_index_loss, distributed_siglip  # noqa: F401
from .ring import ring_logsumexp  # noqa: F401
