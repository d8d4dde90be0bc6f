"""Debiased contrastive loss (Chuang et al. 2020) and hard-negative reweighting (Robinson
et al. 2021): ck.functional.debiased_contrastive / hard_negative_contrastive and their
modules against the published code's formula (exp, masked_select, clamp) in float64, in
the two-view and retrieval layouts, with extra candidates; special cases; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from contrastkit.functional import debiased_contrastive, hard_negative_contrastive
from objective_checks import assert_rel_close, grads_of, inverse_min_temperature

D64 = torch.float64


def naive_two_view(a, b, t, tau_plus, beta, extra=None, similarity="cosine"):
    return reference.debiased_contrastive(a, b, None, extra, temperature=t, tau_plus=tau_plus, beta=beta,
                                          two_view=True, similarity=similarity)


def naive_retrieval(a, c, t, positives, tau_plus, beta, extra=None, similarity="cosine"):
    return reference.debiased_contrastive(a, c, positives, extra, temperature=t, tau_plus=tau_plus, beta=beta,
                                          similarity=similarity)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 9), label="N")
    symmetric = draw(st.booleans(), label="symmetric")
    m = n if symmetric else draw(st.integers(n, n + 5), label="M")
    similarity = draw(st.sampled_from(["cosine", "cosine", "dot"]))
    temps = [0.01, 0.1, 0.5, 2.0] if similarity == "cosine" else [0.5, 2.0]
    return dict(
        n=n, m=m, d=draw(st.integers(2, 6)), symmetric=symmetric, similarity=similarity,
        tau_plus=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9])),
        beta=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0])),
        n_extra=draw(st.sampled_from([0, 0, 4])),
        positives=draw(st.sampled_from(["default", "random"])) if not symmetric else "default",
        tile=draw(st.sampled_from([1, 3, 100, None])),
        temp=draw(st.sampled_from(temps)),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=80, deadline=None)
@given(problems())
def test_matches_published_formula(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, m, d = p["n"], p["m"], p["d"]
    sc = 1.0 if p["similarity"] == "cosine" else 0.3
    a = (sc * torch.randn(n, d, generator=g, dtype=D64)).requires_grad_()
    c = (sc * torch.randn(m, d, generator=g, dtype=D64)).requires_grad_()
    extra = (sc * torch.randn(p["n_extra"], d, generator=g, dtype=D64)).requires_grad_() if p["n_extra"] else None
    if p["temp_kind"] == "float":
        t = p["temp"]
    elif p["temp_kind"] == "scalar":
        t = torch.tensor(p["temp"], dtype=D64, requires_grad=True)
    else:
        t = (p["temp"] * (1 + torch.rand(n, generator=g, dtype=D64))).requires_grad_()
    positives = None
    if p["positives"] == "random":
        positives = torch.randint(-1, m, (n,), generator=g)
        positives[0] = int(torch.randint(0, m, (1,), generator=g))
    n_neg = (2 * n - 2 if p["symmetric"] else m - 1) + p["n_extra"]
    kw = dict(tau_plus=p["tau_plus"], beta=p["beta"], extra=extra, similarity=p["similarity"])
    call = lambda: debiased_contrastive(
        a, c, temperature=t, tau_plus=p["tau_plus"], beta=p["beta"], two_view=p["symmetric"],
        positives=positives, extra_candidates=extra, similarity=p["similarity"], tile_size=p["tile"])
    if n_neg == 0:
        with pytest.raises(ValueError, match="at least one negative"):
            call()
        return
    if p["symmetric"]:
        ref = naive_two_view(a, c, t, **kw)
    else:
        ref = naive_retrieval(a, c, t, positives if positives is not None else torch.arange(n), **kw)
    out = call()
    inv_t = inverse_min_temperature(t)
    assert_rel_close(out, ref, scale=inv_t, what="value")
    inputs = [a, c] + ([extra] if extra is not None else []) + ([t] if isinstance(t, torch.Tensor) else [])
    names = ["anchors", "candidates"] + (["extra"] if extra is not None else []) + (["temperature"] if isinstance(t, torch.Tensor) else [])
    for x, y, name in zip(grads_of(out, inputs), grads_of(ref, inputs), names):
        assert_rel_close(x, y, what=f"grad {name}", atol=1e-14 * inv_t * (inv_t if name == "temperature" else 1.0))


def test_no_prior_no_hardness_is_nt_xent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 6, generator=g, dtype=D64), torch.randn(10, 6, generator=g, dtype=D64)
    # NT-Xent keeps the positive in the denominator; so does the debiased loss (pos + Ng)
    assert_rel_close(debiased_contrastive(a, b, temperature=0.5, tau_plus=0.0, two_view=True),
                     ck.functional.nt_xent(a, b, temperature=0.5))
    assert_rel_close(debiased_contrastive(a, b, temperature=0.5, tau_plus=0.0),
                     ck.functional.info_nce(a, b, temperature=0.5))


def test_clamp_is_active_and_exact():
    # a large class prior drives Ng below its floor Q e^{-1/t}: loss = softplus(log Q - 1/t - P)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 4, generator=g, dtype=D64)
    b = a + 0.01 * torch.randn(8, 4, generator=g, dtype=D64)
    t = 0.2
    out = debiased_contrastive(a, b, temperature=t, tau_plus=0.9, two_view=True, reduction="none")
    p = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1) / t
    d = math.log(14) - 1 / t - torch.cat([p, p])
    want = torch.log1p(torch.exp(d))
    assert_rel_close(out, want)


def test_small_temperature_no_overflow_float32():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    for beta in (0.0, 1.0, 3.0):
        out = debiased_contrastive(a, b, temperature=0.01, tau_plus=0.1, beta=beta, two_view=True, tile_size=20)
        ref = naive_two_view(a.double(), b.double(), 0.01, 0.1, beta) if beta < 3 else None
        assert torch.isfinite(out)
        if ref is not None:
            assert abs(float(out) - float(ref)) < 1e-4 * abs(float(ref)) + 1e-3


def test_hard_negative_wrapper_and_modules():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(12, 8, generator=g, dtype=D64), torch.randn(12, 8, generator=g, dtype=D64)
    x = hard_negative_contrastive(a, b, temperature=0.5, beta=1.0, tau_plus=0.1, two_view=True)
    assert_rel_close(x, naive_two_view(a, b, 0.5, 0.1, 1.0))
    m = ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1, two_view=True)
    assert abs(float(m(a, b)) - float(x)) < 1e-6 * abs(float(x))
    m2 = ck.losses.DebiasedContrastive(temperature=0.5, tau_plus=0.1, learn_temperature=True)
    a.requires_grad_()
    m2(a, b).backward()
    assert torch.isfinite(m2.temperature.log_scale.grad) and torch.isfinite(a.grad).all()


def test_queue_negatives():
    g = torch.Generator().manual_seed(4)
    queue = ck.negatives.MemoryQueue(20, 8)
    queue.enqueue(torch.randn(20, 8, generator=g, dtype=D64))
    a, b = torch.randn(6, 8, generator=g, dtype=D64), torch.randn(6, 8, generator=g, dtype=D64)
    out = debiased_contrastive(a, b, temperature=0.3, tau_plus=0.1, beta=0.5, extra_candidates=queue.candidates())
    assert_rel_close(out, naive_retrieval(a, b, 0.3, torch.arange(6), 0.1, 0.5, extra=queue.candidates()))


def test_bad_input():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    for tau in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="tau_plus"):
            debiased_contrastive(a, b, temperature=0.5, tau_plus=tau)
    with pytest.raises(ValueError, match="beta"):
        debiased_contrastive(a, b, temperature=0.5, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        ck.losses.HardNegativeContrastive(beta=float("nan"))
    with pytest.raises(ValueError, match="two-view form"):
        debiased_contrastive(a, b, temperature=0.5, two_view=True, positives=torch.arange(4))
    with pytest.raises(ValueError, match="at least one negative"):
        debiased_contrastive(a[:1], b[:1], temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        debiased_contrastive(a, b, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        debiased_contrastive(a, b, temperature=0.5, reduction="max")
