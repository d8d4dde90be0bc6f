"""Shared test helpers: a naive, materialised float64 reference for the InfoNCE family
and closeness checks. Keep this file generic: objective-specific references live in
their own test modules.

Everything here builds the full N x M logit matrix and lets autograd differentiate it,
which is the point: it is the slow, obviously-correct formula the tiled engine must equal.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import pytest
import torch
from torch import Tensor

from contrastkit import reference

__all__ = [
    "naive_logits",
    "naive_lse",
    "naive_index_loss",
    "assert_rel_close",
    "grads_of",
]


def naive_logits(anchors: Tensor, candidates: Tensor, temperature: Union[float, Tensor] = 1.0,
                 similarity: str = "cosine") -> Tensor:
    """The full (N, M) logit matrix ``f(a_i, c_j) / t`` (t scalar or one per row):
    :func:`contrastkit.reference.logits`."""
    return reference.logits(anchors, candidates, temperature, similarity)


def naive_lse(q: Tensor, k: Tensor, *, row_bias: Optional[Tensor] = None, col_bias: Optional[Tensor] = None,
              drop: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Row and column logsumexp of ``q k^T + r + c`` with the entries of the bool matrix
    ``drop`` left out (``-inf``)."""
    x = q @ k.T
    if row_bias is not None:
        x = x + row_bias[:, None]
    if col_bias is not None:
        x = x + col_bias[None, :]
    if drop is not None:
        x = x.masked_fill(drop, float("-inf"))
    return torch.logsumexp(x, 1), torch.logsumexp(x, 0)


def _reduce(v: Tensor, reduction: str) -> Tensor:
    return {"mean": v.mean, "sum": v.sum}[reduction]()


def naive_index_loss(
    anchors: Tensor,
    candidates: Tensor,
    positives: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor],
    symmetric: bool = False,
    similarity: str = "cosine",
    drop: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Materialised InfoNCE / CLIP with one positive column per row (-1: none):
    :func:`contrastkit.reference.info_nce` (the one copy of the formula)."""
    return reference.info_nce(anchors, candidates, positives, temperature=temperature, symmetric=symmetric,
                              similarity=similarity, drop=drop, reduction=reduction)


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-9, scale: Optional[float] = None,
                     what: str = "", atol: float = 0.0) -> None:
    """``max |actual - expected| <= rtol * max(scale, max |expected|) + atol``: relative to the
    magnitude of the whole tensor (element-wise relative error is meaningless for entries
    that are 0 up to rounding). ``atol`` is for quantities that are exactly 0 in exact
    arithmetic (e.g. a gradient through the normalisation of a 1-d vector), where both
    sides are pure rounding noise."""
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


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded CPU generator so that non-hypothesis tests are reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine's
    oversubscription (restored after the test). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
