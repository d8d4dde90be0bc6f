"""Soft targets: CWCL and I-Con against materialised float64 formulas (full weight and
logit matrices, autograd): values and gradients of features and temperatures over
random sizes, tiles, supervisions and kernels; the tiled k-NN; edge cases; bad input."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from conftest import assert_rel_close, grads_of
from objective_checks import temperature_from_list
from contrastkit.engine.neighbors import tiled_topk
from contrastkit.functional import cwcl, icon

D64 = torch.float64


# ------------------------------------------------------------------ CWCL


def naive_cwcl(x, y, t, teacher, teacher_c, symmetric=False, similarity="cosine", reduction="mean"):
    return reference.cwcl(x, y, teacher, teacher_c, temperature=t, symmetric=symmetric, similarity=similarity,
                          reduction=reduction)


@st.composite
def cwcl_problems(draw):
    n = draw(st.integers(1, 12))
    same = draw(st.booleans())
    m = n if same else draw(st.integers(1, 14))
    return dict(n=n, m=m, d=draw(st.integers(1, 6)), dt=draw(st.integers(2, 5)), default_teacher=same and draw(st.booleans()),
                tile=draw(st.sampled_from([1, 4, None, 50, (3, 2)])),
                temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
                temps=draw(st.lists(st.floats(0.01, 2.0), min_size=n, max_size=n)),
                symmetric=draw(st.booleans()), similarity=draw(st.sampled_from(["cosine", "dot"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=40, deadline=None)
@given(cwcl_problems())
def test_cwcl_matches_naive(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, m = p["n"], p["m"]
    x = torch.randn(n, p["d"], dtype=D64, generator=g)
    y = torch.randn(m, p["d"], dtype=D64, generator=g)
    if p["similarity"] == "dot":
        x, y = x * 0.3, y * 0.3
    x.requires_grad_(True), y.requires_grad_(True)
    t, params = temperature_from_list(p)
    if p["symmetric"] and p["reduction"] == "none":
        p["reduction"] = "mean"
    kw = dict(symmetric=p["symmetric"], similarity=p["similarity"], reduction=p["reduction"])
    if p["default_teacher"]:
        got = cwcl(x, y, temperature=t, tile_size=p["tile"], **kw)
        want = naive_cwcl(x, y, t, y, y, **kw)
    else:
        tr = torch.randn(n, p["dt"], dtype=D64, generator=g)
        tc = tr if m == n else torch.randn(m, p["dt"], dtype=D64, generator=g)
        got = cwcl(x, y, temperature=t, teacher=tr, teacher_candidates=None if m == n else tc,
                   tile_size=p["tile"], **kw)
        want = naive_cwcl(x, y, t, tr, tc, **kw)
    # relative to the logit scale 1/t: the closed-form target term divides by the row's
    # weight sum, which loses digits (not exactness) when teacher cosines approach -1
    assert_rel_close(got, want, what="value", scale=1.0 / min(p["temps"]), atol=1e-13)
    w = torch.randn(got.shape, dtype=D64, generator=g) if got.dim() else torch.tensor(1.0, dtype=D64)
    ins = [x, y] + params
    atol = 1e-12 / min(p["temps"])
    if m == 1:
        # the loss is identically 0, so both gradients are rounding noise, amplified by the
        # target weight w = (1 + cos) / 2 (relative error eps / w when the teacher rows are
        # nearly opposite) and by 1 / |x| through the normalisation
        t_rows = y.detach() if p["default_teacher"] else tr
        t_cols = y.detach() if p["default_teacher"] else tc
        w_min = float(((1 + F.normalize(t_rows, dim=1) @ F.normalize(t_cols, dim=1).T) / 2).min())
        norm_min = float(torch.cat([x.detach().norm(dim=1), y.detach().norm(dim=1)]).min())
        atol = 1e-13 / min(p["temps"]) / min(1.0, w_min) / min(1.0, norm_min)
    for a, e, name in zip(grads_of((got * w).sum(), ins), grads_of((want * w).sum(), ins), "xyt"):
        assert_rel_close(a, e, what=f"grad {name}", atol=atol)


def test_cwcl_identical_teacher_rows_and_module():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 4, dtype=D64, generator=g, requires_grad=True)
    y = torch.randn(6, 4, dtype=D64, generator=g)
    teacher = torch.ones(6, 3, dtype=D64)   # all teacher rows identical: uniform weights
    got = cwcl(x, y, temperature=0.1, teacher=teacher)
    assert_rel_close(got, naive_cwcl(x, y, 0.1, teacher, teacher))
    mod = ck.losses.CWCL(temperature=0.1, symmetric=True)
    t = mod.temperature().detach().double()          # the module's float32 temperature, exactly
    assert_rel_close(mod(x, y), naive_cwcl(x, y, t, y, y, symmetric=True))


def test_cwcl_bad_input():
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="default teacher"):
        cwcl(x, y, temperature=0.1)
    with pytest.raises(ValueError, match="teacher must have one row per anchor"):
        cwcl(x, y[:4], temperature=0.1, teacher=torch.randn(3, 2))
    with pytest.raises(ValueError, match="teacher_candidates must have one row per candidate"):
        cwcl(x, y, temperature=0.1, teacher=torch.randn(4, 2), teacher_candidates=torch.randn(4, 2))
    with pytest.raises(ValueError, match="dimension"):
        cwcl(x, y, temperature=0.1, teacher=torch.randn(4, 2), teacher_candidates=torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        cwcl(x, y[:4], temperature=0.1, teacher=torch.full((4, 2), float("nan")))


# ------------------------------------------------------------------ I-Con


def naive_icon(f, kernel, *, t=None, sigma=1.0, labels=None, teacher=None, neighbors=None, teacher_t=None,
               reduction="mean"):
    return reference.icon(f, labels, teacher, neighbors=neighbors, teacher_temperature=teacher_t, kernel=kernel,
                          temperature=t, sigma=sigma, reduction=reduction)


@st.composite
def icon_problems(draw):
    n = draw(st.integers(2, 14))
    sup = draw(st.sampled_from(["labels", "knn", "teacher"]))
    return dict(n=n, d=draw(st.integers(1, 6)), sup=sup, kernel=draw(st.sampled_from(["cosine", "gaussian", "student_t"])),
                n_classes=draw(st.integers(1, n)), k=draw(st.integers(1, n - 1)),
                teacher_t=draw(st.floats(0.05, 2.0)), tile=draw(st.sampled_from([1, 3, None, 40, (2, 5)])),
                temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
                temps=draw(st.lists(st.floats(0.01, 2.0), min_size=n, max_size=n)),
                sigma=draw(st.floats(0.3, 3.0)), learn_sigma=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=60, deadline=None)
@given(icon_problems())
def test_icon_matches_naive(p):
    g = torch.Generator().manual_seed(p["seed"])
    n = p["n"]
    f = torch.randn(n, p["d"], dtype=D64, generator=g, requires_grad=True)
    kw = {}
    ref_kw = {}
    if p["sup"] == "labels":
        labels = torch.randint(0, p["n_classes"], (n,), generator=g)
        if (torch.bincount(labels) < 2).all():
            labels[1] = labels[0]
        kw["labels"] = ref_kw["labels"] = labels
    else:
        teacher = torch.randn(n, 3, dtype=D64, generator=g)
        kw["teacher"] = ref_kw["teacher"] = teacher
        if p["sup"] == "knn":
            kw["neighbors"] = ref_kw["neighbors"] = p["k"]
        else:
            kw["teacher_temperature"] = ref_kw["teacher_t"] = p["teacher_t"]
    params = []
    if p["kernel"] == "cosine":
        t, params = temperature_from_list(p)
        kw["temperature"] = ref_kw["t"] = t
    elif p["kernel"] == "gaussian":
        sigma = torch.tensor(p["sigma"], dtype=D64, requires_grad=True) if p["learn_sigma"] else p["sigma"]
        params = [sigma] if p["learn_sigma"] else []
        kw["sigma"] = ref_kw["sigma"] = sigma
    got = icon(f, kernel=p["kernel"], tile_size=p["tile"], reduction=p["reduction"], **kw)
    want = naive_icon(f, p["kernel"], reduction=p["reduction"], **ref_kw)
    atol = 1e-12 / min(p["temps"])
    assert_rel_close(got, want, what="value", atol=atol)
    w = torch.randn(got.shape, dtype=D64, generator=g) if got.dim() else torch.tensor(1.0, dtype=D64)
    ins = [f] + params
    for a, e in zip(grads_of((got * w).sum(), ins), grads_of((want * w).sum(), ins)):
        assert_rel_close(a, e, what="grad", atol=atol)


def test_icon_rows_without_positive_and_duplicate_labels():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(7, 4, dtype=D64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3])       # labels 1 and 3 seen once: rows 3, 6 left out
    for kernel in ("cosine", "gaussian", "student_t"):
        got = icon(f, labels=labels, kernel=kernel, temperature=0.2, tile_size=3)
        want = naive_icon(f, kernel, t=0.2, labels=labels)
        assert_rel_close(got, want)
        assert_rel_close(grads_of(got, [f])[0], grads_of(want, [f])[0], atol=1e-13)
        per = icon(f, labels=labels, kernel=kernel, temperature=0.2, reduction="none")
        assert per[3] == 0 and per[6] == 0
    with pytest.raises(ValueError, match="no row has another sample"):
        icon(f, labels=torch.arange(7))


def test_icon_student_t_with_duplicate_points():
    f = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], dtype=D64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=D64, generator=torch.Generator().manual_seed(0))
    got = icon(f, teacher=teacher, teacher_temperature=0.5, kernel="student_t", tile_size=1)
    want = naive_icon(f, "student_t", teacher=teacher, teacher_t=0.5)
    assert_rel_close(got, want)
    assert_rel_close(grads_of(got, [f])[0], grads_of(want, [f])[0], atol=1e-13)


def test_icon_float32_larger_batch():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(700, 16, generator=g)
    teacher = torch.randn(700, 8, generator=g)
    for kw, ref in ((dict(neighbors=5), dict(neighbors=5)), (dict(teacher_temperature=0.1), dict(teacher_t=0.1))):
        got = icon(f, teacher=teacher, kernel="cosine", temperature=0.05, tile_size=128, **kw)
        want = naive_icon(f.double(), "cosine", t=0.05, teacher=teacher.double(), **ref)
        assert abs(float(got) - float(want)) < 1e-5 * abs(float(want))


def test_tiled_topk_matches_full_topk():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(37, 5, dtype=D64, generator=g)
    for tile in (1, 4, 100, None):
        vals, idx = tiled_topk(q, q, 6, self_offset=0, tile_size=tile)
        s = (q @ q.T).fill_diagonal_(float("-inf"))
        ref_v, ref_i = s.topk(6, dim=1)
        assert torch.equal(idx, ref_i)
        assert_rel_close(vals, ref_v)
    with pytest.raises(ValueError, match="n_neighbors"):
        tiled_topk(q, q, 37, self_offset=0)


def test_icon_module():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(12, 4, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    mod = ck.losses.ICon(kernel="cosine", temperature=0.3, learn_temperature=True)
    loss = mod(f, labels=y)
    loss.backward()
    assert mod.temperature.log_scale.grad is not None
    want = naive_icon(f.double(), "cosine", t=0.3, labels=y)
    assert abs(float(loss.detach()) - float(want)) < 1e-5 * float(want)
    knn = ck.losses.ICon(kernel="student_t", neighbors=3)
    teacher = torch.randn(12, 5, generator=g)
    assert abs(float(knn(f, teacher=teacher)) - float(naive_icon(f.double(), "student_t", teacher=teacher.double(),
                                                                  neighbors=3))) < 1e-4
    with pytest.raises(ValueError, match="neighbors= or teacher_temperature="):
        ck.losses.ICon()(f, teacher=teacher)


def test_icon_bad_input():
    f = torch.randn(6, 3)
    with pytest.raises(ValueError, match="exactly one supervision"):
        icon(f)
    with pytest.raises(ValueError, match="exactly one supervision"):
        icon(f, labels=torch.zeros(6, dtype=torch.long), teacher=f, neighbors=2)
    with pytest.raises(ValueError, match="teacher must have one row"):
        icon(f, teacher=torch.randn(5, 3), neighbors=2)
    with pytest.raises(ValueError, match="neighbors must be"):
        icon(f, teacher=torch.randn(6, 3), neighbors=6)
    with pytest.raises(ValueError, match="labels must have shape"):
        icon(f, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel"):
        icon(f, labels=torch.zeros(6, dtype=torch.long), kernel="laplace")
    with pytest.raises(ValueError, match="at least 2 rows"):
        icon(f[:1], labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        icon(f, teacher=torch.full((6, 3), float("nan")), teacher_temperature=0.1)
    with pytest.raises(ValueError, match="sigma"):
        icon(f, labels=torch.zeros(6, dtype=torch.long), kernel="gaussian", sigma=0.0)
