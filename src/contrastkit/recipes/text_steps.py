"""One training step of the text-retrieval recipe: a batch of examples -> tokens ->
gradient-cached tiled objective with false negatives masked.

The candidates of a batch of N examples with h hard negatives each are laid out as the
MNRL / InfoNCE-with-hard-negatives columns: the N positives, then the first negatives of
all examples, then the second, ... (:func:`contrastkit.negatives.false_negatives.mnrl_columns`).
Two masks remove false negatives from each anchor's denominator without forming N x M:

- :class:`~contrastkit.negatives.false_negatives.DuplicatePositiveMask`: a candidate that
  is another known positive of the anchor's query (a query with several relevant
  documents; the same document mined for another query);
- :class:`~contrastkit.negatives.false_negatives.GuideMask` (GISTEmbed, Solatorio 2024,
  arXiv:2402.16829): a candidate the frozen base model scores above the anchor's positive
  minus ``guide_margin``. The guide's embeddings are looked up from the base model's
  corpus and query embeddings computed once before training (no extra encoder pass).

With ``memory_steps = S > 0`` the step also keeps a cross-batch memory (XBM, Wang et al.
2020, arXiv:1912.06798): the detached document embeddings (positives and hard negatives) of
the last S steps join every anchor's candidates as one more column block, at no encoder
cost. A remembered document that is a known positive of the anchor's query (or its own
positive) is masked by the same duplicate mask; the guide mask covers it too. Under
``torchrun`` the memory holds every rank's documents (gathered after each step), each rank
passes its own slice, and DistributedLoss's gather puts the whole memory back together.

The encoder passes are chunked by :class:`contrastkit.scale.GradCache`, so the batch is
set by the data, not by memory. Under ``torchrun`` each process encodes its slice of the
global batch and the objective, wrapped in :class:`contrastkit.scale.DistributedLoss`,
sees every rank's candidates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from ..data import Example
from ..negatives.false_negatives import DuplicatePositiveMask, GuideMask, mnrl_columns
from ..objectives.common import count_empty_rows
from ..scale import GradCache

__all__ = ["Guide", "RetrievalStep", "fill_negatives"]


@dataclass
class Guide:
    """The frozen base model's embeddings, by id: the GISTEmbed guide without extra passes."""

    query_index: Mapping[str, int]
    query_embeddings: Tensor
    doc_index: Mapping[str, int]
    doc_embeddings: Tensor
    margin: float = 0.0

    def covers(self, examples: Sequence[Example]) -> bool:
        return all(e.query_id in self.query_index for e in examples) and all(
            d in self.doc_index for e in examples for d in (e.positive_id, *e.negative_ids))


def fill_negatives(examples: Sequence[Example], num_negatives: int, corpus_ids: Sequence[str],
                   corpus_texts: Sequence[str], known: Mapping[str, Set[str]], *,
                   seed: Union[int, str] = 0) -> List[Example]:
    """Give every example exactly ``num_negatives`` negatives (the objective's columns
    need one count): extra ones are cut, missing ones (the mining window ran out) are
    drawn uniformly from the corpus, never a known positive of the query; seeded
    (``random.Random(seed)``: an int or a string, the same on every machine)."""
    import dataclasses

    rng = random.Random(seed)
    out = []
    for ex in examples:
        negs, ids = list(ex.negatives[:num_negatives]), list(ex.negative_ids[:num_negatives])
        if len(ids) < len(negs):
            ids += [None] * (len(negs) - len(ids))
        avoid = set(known.get(ex.query_id, ())) | {ex.positive_id} | set(ids)
        tries = 0
        while len(negs) < num_negatives:
            j = rng.randrange(len(corpus_ids))
            tries += 1
            if corpus_ids[j] in avoid and tries < 1000:
                continue
            negs.append(corpus_texts[j])
            ids.append(corpus_ids[j])
            avoid.add(corpus_ids[j])
        out.append(dataclasses.replace(ex, negatives=tuple(negs), negative_ids=tuple(ids)))
    return out


