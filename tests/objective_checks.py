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


def draw_masks(data, n, m, positives=None):
    """Random masks over n x m (engine masks and a generic one), the equal dense drop matrix
    and the rows whose positive pair (``positives``, default the diagonal) they cover. With ``spare`` (most draws) the index, label and generic masks leave the
    positive pairs alone and the diagonal is off the main one (random positives may still
    be covered: then the call must raise)."""
    pos = positives if positives is not None else torch.arange(n)
    pos = torch.where(pos < m, pos, torch.full_like(pos, -1))  # a default diagonal past the columns
    has = pos >= 0
    spare = data.draw(st.sampled_from([True, True, True, False]), label="spare the positive pairs")
    masks, drop = [], torch.zeros(n, m, dtype=torch.bool)
    kind = data.draw(st.sampled_from(["diag", "label", "index", "generic", "all", "drops nothing"]), label="masks")
    if kind in ("diag", "all"):
        off = data.draw(st.sampled_from([-2, -1, 1, 2, 3] if spare else [0, 1]), label="diagonal offset")
        masks.append(DiagonalMask(off))
        for i in range(n):
            if 0 <= i + off < m:
                drop[i, i + off] = True
    if kind in ("label", "all"):
        rl = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n), label="row labels"))
        cl = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=m, max_size=m), label="column labels"))
        if spare:
            same = has & (rl == cl[pos.clamp(min=0)])
            rl = torch.where(same, 100 + torch.arange(n), rl)
        masks.append(LabelMask(rl, cl))
        drop |= rl[:, None] == cl[None, :]
    if kind in ("index", "all"):
        k = data.draw(st.integers(1, 3), label="index columns per row")
        cols = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=k, max_size=k),
                                               min_size=n, max_size=n), label="index columns"))
        if spare:
            cols = torch.where(cols == pos[:, None], torch.full_like(cols, -1), cols)
        masks.append(IndexMask(cols))
        for i, row in enumerate(cols.tolist()):
            for col in row:
                if col >= 0:
                    drop[i, col] = True
    if kind in ("generic", "all"):
        seed = data.draw(st.integers(0, 2**31), label="generic mask seed")
        dense = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) < 0.3
        if spare:
            dense[has.nonzero().squeeze(1), pos[has]] = False
        masks.append(DenseMask(dense))
        drop |= dense
    if kind == "drops nothing":
        masks.append(IndexMask(torch.full((n, 1), -1)))
    covered = torch.zeros(n, dtype=torch.bool)
    covered[has] = drop[has.nonzero().squeeze(1), pos[has]]
    return masks, drop, covered


def draw_temperature(p, g: torch.Generator, rows: int):
    """The temperature of a drawn problem ``p`` (``temp``, ``temp_kind``): a python float, a
    0-d float64 tensor requiring grad, or ``rows`` per-row values in [temp, 2 temp) drawn
    from ``g`` (the only kind that consumes the generator)."""
    if p["temp_kind"] == "float":
        return p["temp"]
    if p["temp_kind"] == "scalar":
        return torch.tensor(p["temp"], dtype=torch.float64, requires_grad=True)
    return (p["temp"] * (1 + torch.rand(rows, generator=g, dtype=torch.float64))).requires_grad_()


def temperature_from_list(p):
    """``(temperature, learnable tensors)`` of a drawn problem with a list ``temps`` and
    ``temp_kind``: the first value as a float (no tensor), as a 0-d float64 tensor requiring
    grad, or the whole list as a per-row tensor requiring grad."""
    if p["temp_kind"] == "float":
        return p["temps"][0], []
    values = p["temps"][0] if p["temp_kind"] == "scalar" else p["temps"]
    t = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    return t, [t]


