"""Negatives: where the candidates beyond the batch come from.

- :class:`MemoryQueue`: FIFO queue of past (detached) embeddings and labels, used as
  extra candidates by the objectives (MoCo / cross-batch memory).
- :class:`MomentumEncoder`: EMA copy of an encoder for the queued keys.
"""

from .momentum import MomentumEncoder
from .queue import MemoryQueue

__all__ = ["MemoryQueue", "MomentumEncoder"]
