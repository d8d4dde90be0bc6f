"""Alignment and uniformity (Wang & Isola 2020) against their reference formulas
(align: mean ||x - y||^alpha; uniform: pdist(x)^2 * -t, exp, mean, log) in float64:
values and gradients over random sizes and tiles, the combined loss, metrics, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from conftest import assert_rel_close, grads_of
from contrastkit.functional import align_uniform, alignment, uniformity
from contrastkit.objectives.align_uniform import alignment_metric, uniformity_metric

D64 = torch.float64


def naive_align(x, y, alpha=2.0):
    return reference.alignment(x, y, alpha=alpha, normalize=False)


def naive_uniform(x, t=2.0):
    return reference.uniformity(x, t=t, normalize=False)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 8), t=st.floats(0.05, 20.0), tile=st.sampled_from([1, 3, None, 64, (2, 7)]),
       normalize=st.booleans(), seed=st.integers(0, 2**31))
def test_uniformity_matches_pdist_formula(n, d, t, tile, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=D64, generator=g, requires_grad=True)
    got = uniformity(x, t=t, normalize=normalize, tile_size=tile)
    want = naive_uniform(F.normalize(x, dim=-1) if normalize else x, t)
    assert_rel_close(got, want, what="value", atol=1e-13)  # d = 1: the value can be exactly 0
    assert_rel_close(grads_of(got, [x])[0], grads_of(want, [x])[0], what="grad", atol=1e-13)


def test_uniformity_duplicates_and_two_rows():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D64, requires_grad=True)
    got, want = uniformity(x, normalize=False), naive_uniform(x)
    assert_rel_close(got, want)
    assert_rel_close(grads_of(got, [x])[0], grads_of(want, [x])[0], atol=1e-13)
    y = torch.randn(2, 3, dtype=D64)
    assert_rel_close(uniformity(y, t=1.0, normalize=False), naive_uniform(y, 1.0))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), d=st.integers(1, 6), alpha=st.sampled_from([2.0, 1.0, 3.0, 0.5]),
       normalize=st.booleans(), seed=st.integers(0, 2**31))
def test_alignment_matches_formula(n, d, alpha, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=D64, generator=g, requires_grad=True)
    y = torch.randn(n, d, dtype=D64, generator=g, requires_grad=True)
    got = alignment(x, y, alpha=alpha, normalize=normalize)
    xx, yy = (F.normalize(x, dim=-1), F.normalize(y, dim=-1)) if normalize else (x, y)
    want = naive_align(xx, yy, alpha)
    assert_rel_close(got, want)
    for a, e in zip(grads_of(got, [x, y]), grads_of(want, [x, y])):
        assert torch.isfinite(a).all()
        if torch.isfinite(e).all():   # the reference is NaN at x_i == y_i for alpha <= 1; ours is 0 there
            assert_rel_close(a, e, atol=1e-13)


def test_alignment_at_zero_distance_has_zero_gradient():
    x = torch.tensor([[1.0, 2.0], [0.5, 0.5]], dtype=D64, requires_grad=True)
    y = torch.tensor([[1.0, 2.0], [0.0, 0.5]], dtype=D64)
    for alpha in (0.5, 1.0, 2.0, 3.0):
        got = alignment(x, y, alpha=alpha, normalize=False)
        assert_rel_close(got, torch.tensor(0.5 ** alpha / 2, dtype=D64))
        gx = grads_of(got, [x])[0]
        assert torch.equal(gx[0], torch.zeros(2, dtype=D64))


def test_align_uniform_combined_and_modules():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, dtype=D64, generator=g, requires_grad=True)
    y = torch.randn(40, 6, dtype=D64, generator=g, requires_grad=True)
    got = align_uniform(x, y, uniformity_weight=0.7, normalize=True, tile_size=7)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    want = naive_align(xn, yn) + 0.7 * (naive_uniform(xn) + naive_uniform(yn)) / 2
    assert_rel_close(got, want)
    for a, e in zip(grads_of(got, [x, y]), grads_of(want, [x, y])):
        assert_rel_close(a, e, atol=1e-13)
    assert_rel_close(ck.losses.AlignUniform(uniformity_weight=0.7)(x, y), want)
    assert_rel_close(ck.losses.Alignment(alpha=2)(xn, yn), naive_align(xn, yn))
    assert_rel_close(ck.losses.Uniformity(t=2)(xn), naive_uniform(xn))


def test_metrics_are_floats_without_grad():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 5, generator=g, requires_grad=True)
    y = torch.randn(50, 5, generator=g)
    a, u = alignment_metric(x, y), uniformity_metric(x)
    assert isinstance(a, float) and isinstance(u, float)
    xn = F.normalize(x.detach().double(), dim=-1)
    assert math.isclose(u, float(naive_uniform(xn)), rel_tol=1e-5)
    assert math.isclose(a, float(naive_align(xn, F.normalize(y.double(), dim=-1))), rel_tol=1e-5)


def test_normalize_default_is_the_same_everywhere():
    """One default for ``normalize`` in the functions and the modules (True: the paper's setting)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, generator=g, dtype=D64), torch.randn(6, 3, generator=g, dtype=D64)
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    assert_rel_close(alignment(x, y), naive_align(xn, yn))
    assert_rel_close(uniformity(x), naive_uniform(xn))
    assert_rel_close(align_uniform(x, y), ck.losses.AlignUniform()(x, y))
    assert_rel_close(ck.losses.Alignment()(x, y), alignment(x, y))
    assert_rel_close(ck.losses.Uniformity()(x), uniformity(x))
    rows = ck.losses.Alignment(reduction="none")(x, y)
    assert_rel_close(rows, (xn - yn).pow(2).sum(1))
    assert_rel_close(ck.losses.Alignment(reduction="sum")(x, y), rows.sum())
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean',\)"):
        ck.losses.Uniformity(reduction="sum")


def test_uniformity_large_n_float32_exact():
    g = torch.Generator().manual_seed(8)
    x = F.normalize(torch.randn(3000, 16, generator=g), dim=-1)
    got = uniformity(x, tile_size=512)
    want = naive_uniform(x.double())
    assert abs(float(got) - float(want)) < 1e-5 * abs(float(want))


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 rows"):
        uniformity(torch.randn(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        uniformity(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="same number of rows"):
        alignment(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="dimension"):
        alignment(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match="alpha"):
        alignment(torch.randn(3, 2), torch.randn(3, 2), alpha=0)
    with pytest.raises(ValueError, match="t must"):
        uniformity(torch.randn(3, 2), t=-1.0)
    with pytest.raises(ValueError, match="shape"):
        uniformity(torch.randn(3, 2, 2))
