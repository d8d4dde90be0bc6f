"""A FIFO memory queue of past embeddings (MoCo, He et al. 2020; cross-batch memory,
Wang et al. 2020): more negatives than the batch holds, at no encoder cost.

The queue is a ring buffer of ``size`` detached embeddings (and, optionally, their
integer labels). Objectives take its contents as extra candidates:

    loss = queue.info_nce(q, k, temperature=0.07)      # MoCo: own key + queue only
    loss = ck.functional.supcon(z, y, temperature=0.1,
                                extra_candidates=queue.candidates(), extra_labels=queue.labels())
    queue.enqueue(k, labels=y)        # after the loss: the current batch joins the queue

MoCo's loss (He et al. 2020, Algorithm 1) scores each query against its own key and the
queue only: ``logits = [q_i . k_i, q_i . queue] / t``, label 0. Passing
``cat([k, queue])`` to InfoNCE without a mask would also use the *other* in-batch keys
as negatives (a different loss); :meth:`MemoryQueue.keys_and_queue` returns the
candidates with the :class:`OtherKeysMask` that drops them, and
:meth:`MemoryQueue.info_nce` applies it by default (``in_batch_negatives=True`` keeps
them, as cross-batch memory does).

It is an ``nn.Module`` with buffers, so ``state_dict`` / ``load_state_dict`` save and
restore it (contents, write position, fill count) and ``.to(device)`` moves it; it also
follows the device and dtype of the embeddings it is given.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..engine import TileMask
from ..objectives.info_nce import info_nce
from ..validation import check_embeddings, check_labels, check_pair

__all__ = ["MemoryQueue", "OtherKeysMask"]


class OtherKeysMask(TileMask):
    """Drop entry (i, j) for every in-batch key column ``j < n_keys`` other than the row's
    own (``j != i``): with candidates ``[keys; queue]`` each query keeps only its own key and
    the queue (MoCo's loss).

    Example::

        import torch, contrastkit as ck
        from contrastkit.negatives.queue import OtherKeysMask
        q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)
        ck.functional.info_nce(q, torch.cat([k, queue]), masks=[OtherKeysMask(4)], temperature=0.07)
    """

    def __init__(self, n_keys: int) -> None:
        self.n_keys = int(n_keys)

    def check(self, n_rows, n_cols, device):
        if self.n_keys > n_cols or self.n_keys != n_rows:
            raise ValueError(f"OtherKeysMask({self.n_keys}) needs one key per query row ({n_rows}) among the "
                             f"first candidates (got {n_cols} candidates)")

    def touches(self, r0, r1, c0, c1):
        return c0 < self.n_keys

    def apply_(self, x, r0, r1, c0, c1):
        hi = min(c1, self.n_keys)
        if hi <= c0:
            return
        rows = torch.arange(r0, r1, device=x.device)[:, None]
        cols = torch.arange(c0, hi, device=x.device)[None, :]
        x[:, :hi - c0].masked_fill_(rows != cols, float("-inf"))


class MemoryQueue(nn.Module):
    """FIFO ring buffer of ``size`` detached ``dim``-dimensional embeddings (and labels).

    ``enqueue(x, labels=None)`` adds a batch (the oldest entries are overwritten when
    full); ``candidates()`` returns the filled entries, oldest first, and ``labels()``
    their labels (``with_labels=True``). ``len(queue)`` is the number of filled entries.

    Example::

        import torch, contrastkit as ck
        queue = ck.negatives.MemoryQueue(4096, 128)
        q, k = torch.randn(8, 128, requires_grad=True), torch.randn(8, 128)
        loss = queue.info_nce(q, k, temperature=0.07)       # MoCo: own key + queue
        queue.enqueue(k)
    """

    def __init__(self, size: int, dim: int, with_labels: bool = False, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MemoryQueue {name} must be a positive int, got {v!r}")
        self.size, self.dim, self.with_labels = int(size), int(dim), bool(with_labels)
        self.register_buffer("features", torch.zeros(self.size, self.dim, dtype=dtype, device=device))
        if self.with_labels:
            self.register_buffer("label_buffer", torch.full((self.size,), -1, dtype=torch.long, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count)

    @property
    def full(self) -> bool:
        return int(self.count) == self.size

    @torch.no_grad()
    def enqueue(self, x: Tensor, labels: Optional[Tensor] = None) -> None:
        """Add ``x`` (B, dim) (detached; with ``labels`` (B,) when ``with_labels``).

        A batch larger than the queue keeps its last ``size`` rows.
        """
        if isinstance(x, Tensor) and x.dim() == 2 and x.shape[-1] != self.dim:
            raise ValueError(f"MemoryQueue holds {self.dim}-dimensional embeddings, got dimension {x.shape[-1]} "
                             f"(shape {tuple(x.shape)})")
        check_embeddings("x", x)
        if self.with_labels:
            if labels is None:
                raise ValueError("this MemoryQueue was built with_labels=True: pass labels= to enqueue")
            labels = check_labels("labels", labels, x.shape[0], x.device)
        elif labels is not None:
            raise ValueError("this MemoryQueue keeps no labels: build it with with_labels=True to store them")
        x = x.detach()
        if self.features.device != x.device or self.features.dtype != x.dtype:
            self.features = self.features.to(device=x.device, dtype=x.dtype)
            if self.with_labels:
                self.label_buffer = self.label_buffer.to(x.device)
        b = x.shape[0]
        if b >= self.size:
            x = x[b - self.size:]
            if labels is not None:
                labels = labels[b - self.size:]
            b = self.size
        p = int(self.ptr)
        first = min(b, self.size - p)
        self.features[p:p + first] = x[:first]
        self.features[: b - first] = x[first:]
        if self.with_labels:
            self.label_buffer[p:p + first] = labels[:first]
            self.label_buffer[: b - first] = labels[first:]
        self.ptr.fill_((p + b) % self.size)
        self.count.fill_(min(self.size, int(self.count) + b))

    def _ordered(self, buf: Tensor) -> Tensor:
        c, p = int(self.count), int(self.ptr)
        if c < self.size:
            return buf[:c]
        if p == 0:
            return buf
        return torch.cat([buf[p:], buf[:p]])

    def candidates(self) -> Tensor:
        """The stored embeddings (count, dim), oldest first; (0, dim) when empty."""
        return self._ordered(self.features)

    def keys_and_queue(self, keys: Tensor, *, in_batch_negatives: bool = False) -> Tuple[Tensor, List[TileMask]]:
        """Candidates ``[keys; queue]`` and the masks for MoCo's loss: each query row i keeps
        its own key (column i, its positive) and the queue; the other in-batch keys are
        dropped unless ``in_batch_negatives``. Use as
        ``info_nce(q, cands, masks=masks)`` (positives default to the diagonal)."""
        check_embeddings("keys", keys)
        queued = self.candidates()
        if queued.shape[0]:
            check_pair("keys", keys, "queue", queued.to(keys.device))
            cands = torch.cat([keys, queued.to(device=keys.device, dtype=keys.dtype)])
        else:
            cands = keys
        return cands, ([] if in_batch_negatives else [OtherKeysMask(keys.shape[0])])

    def info_nce(self, queries: Tensor, keys: Tensor, *, temperature=0.07, in_batch_negatives: bool = False,
                 **kwargs) -> Tensor:
        """MoCo's InfoNCE (He et al. 2020, Algorithm 1): query i against its own key and the
        queue, ``-log exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.u_j/t))`` (cosine by
        default, as MoCo normalises both). ``in_batch_negatives=True`` also uses the other
        keys of the batch (cross-batch memory). Other keyword arguments go to
        :func:`~contrastkit.objectives.info_nce.info_nce` (``similarity``, ``reduction``...).
        Call it before :meth:`enqueue` of the same keys.

        Example::

            import torch, contrastkit as ck
            queue = ck.negatives.MemoryQueue(64, 8)
            queue.enqueue(torch.randn(32, 8))
            q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
            queue.info_nce(q, k, temperature=0.07).backward()
        """
        cands, masks = self.keys_and_queue(keys, in_batch_negatives=in_batch_negatives)
        masks = masks + list(kwargs.pop("masks", ()))
        return info_nce(queries, cands, temperature=temperature, masks=masks, **kwargs)

    def labels(self) -> Tensor:
        """The stored labels (count,), aligned with :meth:`candidates`."""
        if not self.with_labels:
            raise ValueError("this MemoryQueue keeps no labels: build it with with_labels=True")
        return self._ordered(self.label_buffer)

    def reset(self) -> None:
        """Empty the queue."""
        self.ptr.zero_()
        self.count.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        feats = state_dict.get(prefix + "features")
        if feats is not None and tuple(feats.shape) != tuple(self.features.shape):
            raise ValueError(f"MemoryQueue state has shape {tuple(feats.shape)}, this queue is "
                             f"{tuple(self.features.shape)} (size, dim)")
        if feats is not None and feats.dtype != self.features.dtype:
            self.features = torch.empty_like(self.features, dtype=feats.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, with_labels={self.with_labels}, filled={int(self.count)}"
