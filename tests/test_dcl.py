"""DCL / DCLW (ck.functional.dcl, ck.losses.DCL, ck.losses.DCLW) against the published
formula (Yeh et al. 2022) materialised in float64, in the retrieval and the two-view
layouts, with extra candidates; lightly parity on the golden vectors; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from contrastkit.engine import DiagonalMask, IndexMask
from contrastkit.functional import dcl
from objective_checks import (assert_rel_close, assert_values_and_grads_close, check_masked_loss, draw_masks, grads_of,
                              retrieval_inputs)

D64 = torch.float64
DATA = __import__("pathlib").Path(__file__).parent / "data" / "peer_losses.npz"
NEG = float("-inf")


def naive_dcl_two_view(a, b, t, *, weighted=False, sigma=0.5, extra=None, similarity="cosine"):
    """The paper's (and lightly's) two-view DCL (contrastkit.reference.dcl)."""
    return reference.dcl(a, b, None, extra, temperature=t, two_view=True, weighted=weighted, sigma=sigma,
                         similarity=similarity)


def naive_dcl_retrieval(a, c, t, positives, *, weighted=False, sigma=0.5, extra=None, similarity="cosine"):
    return reference.dcl(a, c, positives, extra, temperature=t, weighted=weighted, sigma=sigma, similarity=similarity)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 10), label="N")
    d = draw(st.integers(2, 6), label="d")
    symmetric = draw(st.booleans(), label="symmetric")
    m = n if symmetric else draw(st.integers(n, n + 6), label="M")
    return dict(
        n=n, m=m, d=d, symmetric=symmetric,
        weighted=draw(st.booleans(), label="weighted"),
        sigma=draw(st.sampled_from([0.1, 0.5, 2.0])),
        n_extra=draw(st.sampled_from([0, 0, 4])),
        positives=draw(st.sampled_from(["default", "random"])) if not symmetric else "default",
        tile=draw(st.sampled_from([1, 3, 100, None])),
        temp=draw(st.sampled_from([0.01, 0.1, 0.5, 2.0])),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
        similarity=draw(st.sampled_from(["cosine", "dot"])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_dcl_matches_naive_formula(p):
    g, a, c, extra, t, positives = retrieval_inputs(p, 1.0 if p["similarity"] == "cosine" or p["temp"] >= 0.5 else 0.3)
    n, m = p["n"], p["m"]
    kw = dict(weighted=p["weighted"], sigma=p["sigma"], extra=extra, similarity=p["similarity"])
    if p["symmetric"]:
        ref = naive_dcl_two_view(a, c, t, **kw)
    else:
        ref = naive_dcl_retrieval(a, c, t, positives if positives is not None else torch.arange(n), **kw)
    n_neg = (2 * n - 2 if p["symmetric"] else m - 1) + p["n_extra"]
    call = lambda: dcl(a, c, temperature=t, two_view=p["symmetric"], weighted=p["weighted"], sigma=p["sigma"],
                       positives=positives, extra_candidates=extra, similarity=p["similarity"], tile_size=p["tile"])
    if n_neg == 0:
        with pytest.raises(ValueError, match="no negative"):
            call()
        return
    out = call()
    assert_values_and_grads_close(out, ref, a, c, extra, t)


@pytest.mark.parametrize("case, weighted", [("lightly_dcl", False), ("lightly_dclw", True)])
def test_lightly_golden_vectors(case, weighted):
    d = np.load(DATA)
    x = torch.tensor(d[f"{case}.in_x"], requires_grad=True)
    y = torch.tensor(d[f"{case}.in_y"], requires_grad=True)
    loss = dcl(x, y, temperature=0.1, two_view=True, weighted=weighted, sigma=0.5, tile_size=11)
    loss.backward()
    assert abs(float(loss.detach()) - float(d[f"{case}.loss"])) < 1e-12
    assert_rel_close(x.grad, torch.tensor(d[f"{case}.grad_x"]))
    assert_rel_close(y.grad, torch.tensor(d[f"{case}.grad_y"]))
    # the modules (their Temperature holds 1/t in float32: 1e-8 relative)
    mod = (ck.losses.DCLW(temperature=0.1, sigma=0.5, two_view=True) if weighted
           else ck.losses.DCL(temperature=0.1, two_view=True))
    assert abs(float(mod(x, y).detach()) - float(d[f"{case}.loss"])) < 1e-6


def test_dcl_is_info_nce_without_the_positive_in_the_denominator():
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(9, 5, generator=g, dtype=D64), torch.randn(12, 5, generator=g, dtype=D64)
    x = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / 0.2
    pos = x.diagonal()
    neg = torch.logsumexp(x.masked_fill(torch.eye(9, 12, dtype=torch.bool), NEG), 1)
    # info_nce = mean log(e^pos + e^neg) - pos; dcl = mean neg - pos
    assert_rel_close(dcl(a, c, temperature=0.2), (neg - pos).mean())
    assert_rel_close(ck.functional.info_nce(a, c, temperature=0.2), (torch.logaddexp(pos, neg) - pos).mean())


def test_dclw_weights_carry_no_gradient():
    # DCLW's loss gradient equals DCL's with the positive term scaled by the (constant) weights
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 4, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=D64, requires_grad=True)
    ref = naive_dcl_two_view(a, b, 0.3, weighted=True, sigma=0.5)
    out = dcl(a, b, temperature=0.3, two_view=True, weighted=True)
    for x, y in zip(grads_of(out, [a, b]), grads_of(ref, [a, b])):
        assert_rel_close(x, y)


def test_reduction_none_and_float32():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    rows = dcl(a, b, temperature=0.1, two_view=True, reduction="none")
    assert rows.shape == (14,)
    assert abs(float(rows.mean()) - float(naive_dcl_two_view(a.double(), b.double(), 0.1))) < 1e-5


def test_bad_input():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="two-view form"):
        dcl(a, b, temperature=0.1, two_view=True, positives=torch.arange(4))
    with pytest.raises(ValueError, match="same number of samples"):
        dcl(a, torch.randn(5, 3), temperature=0.1, two_view=True)
    with pytest.raises(ValueError, match="at least as many candidates"):
        dcl(a, torch.randn(3, 3), temperature=0.1)
    with pytest.raises(ValueError, match="sigma"):
        dcl(a, b, temperature=0.1, weighted=True, sigma=0.0)
    with pytest.raises(ValueError, match="different embedding dimensions"):
        dcl(a, torch.randn(4, 2), temperature=0.1)
    with pytest.raises(ValueError, match="positives must be an integer"):
        dcl(a, b, temperature=0.1, positives=torch.zeros(4))
    with pytest.raises(ValueError, match="no negative"):
        dcl(a[:1], b[:1], temperature=0.1)
    with pytest.raises(ValueError, match="every entry of positives is -1"):
        dcl(a, b, temperature=0.1, positives=torch.full((4,), -1))


# ------------------------------------------------------------ masks= (retrieval form)


@st.composite
def masked_problems(draw):
    n = draw(st.integers(1, 9), label="N")
    positives = draw(st.sampled_from(["default", "random"]), label="positives")
    m = draw(st.integers(n, n + 6) if positives == "default" else st.integers(1, 12), label="M")
    return dict(
        n=n, m=m, d=draw(st.integers(2, 6), label="d"), positives=positives,
        weighted=draw(st.booleans(), label="weighted"),
        sigma=draw(st.sampled_from([0.1, 0.5, 2.0])),
        n_extra=draw(st.sampled_from([0, 0, 3])),
        tile=draw(st.sampled_from([1, 2, 3, (2, 5), (3, 1), 100, None]), label="tile"),
        temp=draw(st.sampled_from([0.01, 0.1, 0.5, 2.0])),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
        similarity=draw(st.sampled_from(["cosine", "dot"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=50, deadline=None)
@given(p=masked_problems(), data=st.data())
def test_dcl_with_masks_matches_naive(p, data):
    g, a, c, extra, t, positives = retrieval_inputs(p, 1.0 if p["similarity"] == "cosine" or p["temp"] >= 0.5 else 0.3)
    n, cols = p["n"], p["m"] + p["n_extra"]
    masks, drop, _ = draw_masks(data, n, cols, positives)
    kw = dict(temperature=t, weighted=p["weighted"], sigma=p["sigma"], similarity=p["similarity"],
              reduction=p["reduction"])
    call = lambda **more: dcl(a, c, positives, extra, masks=masks, tile_size=p["tile"], **kw, **more)
    check_masked_loss(call, lambda pos: reference.dcl(a, c, pos, extra, drop=drop, **kw), drop, positives, n,
                      p["reduction"], g, a, c, extra, t)


def test_dcl_masks_drop_false_negatives_and_modules_accept_them():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    docs = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    hard = torch.randn(6, 5, generator=g, dtype=D64, requires_grad=True)
    # query x [positive documents; hard negatives]: queries 0 and 1 share their documents
    cols = torch.tensor([[1], [0], [-1], [-1], [-1], [-1]])
    drop = torch.zeros(6, 12, dtype=torch.bool)
    drop[0, 1] = drop[1, 0] = True
    for cls in (ck.losses.DCL, ck.losses.DCLW):
        mod = cls(temperature=0.2).double()
        assert mod.work.dropped == ("positive", "masks")
        got = mod(q, docs, None, hard, masks=[IndexMask(cols)])
        want = reference.dcl(q, docs, None, hard, temperature=0.2, weighted=cls is ck.losses.DCLW, drop=drop)
        assert_rel_close(got, want, rtol=1e-12)
        plain = mod(q, docs, None, hard)
        assert abs(float(plain.detach()) - float(got.detach())) > 1e-6          # the mask did drop something
        for x, y in zip(grads_of(got, [q, docs, hard]), grads_of(want, [q, docs, hard])):
            assert_rel_close(x, y, rtol=1e-10)
    # a learnable temperature gets its exact gradient through the masked walk too
    mod = ck.losses.DCL(temperature=0.2, learn_temperature=True).double()
    mod(q, docs, None, hard, masks=[IndexMask(cols)]).backward()
    t = torch.tensor(0.2, dtype=D64, requires_grad=True)
    want = reference.dcl(q, docs, None, hard, temperature=t, drop=drop)
    (gt,) = torch.autograd.grad(want, [t])
    # d loss / d log_scale = d loss / dt * dt / dlog_scale = -t * d loss / dt
    assert_rel_close(mod.temperature.log_scale.grad, -0.2 * gt, rtol=1e-9)


def test_dcl_masks_without_masks_unchanged_and_two_view_refuses():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 4, generator=g, dtype=D64), torch.randn(7, 4, generator=g, dtype=D64)
    assert torch.equal(dcl(a, b, temperature=0.1, masks=()), dcl(a, b, temperature=0.1))
    # a mask that drops nothing: the same loss
    assert_rel_close(dcl(a, b, temperature=0.1, masks=[IndexMask(torch.full((5, 2), -1))]),
                     dcl(a, b, temperature=0.1), rtol=1e-14)
    with pytest.raises(ValueError, match="masks= is for the retrieval form"):
        dcl(a, b[:5], temperature=0.1, two_view=True, masks=[DiagonalMask(1)])
    with pytest.raises(ValueError, match="masks= is for the retrieval form"):
        ck.losses.DCLW(temperature=0.1, two_view=True)(a, b[:5], masks=[DiagonalMask(1)])
    # masks dropping every negative of row 2 (the diagonal is its positive)
    cols = torch.tensor([[-1] * 6, [-1] * 6, [0, 1, 3, 4, 5, 6], [-1] * 6, [-1] * 6])
    with pytest.raises(ValueError, match="anchor row 2 has no negative left"):
        dcl(a, b, temperature=0.1, masks=[IndexMask(cols)])
    # ... or, with empty_rows="skip", row 2 leaves the loss (module and function), with a warning
    drop2 = torch.zeros(5, 7, dtype=torch.bool)
    drop2[2, [0, 1, 3, 4, 5, 6]] = True
    for weighted in (False, True):
        want = reference.dcl(a, b, torch.tensor([0, 1, -1, 3, 4]), temperature=0.1, weighted=weighted, drop=drop2)
        mod = (ck.losses.DCLW if weighted else ck.losses.DCL)(temperature=0.1).double()
        with pytest.warns(RuntimeWarning, match="dcl: 1 of 5 anchor row"):
            assert_rel_close(mod(a, b, masks=[IndexMask(cols)], empty_rows="skip"), want, rtol=1e-12)
    with pytest.raises(ValueError, match="empty_rows must be one of"):
        dcl(a, b, temperature=0.1, masks=[IndexMask(cols)], empty_rows="drop")
    # a row without positive may lose every column: it is left out
    pos = torch.tensor([0, 1, -1, 3, 4])
    cols[2, :] = torch.tensor([0, 1, 3, 4, 5, 6])
    got = dcl(a, b, pos, temperature=0.1, masks=[IndexMask(torch.cat([cols, torch.full((5, 1), -1)], 1)),
                                                 IndexMask(torch.tensor([[-1], [-1], [2], [-1], [-1]]))])
    drop = torch.zeros(5, 7, dtype=torch.bool)
    drop[2] = True
    assert_rel_close(got, reference.dcl(a, b, pos, temperature=0.1, drop=drop), rtol=1e-12)
    with pytest.raises(ValueError, match="IndexMask columns"):
        dcl(a, b, temperature=0.1, masks=[IndexMask(torch.zeros(4, 1, dtype=torch.long))])
