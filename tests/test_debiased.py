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
from contrastkit.engine import DiagonalMask, IndexMask
from contrastkit.functional import debiased_contrastive, hard_negative_contrastive
from objective_checks import (assert_rel_close, assert_values_and_grads_close, check_masked_loss, draw_masks, grads_of,
                              retrieval_inputs)

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
    g, a, c, extra, t, positives = retrieval_inputs(p, 1.0 if p["similarity"] == "cosine" else 0.3)
    n, m = p["n"], p["m"]
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
    assert_values_and_grads_close(out, ref, a, c, extra, t)


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


# ------------------------------------------------------------ masks= (retrieval form)


@st.composite
def masked_problems(draw):
    n = draw(st.integers(1, 9), label="N")
    positives = draw(st.sampled_from(["default", "random"]), label="positives")
    m = draw(st.integers(n, n + 6) if positives == "default" else st.integers(1, 12), label="M")
    similarity = draw(st.sampled_from(["cosine", "cosine", "dot"]))
    temps = [0.01, 0.1, 0.5, 2.0] if similarity == "cosine" else [0.5, 2.0]
    return dict(
        n=n, m=m, d=draw(st.integers(2, 6), label="d"), positives=positives, similarity=similarity,
        tau_plus=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9])),
        beta=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0])),
        n_extra=draw(st.sampled_from([0, 0, 3])),
        tile=draw(st.sampled_from([1, 2, 3, (2, 5), (3, 1), 100, None]), label="tile"),
        temp=draw(st.sampled_from(temps)),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=50, deadline=None)
@given(p=masked_problems(), data=st.data())
def test_masks_match_published_formula_per_row_q(p, data):
    g, a, c, extra, t, positives = retrieval_inputs(p, 1.0 if p["similarity"] == "cosine" else 0.3)
    n, cols = p["n"], p["m"] + p["n_extra"]
    masks, drop, _ = draw_masks(data, n, cols, positives)
    fn = hard_negative_contrastive if p["beta"] > 0 and data.draw(st.booleans(), label="hard wrapper") else \
        debiased_contrastive
    ref_fn = reference.hard_negative_contrastive if fn is hard_negative_contrastive else reference.debiased_contrastive
    kw = dict(temperature=t, tau_plus=p["tau_plus"], beta=p["beta"], similarity=p["similarity"],
              reduction=p["reduction"])
    call = lambda **more: fn(a, c, positives, extra, masks=masks, tile_size=p["tile"], **kw, **more)
    if cols < 2:
        with pytest.raises(ValueError, match="at least one negative"):
            call()
        return
    check_masked_loss(call, lambda pos: ref_fn(a, c, pos, extra, drop=drop, **kw), drop, positives, n,
                      p["reduction"], g, a, c, extra, t)


def test_masked_clamp_uses_each_rows_own_q():
    # a large class prior drives every Ng below its floor Q_i e^{-1/t}: loss_i = softplus(log Q_i - 1/t - P_i),
    # with Q_i the negatives row i keeps after the masks (7 columns, the positive out, then 0..3 masked)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 4, generator=g, dtype=D64)
    c = torch.cat([a + 0.01 * torch.randn(4, 4, generator=g, dtype=D64), torch.randn(3, 4, generator=g, dtype=D64)])
    cols = torch.tensor([[-1, -1, -1], [4, -1, -1], [4, 5, -1], [0, 5, 6]])
    t = 0.2
    for beta in (0.0, 1.0):
        out = debiased_contrastive(a, c, temperature=t, tau_plus=0.9, beta=beta, masks=[IndexMask(cols)],
                                   reduction="none", tile_size=3)
        p = (F.normalize(a, dim=-1) * F.normalize(c[:4], dim=-1)).sum(-1) / t
        q = torch.tensor([6.0, 5.0, 4.0, 3.0], dtype=D64)
        assert_rel_close(out, torch.log1p(torch.exp(q.log() - 1 / t - p)), rtol=1e-13)


def test_masks_that_drop_nothing_give_the_unmasked_loss():
    g = torch.Generator().manual_seed(8)
    a, c = torch.randn(6, 5, generator=g, dtype=D64), torch.randn(9, 5, generator=g, dtype=D64)
    extra = torch.randn(4, 5, generator=g, dtype=D64)
    for tau_plus, beta in ((0.0, 0.0), (0.1, 0.0), (0.1, 1.0), (0.5, 2.0)):
        plain = debiased_contrastive(a, c, None, extra, temperature=0.3, tau_plus=tau_plus, beta=beta)
        assert torch.equal(plain, debiased_contrastive(a, c, None, extra, temperature=0.3, tau_plus=tau_plus,
                                                       beta=beta, masks=()))
        # the per-row count path (Q_i = 12 on every row) agrees with the constant Q to rounding
        nothing = [IndexMask(torch.full((6, 1), -1)), DiagonalMask(20)]
        assert_rel_close(debiased_contrastive(a, c, None, extra, temperature=0.3, tau_plus=tau_plus, beta=beta,
                                              masks=nothing, tile_size=4), plain, rtol=1e-14)