def retrieval_inputs(p, sc: float):
    """Float64 retrieval-form inputs of a drawn problem ``p`` (n, m, d, n_extra, temp,
    temp_kind, positives, seed), entries scaled by ``sc``: ``(generator, anchors, candidates,
    extra candidates or None, temperature, positives or None)``."""
    g = torch.Generator().manual_seed(p["seed"])
    n, m, d = p["n"], p["m"], p["d"]
    d64 = torch.float64
    a = (sc * torch.randn(n, d, generator=g, dtype=d64)).requires_grad_()
    c = (sc * torch.randn(m, d, generator=g, dtype=d64)).requires_grad_()
    extra = (sc * torch.randn(p["n_extra"], d, generator=g, dtype=d64)).requires_grad_() if p["n_extra"] else None
    t = draw_temperature(p, g, n)
    positives = None
    if p["positives"] == "random":
        positives = torch.randint(-1, m, (n,), generator=g)
        positives[0] = int(torch.randint(0, m, (1,), generator=g))
    return g, a, c, extra, t, positives


def negatives_left(drop: Tensor, positives: Optional[Tensor], n: int) -> Tuple[Tensor, Tensor]:
    """Per row, the count of columns that are neither its positive nor dropped, and whether
    the row has a positive."""
    pos = positives if positives is not None else torch.arange(n)
    left = ~drop
    valid = pos >= 0
    left[valid.nonzero().squeeze(1), pos[valid]] = False
    return left.sum(1), valid


def assert_values_and_grads_close(out: Tensor, ref: Tensor, anchors: Tensor, candidates: Tensor,
                                  extra: Optional[Tensor], temperature) -> None:
    """A retrieval-form loss and its naive formula: the values, and the gradients in the
    anchors, candidates, extra candidates and a tensor temperature, relative to 1 / t."""
    inv_t = inverse_min_temperature(temperature)
    assert_rel_close(out, ref, scale=inv_t, what="value")
    named = [("anchors", anchors), ("candidates", candidates), ("extra", extra), ("temperature", temperature)]
    named = [(k, v) for k, v in named if isinstance(v, Tensor)]
    inputs = [v for _, v in named]
    for x, y, (name, _) in zip(grads_of(out, inputs), grads_of(ref, inputs), named):
        assert_rel_close(x, y, what=f"grad {name}", atol=1e-14 * inv_t * (inv_t if name == "temperature" else 1.0))


def check_masked_loss(call, naive, drop: Tensor, positives: Optional[Tensor], n: int, reduction: str,
                      g: torch.Generator, anchors: Tensor, candidates: Tensor, extra: Optional[Tensor],
                      temperature) -> None:
    """A loss whose denominator needs a negative (DCL, debiased) under masks ``drop``, against
    its naive formula: ``call(**more)`` runs ours, ``naive(positives)`` the formula. Rows the
    masks leave without a negative: a ValueError by default, and with ``empty_rows="skip"``
    the formula without those rows (their positive -1) and a RuntimeWarning counting them."""
    import pytest
    from hypothesis import event

    left, valid = negatives_left(drop, positives, n)
    empty = valid & (left == 0)
    pos = positives
    event("a row with no negative left" if bool(empty.any()) else "every row keeps a negative")
    if bool(empty.any()):
        with pytest.raises(ValueError, match=f"anchor row {int(empty.nonzero()[0])} has no negative left"):
            call()
        kept = valid & ~empty
        if not bool(kept.any()):
            with pytest.raises(ValueError, match="no anchor row has both a positive and a negative"):
                call(empty_rows="skip")
            return
        with pytest.warns(RuntimeWarning, match=f"{int(empty.sum())} of {int(valid.sum())} anchor row"):
            out = call(empty_rows="skip")
        pos = torch.where(kept, torch.arange(n) if positives is None else positives, torch.full((n,), -1))
    else:
        out = call()
    ref = naive(pos)
    if reduction == "none":
        assert out.shape == (n,)
        w = torch.randn(n, generator=g, dtype=torch.float64)
        out, ref = (out * w).sum(), (ref * w).sum()
    assert_values_and_grads_close(out, ref, anchors, candidates, extra, temperature)
