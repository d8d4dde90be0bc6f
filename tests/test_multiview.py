"""Multi-view InfoNCE (ck.functional.multiview_info_nce, ck.losses.MultiViewInfoNCE)
against materialised float64 formulas of both aggregations (the multi-positive
SupCon-style average and Koromilas et al.'s MV-InfoNCE, written as in their code),
values and gradients incl. the temperature; V=2 equals NT-Xent; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from conftest import assert_rel_close, grads_of
from contrastkit.functional import multiview_info_nce, nt_xent

D64 = torch.float64


def naive_multi_positive(feats, t, similarity="cosine"):
    return reference.multiview_info_nce(feats, temperature=t, similarity=similarity, reduction="none")


def naive_joint(feats, t, similarity="cosine"):
    """Koromilas et al.'s MVINFONCE (contrastkit.reference.multiview_info_nce, aggregation="joint")."""
    return reference.multiview_info_nce(feats, temperature=t, aggregation="joint", similarity=similarity,
                                        reduction="none")


@st.composite
def problems(draw):
    n = draw(st.integers(1, 8))
    v = draw(st.integers(2, 4))
    return dict(n=n, v=v, d=draw(st.integers(1, 6)), tile=draw(st.sampled_from([1, 5, None, 100, (3, 2)])),
                temp_kind=draw(st.sampled_from(["float", "scalar", "sample", "view"])),
                temps=draw(st.lists(st.floats(0.05, 2.0), min_size=n * v, max_size=n * v)),
                similarity=draw(st.sampled_from(["cosine", "dot"])),
                aggregation=draw(st.sampled_from(["multi_positive", "joint"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                seed=draw(st.integers(0, 2**31)))


@settings(max_examples=40, deadline=None)
@given(problems())
def test_multiview_matches_naive(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, v = p["n"], p["v"]
    feats = torch.randn(n, v, p["d"], dtype=D64, generator=g)
    if p["similarity"] == "dot":
        feats = feats * 0.4     # keep dot logits / 0.05 in a range exp() of the naive form handles
    feats.requires_grad_(True)
    kind = p["temp_kind"]
    if kind == "float":
        t = p["temps"][0]
        t_rows, params = t, []
    elif kind == "scalar":
        t = torch.tensor(p["temps"][0], dtype=D64, requires_grad=True)
        t_rows, params = t, [t]
    elif kind == "sample":
        t = torch.tensor(p["temps"][:n], dtype=D64, requires_grad=True)
        t_rows, params = t.repeat_interleave(v), [t]
    else:
        t = torch.tensor(p["temps"], dtype=D64).reshape(n, v).requires_grad_(True)
        t_rows, params = t.reshape(-1), [t]
    got = multiview_info_nce(feats, temperature=t, aggregation=p["aggregation"], similarity=p["similarity"],
                             tile_size=p["tile"], reduction=p["reduction"])
    ref = naive_multi_positive if p["aggregation"] == "multi_positive" else naive_joint
    per = ref(feats, t_rows, p["similarity"])
    want = {"mean": per.mean(), "sum": per.sum(), "none": per}[p["reduction"]]
    atol = 1e-12 / min(p["temps"])   # exact zeros (one sample, d = 1 cosine) are rounding noise scaled by 1/t
    assert_rel_close(got, want, what="value", atol=atol)
    w = torch.randn(got.shape, dtype=D64, generator=g) if got.dim() else torch.tensor(1.0, dtype=D64)
    for a, e in zip(grads_of((got * w).sum(), [feats] + params), grads_of((want * w).sum(), [feats] + params)):
        assert_rel_close(a, e, what="grad", atol=atol)


def test_two_views_is_nt_xent():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(10, 4, dtype=D64, generator=g)
    b = torch.randn(10, 4, dtype=D64, generator=g)
    got = multiview_info_nce(torch.stack([a, b], 1), temperature=0.3)
    assert_rel_close(got, nt_xent(a, b, temperature=0.3))


def test_low_temperature_and_single_sample():
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(6, 3, 5, dtype=D64, generator=g, requires_grad=True)
    for agg in ("multi_positive", "joint"):
        got = multiview_info_nce(feats, temperature=0.01, aggregation=agg, tile_size=4)
        ref = naive_multi_positive if agg == "multi_positive" else None
        if ref is not None:
            want = ref(feats, 0.01).mean()
            assert_rel_close(got, want)
            assert_rel_close(grads_of(got, [feats])[0], grads_of(want, [feats])[0], atol=1e-12)
        assert torch.isfinite(got)
    one = torch.randn(1, 3, 4, dtype=D64, generator=g)   # one sample: only its own views as candidates
    assert_rel_close(multiview_info_nce(one, temperature=0.5), naive_multi_positive(one, 0.5).mean())
    assert_rel_close(multiview_info_nce(one, temperature=0.5, aggregation="joint"), naive_joint(one, 0.5).mean())


def test_module():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 3, 4, generator=g)
    mod = ck.losses.MultiViewInfoNCE(temperature=0.2, learn_temperature=True)
    loss = mod(feats)
    loss.backward()
    assert mod.temperature.log_scale.grad is not None
    want = naive_multi_positive(feats.double(), 0.2).mean()
    assert abs(float(loss.detach()) - float(want)) < 1e-5 * float(want)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 views"):
        multiview_info_nce(torch.randn(5, 1, 3), temperature=0.1)
    with pytest.raises(ValueError, match=r"\(N, V, d\)"):
        multiview_info_nce(torch.randn(5, 3), temperature=0.1)
    with pytest.raises(ValueError, match="NaN"):
        multiview_info_nce(torch.full((2, 2, 2), float("nan")), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        multiview_info_nce(torch.randn(4, 2, 3), temperature=torch.ones(3))
    with pytest.raises(ValueError, match="aggregation"):
        multiview_info_nce(torch.randn(4, 2, 3), temperature=0.1, aggregation="sum")
