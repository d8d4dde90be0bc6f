"""Closeness helpers for the objective tests (SupCon, DCL, debiased, margin, queue).

Kept apart from conftest.py so these test modules stand on their own."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9, scale: Optional[float] = None,
                     what: str = "", atol: float = 0.0) -> None:
    """``max |actual - expected| <= rtol * max(scale, max |expected|) + atol``, relative to the
    magnitude of the whole tensor; ``atol`` for quantities that are 0 in exact arithmetic."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a}"
    ref = float(e.abs().max()) if e.numel() else 0.0
    if scale is not None:
        ref = max(ref, float(scale))
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= rtol * ref + atol, f"{what}: max abs error {err:.3e} > {rtol:.1e} * {ref:.3e} + {atol:.1e}"


def grads_of(loss: Tensor, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """d loss / d inputs (zeros for inputs the loss does not reach)."""
    gs = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs))


def inverse_min_temperature(t) -> float:
    """1 / min(t): the logit magnitude, to which rounding errors are relative."""
    return 1.0 / float(t.detach().min()) if isinstance(t, Tensor) else 1.0 / float(t)