def test_masks_modules_and_errors():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    docs = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    hard = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    cols = torch.tensor([[1, 7], [0, -1], [-1, -1], [-1, 9], [-1, -1], [-1, -1]])
    drop = torch.zeros(6, 12, dtype=torch.bool)
    for i, row in enumerate(cols.tolist()):
        for col in row:
            if col >= 0:
                drop[i, col] = True
    for mod, beta in ((ck.losses.DebiasedContrastive(temperature=0.5, tau_plus=0.1), 0.0),
                      (ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1), 1.0)):
        mod = mod.double()
        assert mod.work.dropped == ("positive", "masks")
        got = mod(q, docs, None, hard, masks=[IndexMask(cols)])
        want = reference.debiased_contrastive(q, docs, None, hard, temperature=0.5, tau_plus=0.1, beta=beta, drop=drop)
        assert_rel_close(got, want, rtol=1e-12)
        assert abs(float(mod(q, docs, None, hard).detach()) - float(got.detach())) > 1e-6
        for x, y in zip(grads_of(got, [q, docs, hard]), grads_of(want, [q, docs, hard])):
            assert_rel_close(x, y, rtol=1e-10)
    # learnable temperature: d loss / d log_scale = -t d loss / dt
    mod = ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1, learn_temperature=True).double()
    mod(q, docs, None, hard, masks=[IndexMask(cols)]).backward()
    t = torch.tensor(0.5, dtype=D64, requires_grad=True)
    (gt,) = torch.autograd.grad(reference.hard_negative_contrastive(q, docs, None, hard, temperature=t, beta=1.0,
                                                                   tau_plus=0.1, drop=drop), [t])
    assert_rel_close(mod.temperature.log_scale.grad, -0.5 * gt, rtol=1e-9)
    a, b = q.detach()[:4], docs.detach()[:4]
    with pytest.raises(ValueError, match="masks= is for the retrieval form"):
        debiased_contrastive(a, b, temperature=0.5, two_view=True, masks=[DiagonalMask(1)])
    with pytest.raises(ValueError, match="masks= is for the retrieval form"):
        ck.losses.HardNegativeContrastive(two_view=True)(a, b, masks=[DiagonalMask(1)])
    # every negative of row 1 masked
    every = IndexMask(torch.tensor([[-1] * 3, [0, 2, 3], [-1] * 3, [-1] * 3]))
    with pytest.raises(ValueError, match="anchor row 1 has no negative left"):
        debiased_contrastive(a, b, temperature=0.5, masks=[every])
    # ... or, with empty_rows="skip", row 1 leaves the loss (module and function), with a warning
    drop1 = torch.zeros(4, 4, dtype=torch.bool)
    drop1[1, [0, 2, 3]] = True
    want = reference.hard_negative_contrastive(a, b, torch.tensor([0, -1, 2, 3]), temperature=0.5, beta=1.0,
                                               tau_plus=0.1, drop=drop1)
    mod = ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1).double()
    with pytest.warns(RuntimeWarning, match="debiased_contrastive: 1 of 4 anchor row"):
        assert_rel_close(mod(a, b, masks=[every], empty_rows="skip"), want, rtol=1e-12)
    # a row without positive may lose every column: it is left out
    pos = torch.tensor([0, -1, 2, 3])
    cols = torch.tensor([[-1] * 4, [0, 1, 2, 3], [-1] * 4, [-1] * 4])
    d2 = torch.zeros(4, 4, dtype=torch.bool)
    d2[1] = True
    for beta in (0.0, 1.0):
        a.requires_grad_()
        got = debiased_contrastive(a, b, pos, temperature=0.5, beta=beta, masks=[IndexMask(cols)], reduction="none")
        want = reference.debiased_contrastive(a, b, pos, temperature=0.5, beta=beta, drop=d2, reduction="none")
        assert_rel_close(got, want, rtol=1e-12)
        assert_rel_close(grads_of(got.sum(), [a])[0], grads_of(want.sum(), [a])[0], rtol=1e-10)
