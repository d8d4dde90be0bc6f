"""InfoNCE / CLIP (ck.functional.info_nce, ck.losses.InfoNCE) against the materialised
float64 formula: values and gradients of anchors, candidates and the temperature (a
learnable scalar tensor or one per anchor row), over random sizes, tiles, positives,
masks, kernels, reductions; and the edge cases (one row, no positive, tiny temperature,
float32, bfloat16, the learnable temperature module)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from conftest import assert_rel_close, grads_of, naive_index_loss, naive_logits
from contrastkit.engine import DiagonalMask, IndexMask, LabelMask
from contrastkit.functional import info_nce
from objective_checks import temperature_from_list

D64 = torch.float64
# where an exact gradient is 0 both sides are rounding noise of the size of eps * (logit
# scale); that (and only that) is absorbed by an absolute floor of 1e-13 * logit scale
ZERO_FLOOR = 1e-13


@st.composite
def problems(draw):
    n = draw(st.integers(1, 20), label="N")
    extra = draw(st.integers(0, 12), label="extra columns (hard negatives)")
    m = draw(st.integers(1, 20), label="M") if draw(st.booleans()) else n + extra
    similarity = draw(st.sampled_from(["cosine", "dot"]), label="similarity")
    # cosine with d = 1 is degenerate (every vector normalises to +-1, zero gradient)
    d = draw(st.integers(1 if similarity == "dot" else 2, 12), label="d")
    kind = draw(st.sampled_from(["tile1", "int", "big", "pair", "auto"]), label="tile kind")
    tile = {
        "tile1": 1,
        "int": draw(st.integers(2, max(2, max(n, m)))),
        "big": max(n, m) + 7,
        "pair": (draw(st.integers(1, n + 2)), draw(st.integers(1, m + 2))),
        "auto": None,
    }[kind]
    # positives: diagonal default (needs M >= N), random columns, some rows without positive
    pos_kind = draw(st.sampled_from(["default", "random", "missing"]) if m >= n else st.sampled_from(["random", "missing"]))
    positives = None
    if pos_kind != "default":
        lo = -1 if pos_kind == "missing" else 0
        cols = draw(st.lists(st.integers(lo, m - 1), min_size=n, max_size=n))
        if all(c < 0 for c in cols):
            cols[draw(st.integers(0, n - 1))] = draw(st.integers(0, m - 1))
        positives = torch.tensor(cols)
    temp_kind = draw(st.sampled_from(["float", "scalar", "rows"]), label="temperature kind")
    temps = draw(st.lists(st.floats(0.01, 3.0), min_size=n, max_size=n), label="temperatures")
    return dict(n=n, m=m, d=d, tile=tile, positives=positives, temp_kind=temp_kind, temps=temps,
                symmetric=draw(st.booleans(), label="symmetric"),
                similarity=similarity,
                reduction=draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
                seed=draw(st.integers(0, 2**31)))


def _inputs(p, gen):
    a = torch.randn(p["n"], p["d"], generator=gen, dtype=D64)
    c = torch.randn(p["m"], p["d"], generator=gen, dtype=D64)
    if p["similarity"] == "dot":  # keep dot logits of the same order as cosine ones
        a, c = a / math.sqrt(p["d"]), c / math.sqrt(p["d"])
    return a.requires_grad_(), c.requires_grad_()


def _compare(p, *, masks=(), drop=None):
    gen = torch.Generator().manual_seed(p["seed"])
    a, c = _inputs(p, gen)
    t, t_inputs = temperature_from_list(p)
    symmetric, reduction = p["symmetric"], p["reduction"]
    if symmetric and reduction == "none":
        reduction = "mean"
    kw = dict(temperature=t, positives=p["positives"], symmetric=symmetric, similarity=p["similarity"],
              reduction=reduction)
    got = info_nce(a, c, masks=masks, tile_size=p["tile"], **kw)
    want = naive_index_loss(a, c, drop=drop, **kw)
    assert got.dtype == D64
    if reduction == "none":
        assert got.shape == (p["n"],)
        w = torch.randn(p["n"], generator=gen, dtype=D64)
        got, want = (got * w).sum(), (want * w).sum()
    # the loss is a difference of logits of size up to 1/t: that is the natural scale
    mag = float(naive_logits(a, c, t, p["similarity"]).detach().abs().max()) + 1.0
    assert_rel_close(got, want, scale=mag, what="loss")
    inputs = [a, c] + t_inputs
    for name, g, r in zip(["d anchors", "d candidates", "d temperature"],
                          grads_of(got, inputs), grads_of(want, inputs)):
        assert_rel_close(g, r, what=name, atol=ZERO_FLOOR * mag)


@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_info_nce_matches_naive(p):
    _compare(p)


@settings(max_examples=40, deadline=None)
@given(p=problems(), data=st.data())
def test_info_nce_with_masks_matches_naive(p, data):
    n, m = p["n"], p["m"]
    masks, drop = [], torch.zeros(n, m, dtype=torch.bool)
    which = data.draw(st.sampled_from(["diag", "label", "index", "all three"]), label="mask")
    if which in ("diag", "all three"):
        off = data.draw(st.integers(-2, 2), label="offset")
        masks.append(DiagonalMask(off))
        for i in range(n):
            if 0 <= i + off < m:
                drop[i, i + off] = True
    if which in ("label", "all three"):
        # duplicate labels on purpose: several same-label candidates per row
        rl = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
        cl = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=m, max_size=m)))
        masks.append(LabelMask(rl, cl))
        drop |= rl[:, None] == cl[None, :]
    if which in ("index", "all three"):
        cols = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=2, max_size=2),
                                               min_size=n, max_size=n)))
        masks.append(IndexMask(cols))
        for i in range(n):
            for col in cols[i].tolist():
                if col >= 0:
                    drop[i, col] = True
    # rows (and, symmetric, positive columns) whose denominator is empty must raise instead
    pos = p["positives"] if p["positives"] is not None else torch.arange(n)
    valid = pos >= 0
    empty_row = bool((drop.all(1) & valid).any())
    empty_col = False
    if p["symmetric"]:
        used = torch.zeros(m, dtype=torch.bool)
        used[pos[valid]] = True
        empty_col = bool((drop.all(0) & used).any())
    if empty_row or empty_col:
        with pytest.raises(ValueError, match="every candidate masked"):
            _compare(p, masks=masks, drop=drop)
    else:
        _compare(p, masks=masks, drop=drop)


def test_matches_cross_entropy_formula(rng):
    a = torch.randn(33, 16, generator=rng, dtype=D64, requires_grad=True)
    c = torch.randn(50, 16, generator=rng, dtype=D64, requires_grad=True)
    t = torch.tensor(0.07, dtype=D64, requires_grad=True)
    pos = torch.randint(0, 50, (33,), generator=rng)
    got = info_nce(a, c, temperature=t, positives=pos, tile_size=(8, 13))
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / t
    want = F.cross_entropy(logits, pos)
    assert_rel_close(got, want)
    for g, r in zip(grads_of(got, [a, c, t]), grads_of(want, [a, c, t])):
        assert_rel_close(g, r)
    # symmetric CLIP: mean of the two cross-entropies
    b = torch.randn(33, 16, generator=rng, dtype=D64, requires_grad=True)
    got = info_nce(a, b, temperature=t, symmetric=True, tile_size=5)
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / t
    lab = torch.arange(33)
    want = 0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab))
    assert_rel_close(got, want)
    for g, r in zip(grads_of(got, [a, b, t]), grads_of(want, [a, b, t])):
        assert_rel_close(g, r)


def test_tile_size_does_not_change_the_result(rng):
    a = torch.randn(37, 8, generator=rng, dtype=D64)
    c = torch.randn(41, 8, generator=rng, dtype=D64)
    ref = info_nce(a, c, temperature=0.1, symmetric=True, tile_size=1000)
    for tile in (1, 2, 5, 36, 37, 38, (1, 41), (37, 1), (6, 10), None):
        assert_rel_close(info_nce(a, c, temperature=0.1, symmetric=True, tile_size=tile), ref, rtol=1e-12)


# ----------------------------------------------------------------------------- edge cases

def test_one_row_and_one_by_one():
    a = torch.randn(1, 5, dtype=D64, requires_grad=True)
    c = torch.randn(4, 5, dtype=D64, requires_grad=True)
    t = torch.tensor([0.2], dtype=D64, requires_grad=True)  # per-row temperature of one row
    got = info_nce(a, c, temperature=t, tile_size=1)
    want = naive_index_loss(a, c, temperature=t)
    assert_rel_close(got, want)
    for g, r in zip(grads_of(got, [a, c, t]), grads_of(want, [a, c, t])):
        assert_rel_close(g, r)
    # N = M = 1: the only candidate is the positive, the loss is exactly 0 (also symmetric)
    a1 = torch.randn(1, 3, dtype=D64, requires_grad=True)
    c1 = torch.randn(1, 3, dtype=D64, requires_grad=True)
    for sym in (False, True):
        loss = info_nce(a1, c1, temperature=0.05, symmetric=sym)
        assert abs(loss.item()) < 1e-12
        ga, gc = grads_of(loss, [a1, c1])
        assert float(ga.abs().max()) < 1e-9 and float(gc.abs().max()) < 1e-9


def test_rows_without_positive_are_left_out_of_the_mean(rng):
    a = torch.randn(6, 4, generator=rng, dtype=D64, requires_grad=True)
    c = torch.randn(9, 4, generator=rng, dtype=D64, requires_grad=True)
    pos = torch.tensor([3, -1, 0, -1, 8, 8])  # also: two rows share a positive column
    per_row = info_nce(a, c, temperature=0.1, positives=pos, reduction="none")
    assert per_row[1] == 0 and per_row[3] == 0
    mean = info_nce(a, c, temperature=0.1, positives=pos)
    assert_rel_close(mean, per_row[pos >= 0].mean())
    assert_rel_close(info_nce(a, c, temperature=0.1, positives=pos, reduction="sum"), per_row.sum())
    ga, _ = grads_of(mean, [a, c])
    assert torch.all(ga[1] == 0) and torch.all(ga[3] == 0)
    with pytest.raises(ValueError, match="no anchor row has a positive"):
        info_nce(a, c, temperature=0.1, positives=torch.full((6,), -1))


def test_all_rows_masked_is_an_error(rng):
    a = torch.randn(4, 3, generator=rng, dtype=D64)
    c = torch.randn(4, 3, generator=rng, dtype=D64)
    same = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="every candidate masked"):
        info_nce(a, c, temperature=0.1, masks=[LabelMask(same, same)])
    with pytest.raises(ValueError, match="anchor row 2 has every candidate masked"):
        info_nce(a, c, temperature=0.1, masks=[IndexMask(torch.tensor([[-1] * 4, [-1] * 4, [0, 1, 2, 3], [-1] * 4]))])


def test_tiny_temperature_large_logits_no_overflow(rng):
    # dot similarity with big embeddings at t = 0.01: logits of order 1e4
    a = (torch.randn(40, 8, generator=rng, dtype=D64) * 10).requires_grad_()
    c = (torch.randn(50, 8, generator=rng, dtype=D64) * 10).requires_grad_()
    t = torch.tensor(0.01, dtype=D64, requires_grad=True)
    for sym in (False, True):
        got = info_nce(a, c, temperature=t, similarity="dot", symmetric=sym, tile_size=(7, 11))
        want = naive_index_loss(a, c, temperature=t, similarity="dot", symmetric=sym)
        mag = float(naive_logits(a, c, t, "dot").detach().abs().max())
        assert mag > 1e3
        assert torch.isfinite(got)
        assert_rel_close(got, want, scale=mag)
        for g, r in zip(grads_of(got, [a, c, t]), grads_of(want, [a, c, t])):
            assert torch.isfinite(g).all()
            assert_rel_close(g, r)
    # float32 too: no inf / nan, close to the float64 value
    got32 = info_nce(a.detach().float(), c.detach().float(), temperature=0.01, similarity="dot")
    want = naive_index_loss(a.detach(), c.detach(), temperature=0.01, similarity="dot")
    assert torch.isfinite(got32)
    assert_rel_close(got32, want, rtol=1e-5, scale=mag)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_float32_close_to_float64_reference(rng, symmetric, similarity, temperature):
    a = torch.randn(300, 32, generator=rng)
    c = torch.randn(400, 32, generator=rng)
    if similarity == "dot":
        a, c = a / 32 ** 0.5, c / 32 ** 0.5
    a32, c32 = a.clone().requires_grad_(), c.clone().requires_grad_()
    t32 = torch.tensor(temperature, requires_grad=True)
    got = info_nce(a32, c32, temperature=t32, symmetric=symmetric, similarity=similarity, tile_size=(64, 96))
    assert got.dtype == torch.float32
    a64, c64 = a.double().requires_grad_(), c.double().requires_grad_()
    t64 = torch.tensor(temperature, dtype=D64, requires_grad=True)
    want = naive_index_loss(a64, c64, temperature=t64, symmetric=symmetric, similarity=similarity)
    # float32 logits carry an absolute error of eps * |logit|: the scale of the loss's error
    mag = float(naive_logits(a64, c64, temperature, similarity).detach().abs().max())
    assert_rel_close(got, want, rtol=1e-5, scale=mag)
    for g, r in zip(grads_of(got, [a32, c32, t32]), grads_of(want, [a64, c64, t64])):
        assert g.dtype == torch.float32
        assert_rel_close(g, r, rtol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_bfloat16_accumulates_in_float32(rng, symmetric, temperature):
    a = torch.randn(256, 64, generator=rng).bfloat16()
    c = (0.5 * a.float() + torch.randn(256, 64, generator=rng)).bfloat16()
    ab, cb = a.clone().requires_grad_(), c.clone().requires_grad_()
    got = info_nce(ab, cb, temperature=temperature, symmetric=symmetric, tile_size=(48, 80))
    assert torch.isfinite(got)
    # float32 reference on the very same (bf16-representable) inputs
    a32, c32 = a.float().requires_grad_(), c.float().requires_grad_()
    want = naive_index_loss(a32, c32, temperature=temperature, symmetric=symmetric)
    # within 2 bf16 ulps of the float32 value (a result summed in bf16 would drift further)
    assert abs(got.item() - want.item()) <= 2 ** -7 * abs(want.item()), (got.item(), want.item())
    ga, gc = grads_of(got, [ab, cb])
    ra, rc = grads_of(want, [a32, c32])
    assert ga.dtype == torch.bfloat16 and gc.dtype == torch.bfloat16
    for g, r in ((ga, ra), (gc, rc)):
        g = g.float()
        assert torch.isfinite(g).all()
        assert float((g - r).norm() / r.norm()) < 5e-2
        assert float(F.cosine_similarity(g.flatten(), r.flatten(), dim=0)) > 0.999


# ----------------------------------------------------------------------------- the module

def test_module_matches_functional(rng):
    a = torch.randn(20, 6, generator=rng, dtype=D64)
    c = torch.randn(25, 6, generator=rng, dtype=D64)
    pos = torch.randint(0, 25, (20,), generator=rng)
    for sym in (False, True):
        mod = ck.losses.InfoNCE(temperature=0.07, symmetric=sym, tile_size=4)
        want = info_nce(a, c, temperature=0.07, positives=pos, symmetric=sym)
        assert_rel_close(mod(a, c, pos), want, rtol=1e-6)  # the module's temperature is a float32 buffer
    mod = ck.losses.InfoNCE(temperature=0.07)
    assert list(mod.parameters()) == []
    assert_rel_close(mod(a, c[:20]), info_nce(a, c[:20], temperature=0.07), rtol=1e-6)


def test_learnable_temperature_gradient_and_clamp(rng):
    a = torch.randn(30, 8, generator=rng, dtype=D64, requires_grad=True)
    c = torch.randn(30, 8, generator=rng, dtype=D64, requires_grad=True)
    mod = ck.losses.InfoNCE(temperature=0.07, symmetric=True, learn_temperature=True, tile_size=7)
    params = dict(mod.named_parameters())
    assert list(params) == ["temperature.log_scale"]
    log_scale = params["temperature.log_scale"]
    assert_rel_close(log_scale.detach(), torch.tensor(-math.log(0.07), dtype=log_scale.dtype), rtol=1e-6)
    loss = mod(a, c)
    loss.backward()
    # reference: t = exp(-log_scale) in float64, loss through the materialised formula
    ls = log_scale.detach().double().requires_grad_()
    want = naive_index_loss(a.detach(), c.detach(), temperature=torch.exp(-ls), symmetric=True)
    (g_ref,) = torch.autograd.grad(want, [ls])
    assert_rel_close(loss.detach(), want.detach(), rtol=1e-6)
    assert log_scale.grad is not None
    assert_rel_close(log_scale.grad.double(), g_ref, rtol=1e-5)

    # clamped to [0.01, 100] as documented: no gradient past the bounds
    for value, bound in ((math.log(1e4), 0.01), (math.log(1e-4), 100.0)):
        with torch.no_grad():
            log_scale.fill_(value)
        log_scale.grad = None
        assert abs(mod.temperature().item() - bound) <= 1e-6 * bound
        mod(a, c).backward()
        assert float(log_scale.grad) == 0.0
    # inside the bounds the gradient does flow (a step of SGD changes the loss)
    with torch.no_grad():
        log_scale.fill_(math.log(1 / 0.5))
    log_scale.grad = None
    mod(a, c).backward()
    assert float(log_scale.grad) != 0.0


def test_temperature_module_validates_range():
    with pytest.raises(ValueError, match="temperature"):
        ck.losses.Temperature(0.001, learnable=True)  # below min_temperature 0.01
    with pytest.raises(ValueError, match="temperature"):
        ck.losses.Temperature(-1.0)
    t = ck.losses.Temperature(0.2, learnable=True, min_temperature=0.1, max_temperature=1.0)
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    assert abs(t().item() - 0.1) < 1e-6
