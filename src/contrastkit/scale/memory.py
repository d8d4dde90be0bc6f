"""Chunk size from a memory budget: measure what autograd keeps per token, divide.

Gradient caching (:class:`~contrastkit.scale.GradCache`) bounds activation memory by the
chunk: the activations autograd saves for backward scale with the padded tokens of a
chunk (rows x longest row). Rather than a rule of thumb, :func:`activation_bytes_per_token`
measures them: one training-mode forward of a small probe at the longest length, under the
run's autocast, with :func:`torch.autograd.graph.saved_tensors_hooks` summing the distinct
storages autograd saves (the parameters aside). The attention term grows with the sequence
length (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198: about ``s b h (34 + 5 a s / h)`` bytes per layer in 16 bits), so
the bytes per token at the longest length bound those of every shorter chunk.
:func:`chunk_tokens_for_budget` turns a budget into GradCache's ``chunk_tokens``.

What this counts is the saved activations; the peak of a step adds transient buffers (one
layer's intermediate results, the activation gradients of backward), the weights, their
gradients and the optimizer state. Leave headroom for those.

Example::

    import torch
    from contrastkit.scale.memory import saved_activation_bytes
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(32, 8)
    # autograd keeps the input (for the first weight's gradient) and the ReLU output
    assert saved_activation_bytes(net, x) == 32 * 8 * 4 + 32 * 16 * 4
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["saved_activation_bytes", "activation_bytes_per_token", "chunk_tokens_for_budget"]


def saved_activation_bytes(module: nn.Module, *args: Any, forward: Optional[Callable[..., Any]] = None,
                           **kwargs: Any) -> int:
    """Bytes of the distinct tensor storages autograd saves for backward in one forward of
    ``module`` (``forward(*args, **kwargs)``, default ``module(*args, **kwargs)``), the
    module's parameters and buffers not counted. The forward's graph is freed on return."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    seen: Dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = (forward or module)(*args, **kwargs)
    del out
    return int(sum(seen.values()))


def activation_bytes_per_token(encoder: nn.Module, max_length: int, *,
                               autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Saved activation bytes of ``encoder`` (a :class:`~contrastkit.models.TextEncoder`:
    ``tokenizer`` and ``forward(**tokens)``) in training mode at ``max_length`` tokens,
    under autocast to ``autocast_dtype`` (None: the parameters' precision), as
    ``{"per_token", "per_pass"}``: what grows with the padded tokens of a chunk, and what
    one forward keeps whatever its size (under autocast, e.g., the low-precision copies of
    the weights). Measured by two forwards of 1 and 3 rows of ``max_length`` tokens; the RNG
    (dropout), the train / eval mode and the weights are left as they were."""
    if int(max_length) < 1:
        raise ValueError(f"max_length must be positive, got {max_length!r}")
    tok = getattr(encoder, "tokenizer", None)
    if tok is None:
        raise ValueError("activation_bytes_per_token needs a text encoder with a tokenizer (contrastkit TextEncoder)")
    device = next(encoder.parameters()).device
    text = " ".join(["token"] * int(max_length))
    cuda = [device.index or 0] if device.type == "cuda" else []
    was = encoder.training
    measured = {}
    try:
        encoder.train()
        for rows in (1, 3):
            batch = tok([text] * rows, padding="max_length", truncation=True, max_length=int(max_length),
                        return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None \
                else contextlib.nullcontext()
            with torch.random.fork_rng(devices=cuda), autocast:
                measured[rows] = (saved_activation_bytes(encoder, **batch), int(batch["attention_mask"].numel()))
    finally:
        encoder.train(was)
    (b1, t1), (b3, t3) = measured[1], measured[3]
    per_token = max(0.0, (b3 - b1) / max(1, t3 - t1))
    return {"per_token": per_token, "per_pass": max(0.0, b1 - per_token * t1)}


def chunk_tokens_for_budget(encoder: nn.Module, budget_bytes: float, max_length: int, *, groups: int = 1,
                            autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """GradCache's ``chunk_tokens`` for an activation budget of one step:
    ``floor((budget_bytes / groups - per_pass) / per_token)`` with the bytes measured at
    ``max_length`` (:func:`activation_bytes_per_token`), at least one row of
    ``max_length``. ``groups``: the input groups whose last chunks GradCache holds at once
    (queries, positives, each negative column: ``2 + num_negatives``). Returns
    ``{"chunk_tokens", "per_token", "per_pass", "rows_at_max_length", "fits"}`` (``fits``:
    whether one row of ``max_length`` per group fits the budget at all).

    Example::

        from contrastkit.models import TextEncoder
        from contrastkit.scale.memory import chunk_tokens_for_budget
        enc = TextEncoder("all-MiniLM-L6-v2", normalize=True)
        plan = chunk_tokens_for_budget(enc, 2 * 2**30, 128, groups=3)   # 2 GB over q, d, one negative
        assert plan["fits"] and plan["chunk_tokens"] >= 128
    """
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
    if int(groups) < 1:
        raise ValueError(f"groups must be >= 1, got {groups!r}")
    m = activation_bytes_per_token(encoder, max_length, autocast_dtype=autocast_dtype)
    room = budget_bytes / int(groups) - m["per_pass"]
    tokens = int(room / m["per_token"]) if m["per_token"] > 0 and room > 0 else 0
    fits = tokens >= int(max_length)
    tokens = max(int(max_length), tokens)
    return {"chunk_tokens": tokens, "per_token": m["per_token"], "per_pass": m["per_pass"],
            "rows_at_max_length": tokens // int(max_length), "fits": fits}
