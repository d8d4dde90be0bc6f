"""Negatives: where the candidates beyond the batch come from, and which to leave out.

- :class:`MemoryQueue`: FIFO queue of past (detached) embeddings and labels, used as
  extra candidates by the objectives (MoCo / cross-batch memory).
- :class:`MomentumEncoder`: EMA copy of an encoder for the queued keys.
- :func:`mine_hard_negatives`: hard negatives from a corpus with a rank window and
  NV-Retriever's relative-margin false-negative filter (:mod:`.mining`).
- :class:`NoDuplicatesBatchSampler`, :class:`B3BatchSampler`: batches without repeated
  texts, and batches of mutual hard negatives (:mod:`.samplers`).
- :class:`ShuffleBufferBatches`: seeded shuffle-buffer batches over a training file
  larger than memory, read lazily each epoch (:mod:`.stream_sampler`).
- :class:`DuplicatePositiveMask`, :class:`GuideMask`: in-batch false negatives left out
  of the loss, per tile (:mod:`.false_negatives`).
"""

from .false_negatives import DuplicatePositiveMask, GuideMask, mnrl_columns
from .mining import MinedNegatives, known_positives, mine_hard_negatives
from .momentum import MomentumEncoder
from .queue import MemoryQueue
from .samplers import B3BatchSampler, NoDuplicatesBatchSampler
from .stream_sampler import ShuffleBufferBatches

__all__ = ["MemoryQueue", "MomentumEncoder", "MinedNegatives", "mine_hard_negatives", "known_positives",
           "DuplicatePositiveMask", "GuideMask", "mnrl_columns",
           "NoDuplicatesBatchSampler", "B3BatchSampler", "ShuffleBufferBatches"]
