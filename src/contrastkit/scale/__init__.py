"""Scaling: gradient caching and many processes, exact and bounded in memory.

- :class:`GradCache`: chunked encoder passes with RNG replay; activation memory of
  one chunk, parameter gradients of the full batch.
- :class:`DistributedLoss`, :func:`all_gather_with_grad`, :func:`ring_logsumexp`:
  every rank's anchors against every rank's candidates with the 1-rank gradient
  (after DDP averaging), gathered or passed round a ring.

Example::

    import torch, contrastkit as ck
    encoder = torch.nn.Linear(16, 8)
    gc = ck.scale.GradCache(encoder, ck.scale.DistributedLoss(ck.losses.InfoNCE()), chunk_size=32)
    q_batch, d_batch = torch.randn(128, 16), torch.randn(128, 16)
    loss = gc.step(q_batch, d_batch)      # one process: the plain loss; under torchrun: all ranks' rows
    assert encoder.weight.grad is not None
"""

from .collectives import (
    all_gather_rows,
    all_gather_with_grad,
    average_gradients,
    check_same_shapes,
    global_value,
    mean_over_ranks,
    rank_and_world,
)
from .distributed_loss import DistributedLoss, distributed_index_loss, distributed_siglip
from .ring import ring_logsumexp, ring_siglip_sum
from .grad_cache import GradCache, RandState, default_embed, plan_chunks, select_rows

__all__ = [
    "GradCache",
    "RandState",
    "plan_chunks",
    "select_rows",
    "default_embed",
    "DistributedLoss",
    "all_gather_with_grad",
    "ring_logsumexp",
    "distributed_index_loss",
    "distributed_siglip",
    "ring_siglip_sum",
    "all_gather_rows",
    "global_value",
    "check_same_shapes",
    "average_gradients",
    "mean_over_ranks",
    "rank_and_world",
]