class RetrievalStep:
    """``step(examples) -> loss``: forward and backward of one global batch (see module doc).

    Args:
        query_encoder: a :class:`contrastkit.models.TextEncoder` (shared tower when
            ``doc_encoder`` is None).
        objective: a ``contrastkit.losses`` module taking ``(anchors, positives,
            *hard_negatives, masks=...)`` (or a DistributedLoss around one).
        query_max_length, doc_max_length: token truncation in training.
        chunk_size: rows per gradient-cached encoder pass.
        chunk_tokens: instead, padded tokens per pass (GradCache's token budget).
        autocast_dtype: ``torch.bfloat16`` or None.
        known_positives: query id -> ids of all its relevant documents (for the duplicate mask);
            the positives the batch itself shows for a query are added to them.
        guide: base-model embeddings for the GISTEmbed mask, or None.
        rank, world: this process's slice of the global batch.
        memory_steps: keep the document embeddings of this many past steps as extra
            candidates (0: no memory). The objective must take extra candidate blocks as
            ``*hard_negatives`` of any length (MultipleNegativesRanking does).

    ``state_dict()`` / ``load_state_dict()`` hold the memory, so a resumed run continues
    with the same candidates. ``pop_stats()`` gives ``{"empty_rows_skipped": k}``: the anchor
    rows the masks left without a negative since the last call, which an objective with an
    ``empty_rows`` argument (DCL, debiased, hard-negative) left out of its loss; the
    training loop writes them into ``metrics.jsonl`` instead of a warning per step.
    """

    def __init__(self, *, query_encoder: nn.Module, objective: nn.Module, query_max_length: int,
                 doc_max_length: int, chunk_size: int, doc_encoder: Optional[nn.Module] = None,
                 autocast_dtype: Optional[torch.dtype] = None, sort_by_length: bool = True,
                 known_positives: Optional[Mapping[str, Set[str]]] = None, mask_duplicates: bool = True,
                 guide: Optional[Guide] = None, rank: int = 0, world: int = 1, memory_steps: int = 0,
                 chunk_tokens: Optional[int] = None) -> None:
        if int(memory_steps) < 0:
            raise ValueError(f"memory_steps must be >= 0, got {memory_steps}")
        self.query_encoder, self.doc_encoder = query_encoder, doc_encoder
        self.objective = objective
        self.query_max_length, self.doc_max_length = int(query_max_length), int(doc_max_length)
        self.known = known_positives or {}
        self.mask_duplicates, self.guide = mask_duplicates, guide
        self.rank, self.world = rank, world
        self.cache = GradCache(query_encoder, objective, doc_encoder=doc_encoder, chunk_size=chunk_size,
                               chunk_tokens=chunk_tokens, sort_by_length=sort_by_length, autocast_dtype=autocast_dtype)
        self.empty_rows_skipped = 0
        self.memory_steps = int(memory_steps)
        # per remembered step: (every rank's documents, rank-major rows; their ids, one list per rank)
        self.memory: List[Tuple[Tensor, List[List[Optional[str]]]]] = []

    # -- cross-batch memory -------------------------------------------------------------
    def _memory_block(self) -> Tuple[Optional[Tensor], List[Optional[str]]]:
        """This rank's memory rows and the ids of the whole (gathered) memory block, in the
        column order DistributedLoss's gather gives: rank-major, then oldest step first."""
        if not self.memory:
            return None, []
        local = []
        for docs, ids in self.memory:
            rows = docs.shape[0] // self.world
            local.append(docs[self.rank * rows:(self.rank + 1) * rows])
        ids = [i for r in range(self.world) for _, step_ids in self.memory for i in step_ids[r]]
        return torch.cat(local), ids

    def _remember(self, batch: Sequence[Example]) -> None:
        docs = torch.cat(self.cache.last_embeddings[1:])          # this rank's positives, then negatives
        if self.world > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(docs) for _ in range(self.world)]
            dist.all_gather(parts, docs.contiguous())
            docs = torch.cat(parts)
        # each rank's rows are its share of the batch in the MNRL column layout
        ids = [mnrl_columns(batch[r * len(batch) // self.world:(r + 1) * len(batch) // self.world], key="id")
               for r in range(self.world)]
        self.memory = (self.memory + [(docs, ids)])[-self.memory_steps:]

    def pop_stats(self) -> Dict[str, int]:
        out, self.empty_rows_skipped = {"empty_rows_skipped": self.empty_rows_skipped}, 0
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"memory": [(docs.cpu(), ids) for docs, ids in self.memory]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(self.query_encoder.parameters()).device
        self.memory = [(docs.to(device), [list(r) for r in ids]) for docs, ids in state.get("memory", [])]

    def _tokens(self, encoder: nn.Module, texts: List[str], max_length: int) -> Dict[str, Tensor]:
        device = next(encoder.parameters()).device
        enc = encoder.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def masks(self, batch: Sequence[Example], memory_ids: Sequence[Optional[str]] = ()) -> list:
        """The false-negative masks of a global batch (anchor rows x MNRL columns, then the
        memory's columns ``memory_ids``)."""
        n = len(batch)
        positive_index = torch.arange(n)
        cols = mnrl_columns(batch, key="id") + list(memory_ids)
        out = []
        if self.mask_duplicates and all(e.query_id is not None for e in batch):
            # what the run knows of each query, and what the batch itself shows (a query twice
            # in the batch with two positives: each is the other's false negative)
            in_batch: Dict[str, Set[str]] = {}
            for e in batch:
                if e.positive_id is not None:
                    in_batch.setdefault(e.query_id, set()).add(e.positive_id)
            rows = [set(self.known.get(e.query_id, ())) | in_batch.get(e.query_id, set()) for e in batch]
            out.append(DuplicatePositiveMask(rows, cols, positive_index))
        elif memory_ids:
            # the memory may hold this very pair from an earlier step (an epoch boundary):
            # its own positive is dropped from the memory columns whatever mask_duplicates says
            out.append(DuplicatePositiveMask([set() for _ in batch], cols, positive_index))
        if self.guide is not None and self.guide.covers(batch) and all(d in self.guide.doc_index for d in memory_ids):
            g = self.guide
            q = g.query_embeddings[[g.query_index[e.query_id] for e in batch]]
            c = g.doc_embeddings[[g.doc_index[d] for d in cols]]
            out.append(GuideMask(q, c, positive_index, margin=g.margin))
        return out

    def local_slice(self, batch: Sequence[Example]) -> List[Example]:
        """This process's share of the global batch (contiguous, in rank order, equal sizes)."""
        n = len(batch)
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split evenly over {self.world} processes")
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return list(batch[lo:hi])

    def __call__(self, batch: Sequence[Example]) -> Tensor:
        batch = list(batch)
        counts = {len(e.negatives) for e in batch}
        if len(counts) != 1:
            raise ValueError(f"a batch mixes examples with {sorted(counts)} negatives; fill_negatives() evens them")
        h = counts.pop()
        if self.memory_steps and any(e.positive_id is None for e in batch):
            raise ValueError("negatives.memory_steps needs document ids (a BEIR folder, mined negatives or id "
                             "columns): without them a remembered copy of an anchor's own positive cannot be "
                             "masked")
        local = self.local_slice(batch)
        doc_encoder = self.doc_encoder or self.query_encoder
        q = self._tokens(self.query_encoder, [e.query for e in local], self.query_max_length)
        groups = [q, self._tokens(doc_encoder, [e.positive for e in local], self.doc_max_length)]
        for k in range(h):
            groups.append(self._tokens(doc_encoder, [e.negatives[k] for e in local], self.doc_max_length))
        # masks index the concatenated global batch (rank-order rows and columns), which is
        # what DistributedLoss expects; every process builds the same ones
        memory, memory_ids = self._memory_block()
        masks = self.masks(batch, memory_ids)
        loss_kwargs = {"masks": masks} if masks else {}
        with count_empty_rows() as empty:
            loss = self.cache.step(*groups, loss_args=() if memory is None else (memory,), loss_kwargs=loss_kwargs)
        self.empty_rows_skipped += empty.skipped
        if self.memory_steps:
            self._remember(batch)
        return loss
