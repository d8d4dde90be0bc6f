"""Closeness helpers for the objective tests (SupCon, DCL, debiased, margin, queue).

Kept apart from conftest.py so these test modules stand on their own."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from hypothesis import strategies as st
from torch import Tensor

from contrastkit.engine import DiagonalMask, IndexMask, LabelMask, TileMask


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


# -- false-negative masks for the objectives' masks= tests ------------------------------

class DenseMask(TileMask):
    """A TileMask of no engine type (like the recipes' false-negative masks): a dense drop matrix."""

    def __init__(self, drop):
        self.drop = drop

    def apply_(self, x, r0, r1, c0, c1):
        x.masked_fill_(self.drop[r0:r1, c0:c1], float("-inf"))


def draw_masks(data, n, m):
    """Random masks over an n x m column layout, and the equal dense drop matrix."""
    masks, drop = [], torch.zeros(n, m, dtype=torch.bool)
    kind = data.draw(st.sampled_from(["diag", "label", "index", "generic", "all", "drops nothing"]), label="masks")
    if kind in ("diag", "all"):
        off = data.draw(st.integers(-2, 3), label="diagonal offset")
        masks.append(DiagonalMask(off))
        for i in range(n):
            if 0 <= i + off < m:
                drop[i, i + off] = True
    if kind in ("label", "all"):  # duplicate labels on purpose: several same-label columns per row
        rl = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n), label="row labels"))
        cl = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=m, max_size=m), label="column labels"))
        masks.append(LabelMask(rl, cl))
        drop |= rl[:, None] == cl[None, :]
    if kind in ("index", "all"):
        k = data.draw(st.integers(1, 3), label="index columns per row")
        cols = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=k, max_size=k),
                                               min_size=n, max_size=n), label="index columns"))
        masks.append(IndexMask(cols))
        for i, row in enumerate(cols.tolist()):
            for col in row:
                if col >= 0:
                    drop[i, col] = True
    if kind in ("generic", "all"):
        seed = data.draw(st.integers(0, 2**31), label="generic mask seed")
        dense = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) < 0.25
        masks.append(DenseMask(dense))
        drop |= dense
    if kind == "drops nothing":
        masks.append(IndexMask(torch.full((n, 1), -1)))
    return masks, drop
