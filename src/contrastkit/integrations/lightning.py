"""A Lightning module that trains encoders with any contrastkit column objective, gradient-cached.

:class:`ContrastiveModule` is a ``lightning.LightningModule``. Its ``training_step``
encodes the batch's input groups with :meth:`contrastkit.scale.GradCache.embed` (chunks
without autograd, RNG saved) and returns the objective's loss (tiled engine). Lightning's
automatic optimisation then calls ``backward()`` on that loss, and the backward re-encodes
each chunk with autograd (dropout and the ``bf16-mixed`` autocast replayed) and
back-propagates the cached gradient slice. Gradient clipping, accumulation and the
optimiser step are Lightning's, as usual. Gradient caching: Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", arXiv:2101.06983.

A batch is a tuple (or list) of input groups, (anchor, positive, negative_1, ...), each a
tensor or a tokenizer mapping; see
:func:`contrastkit.integrations.columns.call_with_columns` for how the objective receives
them. One device: under a multi-process strategy Lightning wraps the module in DDP, whose
reducer expects one backward per forward, which the cached re-encode is not (use
:class:`contrastkit.scale.GradCache` with a DDP encoder in your own loop for that).

Example::

    import lightning as L, torch, contrastkit as ck
    from contrastkit.integrations.lightning import ContrastiveModule

    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=64)
    module = ContrastiveModule(enc, ck.losses.MultipleNegativesRanking(scale=20.0), chunk_size=16, lr=2e-5)
    queries = ["what do cats eat?", "how tall is mount everest?"]
    documents = ["cats eat meat and fish", "mount everest is 8,849 m high"]
    batches = [(enc.tokenize(queries), enc.tokenize(documents))]
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False).fit(
        module, torch.utils.data.DataLoader(batches, batch_size=None))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor, nn

from ..scale.grad_cache import GradCache, default_embed
from .columns import call_with_columns

__all__ = ["ContrastiveModule"]


class ContrastiveModule(L.LightningModule):
    """Encoder(s) + a contrastkit column objective, trained by ``lightning.Trainer`` with
    gradient caching.

    Args:
        encoder: encodes group 0 (anchors), and every group without ``doc_encoder``; or a
            list of modules, one per input group (as :class:`~contrastkit.scale.GradCache`).
        objective: a ``ck.losses`` module (default ``MultipleNegativesRanking()``); its
            parameters (a learnable temperature) are optimised with the encoders'.
        doc_encoder: a second tower for groups 1, 2, ...
        chunk_size, chunk_tokens, sort_by_length, keep_last, autocast_dtype, embed_fn:
            passed to :class:`~contrastkit.scale.GradCache`.
        lr, weight_decay: AdamW's, used by the default :meth:`configure_optimizers`
            (override it for a schedule).

    ``training_step`` logs ``train_loss``; ``validation_step`` logs ``val_loss`` (computed
    in chunks without caching, as under ``torch.no_grad``).

    Example::

        import lightning, torch, contrastkit as ck
        from contrastkit.integrations.lightning import ContrastiveModule
        encoder = torch.nn.Linear(16, 8)                   # any module: inputs in, embeddings out
        module = ContrastiveModule(encoder, ck.losses.InfoNCE(temperature=0.05), chunk_size=32)
        loader = torch.utils.data.DataLoader([(torch.randn(64, 16), torch.randn(64, 16))] * 2, batch_size=None)
        before = encoder.weight.detach().clone()
        lightning.Trainer(max_epochs=1, precision="bf16-mixed", logger=False,
                          enable_checkpointing=False).fit(module, loader)
        assert not torch.equal(encoder.weight, before)
    """

    def __init__(self, encoder: Union[nn.Module, Sequence[nn.Module]], objective: Optional[nn.Module] = None, *,
                 doc_encoder: Optional[nn.Module] = None, chunk_size: Optional[int] = 32,
                 chunk_tokens: Optional[int] = None, sort_by_length: bool = False, keep_last: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None,
                 embed_fn: Callable[[nn.Module, Any], Tensor] = default_embed,
                 lr: float = 2e-5, weight_decay: float = 0.01) -> None:
        super().__init__()
        if objective is None:
            from ..losses import MultipleNegativesRanking

            objective = MultipleNegativesRanking()
        if isinstance(encoder, (list, tuple)):
            encoder = nn.ModuleList(encoder)
        self.encoder, self.doc_encoder, self.objective = encoder, doc_encoder, objective
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.grad_cache = GradCache(list(encoder) if isinstance(encoder, nn.ModuleList) else encoder,
                                    doc_encoder=doc_encoder, chunk_size=chunk_size, chunk_tokens=chunk_tokens,
                                    sort_by_length=sort_by_length, keep_last=keep_last,
                                    autocast_dtype=autocast_dtype, embed_fn=embed_fn)

    def setup(self, stage: str) -> None:
        world = getattr(self.trainer, "world_size", 1) if self._trainer is not None else 1
        if world > 1:
            raise ValueError(f"ContrastiveModule runs on one device (the trainer has world_size={world}): DDP's "
                             "reducer expects one backward per forward, the cached re-encode runs one per chunk. "
                             "For many processes use contrastkit.scale.GradCache with a DDP encoder in your own loop")

    @staticmethod
    def _groups(batch: Any) -> list:
        if isinstance(batch, (Tensor, Mapping)):
            batch = [batch]
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("a batch must be a tuple of at least 2 input groups (anchor, positive[, negatives...]), "
                             f"got {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (list, tuple))
                                                              else ""))
        return list(batch)

    def loss(self, batch: Any) -> Tensor:
        """The objective on the batch's embeddings (cached through ``GradCache.embed``)."""
        embeddings = self.grad_cache.embed(*self._groups(batch))
        return call_with_columns(self.objective, embeddings[0], embeddings[1], embeddings[2:])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=self._rows(batch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss, batch_size=self._rows(batch))
        return loss

    def _rows(self, batch: Any) -> int:
        first = self._groups(batch)[0]
        t = first if isinstance(first, Tensor) else next(v for v in first.values() if isinstance(v, Tensor))
        return int(t.shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
