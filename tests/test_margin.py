"""Additive margin (NT-Xent-AM) for InfoNCE / CLIP and NT-Xent (SupCon's margin is in
test_supcon.py): the positive logit becomes (sim - m) / t in the numerator and inside the
denominator; against the materialised float64 formula, values and gradients; stability
at small temperatures; PML NT-Xent parity at margin 0 and the golden vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from contrastkit.functional import info_nce, nt_xent
from objective_checks import assert_rel_close, draw_temperature, grads_of, inverse_min_temperature

D64 = torch.float64
NEG = float("-inf")
DATA = __import__("pathlib").Path(__file__).parent / "data" / "peer_losses.npz"


def naive_margin_info_nce(a, c, t, positives, margin, *, symmetric=False, similarity="cosine", drop=None):
    return reference.info_nce(a, c, positives, temperature=t, margin=margin, symmetric=symmetric,
                              similarity=similarity, drop=drop)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 10))
    m = draw(st.integers(n, n + 6))
    similarity = draw(st.sampled_from(["cosine", "dot"]))
    return dict(
        n=n, m=m, d=draw(st.integers(2, 6)), similarity=similarity,
        symmetric=draw(st.booleans()),
        positives=draw(st.sampled_from(["default", "random", "missing"])),
        margin=draw(st.sampled_from([0.0, 0.1, 0.35, 1.0])),
        tile=draw(st.sampled_from([1, 3, 100, None])),
        temp=draw(st.sampled_from([0.01, 0.05, 0.5, 2.0] if similarity == "cosine" else [0.5, 2.0])),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
        seed=draw(st.integers(0, 2**31)),
    )


def _check_grads(out, ref, inputs, names, t):
    inv_t = inverse_min_temperature(t)
    assert_rel_close(out, ref, scale=inv_t, what="value")
    for x, y, name in zip(grads_of(out, inputs), grads_of(ref, inputs), names):
        assert_rel_close(x, y, what=f"grad {name}", atol=1e-14 * inv_t * (inv_t if name == "temperature" else 1.0))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_info_nce_margin_matches_naive(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, m, d = p["n"], p["m"], p["d"]
    sc = 1.0 if p["similarity"] == "cosine" else 0.3
    a = (sc * torch.randn(n, d, generator=g, dtype=D64)).requires_grad_()
    c = (sc * torch.randn(m, d, generator=g, dtype=D64)).requires_grad_()
    t = draw_temperature(p, g, n)
    if p["positives"] == "default":
        positives, arg = torch.arange(n), None
    else:
        lo = -1 if p["positives"] == "missing" else 0
        positives = torch.randint(lo, m, (n,), generator=g)
        positives[0] = int(torch.randint(0, m, (1,), generator=g))
        arg = positives
    ref = naive_margin_info_nce(a, c, t, positives, p["margin"], symmetric=p["symmetric"],
                                similarity=p["similarity"])
    out = info_nce(a, c, temperature=t, positives=arg, symmetric=p["symmetric"], similarity=p["similarity"],
                   tile_size=p["tile"], margin=p["margin"])
    inputs = [a, c] + ([t] if isinstance(t, torch.Tensor) else [])
    _check_grads(out, ref, inputs, ["anchors", "candidates", "temperature"], t)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(2, 5), margin=st.sampled_from([0.0, 0.2, 0.5]),
       temp=st.sampled_from([0.01, 0.1, 1.0]), kind=st.sampled_from(["float", "scalar", "rows"]),
       tile=st.sampled_from([1, 5, 100]), seed=st.integers(0, 2**31))
def test_nt_xent_margin_matches_naive(n, d, margin, temp, kind, tile, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    t = draw_temperature(dict(temp_kind=kind, temp=temp), g, 2 * n)
    z = torch.cat([a, b])
    idx = torch.arange(n)
    positives = torch.cat([idx + n, idx])
    if n == 1:
        # each view's only candidate is its positive: the loss is 0
        out = nt_xent(a, b, temperature=t, margin=margin, tile_size=tile)
        assert abs(float(out.detach())) < 1e-12
        return
    ref = naive_margin_info_nce(z, z, t, positives, margin, drop=torch.eye(2 * n, dtype=torch.bool))
    out = nt_xent(a, b, temperature=t, margin=margin, tile_size=tile)
    inputs = [a, b] + ([t] if isinstance(t, torch.Tensor) else [])
    _check_grads(out, ref, inputs, ["z1", "z2", "temperature"], t)


def test_margin_is_stable_where_the_subtraction_identity_is_not():
    # t = 0.01, margin 0.5: exp(-m/t) = e^-50; the positive dominates the denominator, so
    # log(exp(lse) - exp(pos) + exp(pos - m/t)) would cancel catastrophically.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g, dtype=D64)
    c = a + 1e-3 * torch.randn(16, 8, generator=g, dtype=D64)
    out = info_nce(a, c, temperature=0.01, margin=0.5)
    ref = naive_margin_info_nce(a, c, 0.01, torch.arange(16), 0.5)
    assert_rel_close(out, ref, rtol=1e-12)
    out32 = info_nce(a.float(), c.float(), temperature=0.01, margin=0.5)
    assert abs(float(out32) - float(ref)) < 1e-4 * float(ref)


def test_margin_zero_is_plain_and_positive_margin_raises_the_loss():
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(10, 4, generator=g, dtype=D64), torch.randn(10, 4, generator=g, dtype=D64)
    base = info_nce(a, c, temperature=0.1)
    assert_rel_close(info_nce(a, c, temperature=0.1, margin=0.0), base)
    assert float(info_nce(a, c, temperature=0.1, margin=0.2)) > float(base)
    mod = ck.losses.InfoNCE(temperature=0.1, margin=0.2, symmetric=True)
    ref = naive_margin_info_nce(a, c, 0.1, torch.arange(10), 0.2, symmetric=True)
    assert abs(float(mod(a, c)) - float(ref)) < 1e-6 * float(ref)
    mod = ck.losses.NTXent(temperature=0.5, margin=0.1)
    z = torch.cat([a, c])
    ref = naive_margin_info_nce(z, z, 0.5, torch.cat([torch.arange(10) + 10, torch.arange(10)]), 0.1,
                                drop=torch.eye(20, dtype=torch.bool))
    assert abs(float(mod(a, c)) - float(ref)) < 1e-6 * float(ref)


def test_bad_margin():
    a = torch.randn(4, 3)
    for bad in (-0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="margin"):
            info_nce(a, a, temperature=0.1, margin=bad)
    with pytest.raises(ValueError, match="margin"):
        ck.losses.NTXent(margin=-1.0)


def test_pml_ntxent_golden_and_live():
    d = np.load(DATA)
    x = torch.tensor(d["pml_ntxent.in_x"], requires_grad=True)
    y = torch.tensor(d["pml_ntxent.in_y"], requires_grad=True)
    loss = nt_xent(x, y, temperature=0.5, tile_size=10)
    loss.backward()
    assert abs(float(loss.detach()) - float(d["pml_ntxent.loss"])) < 1e-12
    assert_rel_close(x.grad, torch.tensor(d["pml_ntxent.grad_x"]))
    assert_rel_close(y.grad, torch.tensor(d["pml_ntxent.grad_y"]))
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 8, generator=g, dtype=D64), torch.randn(32, 8, generator=g, dtype=D64)
    ref = losses.NTXentLoss(temperature=0.07)(torch.cat([a, b]), torch.cat([torch.arange(32), torch.arange(32)]))
    assert abs(float(nt_xent(a, b, temperature=0.07, margin=0.0)) - float(ref)) < 1e-9 * float(ref)
