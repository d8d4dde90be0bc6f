"""SigLIP (ck.functional.siglip, ck.losses.SigLIP) and the tiled element-wise engine
against the materialised float64 formula sum_ij -log sigmoid(z_ij (s x.y + b)) / N:
values and gradients of x, y, the temperature (scalar or per anchor) and the bias,
over random sizes, tiles and positives; open_clip parity; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from conftest import assert_rel_close, grads_of
from contrastkit.engine import DiagonalMask, DifferentLabelMask, IndexMask, LabelMask
from objective_checks import DenseMask, draw_masks, temperature_from_list
from contrastkit.engine.tiled_pairwise import KernelStats, LabelWeights, tiled_pairwise
from contrastkit.functional import siglip

D64 = torch.float64
DATA = Path(__file__).parent / "data"


def naive_siglip(x, y, temperature, bias, positives=None, similarity="cosine", reduction="mean", drop=None):
    return reference.siglip(x, y, positives, temperature=temperature, bias=bias, similarity=similarity,
                            drop=drop, reduction=reduction)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 14))
    m = draw(st.integers(n, n + 8)) if draw(st.booleans()) else draw(st.integers(1, 14))
    d = draw(st.integers(1, 8))
    tile = draw(st.sampled_from([1, 3, None, max(n, m) + 5, (2, 5)]))
    positives = None
    if m < n or draw(st.booleans()):
        positives = torch.tensor(draw(st.lists(st.integers(-1, m - 1), min_size=n, max_size=n)))
    return dict(n=n, m=m, d=d, tile=tile, positives=positives,
                temp_kind=draw(st.sampled_from(["float", "scalar", "rows"])),
                temps=draw(st.lists(st.floats(0.01, 3.0), min_size=n, max_size=n)),
                bias=draw(st.floats(-12.0, 3.0)),
                similarity=draw(st.sampled_from(["cosine", "dot"])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                seed=draw(st.integers(0, 2**31)))


def _inputs(p):
    """(generator, anchors, candidates, bias, temperature, [temperature if a tensor])."""
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["n"], p["d"], dtype=D64, generator=g, requires_grad=True)
    y = torch.randn(p["m"], p["d"], dtype=D64, generator=g, requires_grad=True)
    b = torch.tensor(p["bias"], dtype=D64, requires_grad=True)
    t, params = temperature_from_list(p)
    return g, x, y, b, t, params


def _assert_matches(got, want, g, inputs, p):
    """Values, and the gradients in (anchors, candidates, bias[, temperature]) of a random
    weighting of the rows."""
    assert_rel_close(got, want, what="value")
    w = torch.randn(got.shape, dtype=D64, generator=g) if got.dim() else torch.tensor(1.0, dtype=D64)
    atol = 1e-12 / min(p["temps"])   # entries exactly 0 (d = 1 cosine) are rounding noise scaled by 1/t
    for a, e, name in zip(grads_of((got * w).sum(), inputs), grads_of((want * w).sum(), inputs), "xybt"):
        assert_rel_close(a, e, what=f"grad {name}", atol=atol)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_siglip_matches_naive_values_and_gradients(p):
    g, x, y, b, t, params = _inputs(p)
    kw = dict(positives=p["positives"], similarity=p["similarity"], reduction=p["reduction"])
    got = siglip(x, y, temperature=t, bias=b, tile_size=p["tile"], **kw)
    want = naive_siglip(x, y, t, b, **kw)
    _assert_matches(got, want, g, [x, y, b] + params, p)


def test_openclip_siglip_parity():
    z = np.load(DATA / "peer_losses.npz")
    c = "openclip_siglip"
    x = torch.tensor(z[f"{c}.in_x"], requires_grad=True)
    y = torch.tensor(z[f"{c}.in_y"], requires_grad=True)
    scale = torch.tensor(z[f"{c}.in_logit_scale"], requires_grad=True)
    bias = torch.tensor(z[f"{c}.in_logit_bias"], requires_grad=True)
    for tile in (None, 1, 7, 100):
        loss = siglip(x, y, temperature=1.0 / scale, bias=bias, similarity="dot", tile_size=tile)
        grads = grads_of(loss, [x, y, scale, bias])
        assert_rel_close(loss, torch.tensor(z[f"{c}.loss"]), rtol=1e-12, what="loss")
        for gr, name in zip(grads, ["x", "y", "logit_scale", "logit_bias"]):
            assert_rel_close(gr, torch.tensor(z[f"{c}.grad_{name}"]), rtol=1e-10, what=name)


def test_siglip_module_learnable_init_and_grads():
    torch.manual_seed(0)
    mod = ck.losses.SigLIP()
    assert abs(float(mod.temperature().detach()) - 0.1) < 1e-6
    assert float(mod.bias.detach()) == -10.0
    assert abs(float(mod.temperature.log_scale.detach()) - np.log(10.0)) < 1e-6
    x, y = torch.randn(9, 5), torch.randn(9, 5)
    loss = mod(x, y)
    loss.backward()
    assert mod.bias.grad is not None and mod.temperature.log_scale.grad is not None
    want = naive_siglip(x.double(), y.double(), 0.1, -10.0)
    assert abs(float(loss.detach()) - float(want)) < 1e-5 * float(want)
    fixed = ck.losses.SigLIP(temperature=0.5, bias=0.0, learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())


def test_siglip_float32_large_tile_agrees_with_float64():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    got = siglip(x, y, temperature=0.05, bias=-5.0, tile_size=64)
    want = naive_siglip(x.double(), y.double(), 0.05, -5.0)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))


def test_siglip_one_row_and_rank_offset():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, dtype=D64, generator=g)
    y = torch.randn(6, 4, dtype=D64, generator=g)
    assert_rel_close(siglip(x, y, temperature=0.3, bias=-1.0), naive_siglip(x, y, 0.3, -1.0))
    # a rank holding global rows 2..4 of the anchors and all 6 candidates
    xr = torch.randn(3, 4, dtype=D64, generator=g)
    pos = torch.arange(3) + 2
    assert_rel_close(siglip(xr, y, temperature=0.3, bias=-1.0, positives=pos),
                     naive_siglip(xr, y, 0.3, -1.0, positives=pos))


def test_siglip_bad_input():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="dimension"):
        siglip(x, torch.randn(4, 5), temperature=0.1)
    with pytest.raises(ValueError, match="NaN"):
        siglip(x.masked_fill(torch.eye(4, 3, dtype=torch.bool), float("nan")), y, temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        siglip(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="bias"):
        siglip(x, y, temperature=0.1, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="bias"):
        siglip(x, y, temperature=0.1, bias=float("nan"))
    with pytest.raises(ValueError, match="positives"):
        siglip(x, y, temperature=0.1, positives=torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="candidates"):
        siglip(x, y[:2], temperature=0.1)
    with pytest.raises(ValueError, match="reduction"):
        siglip(x, y, temperature=0.1, reduction="max")


# ---------------------------------------------------------------- masks=


@settings(max_examples=50, deadline=None)
@given(p=problems(), data=st.data())
def test_siglip_with_masks_matches_naive(p, data):
    g, x, y, b, t, params = _inputs(p)
    masks, drop, covered = draw_masks(data, p["n"], p["m"], p["positives"])
    kw = dict(positives=p["positives"], similarity=p["similarity"], reduction=p["reduction"])
    if bool(covered.any()):
        with pytest.raises(ValueError, match=f"cover the positive pair of anchor row {int(covered.nonzero()[0])}"):
            siglip(x, y, temperature=t, bias=b, tile_size=p["tile"], masks=masks, **kw)
        return
    got = siglip(x, y, temperature=t, bias=b, tile_size=p["tile"], masks=masks, **kw)
    want = naive_siglip(x, y, t, b, drop=drop, **kw)
    _assert_matches(got, want, g, [x, y, b] + params, p)


def test_siglip_masks_module_work_and_mean_divisor():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, dtype=D64, generator=g, requires_grad=True)
    y = torch.randn(8, 4, dtype=D64, generator=g, requires_grad=True)
    cols = torch.tensor([[1, 6], [0, -1], [-1, -1], [7, 2], [-1, -1]])
    drop = torch.zeros(5, 8, dtype=torch.bool)
    for i, row in enumerate(cols.tolist()):
        for col in row:
            if col >= 0:
                drop[i, col] = True
    mod = ck.losses.SigLIP(temperature=0.2, bias=-2.0).double()
    assert mod.work.dropped == ("masks",)
    got = mod(x, y, masks=[IndexMask(cols)])
    want = naive_siglip(x, y, 0.2, -2.0, drop=drop)
    assert_rel_close(got, want, rtol=1e-12)
    # "mean" stays the sum over the kept pairs / N
    rows = siglip(x, y, temperature=0.2, bias=-2.0, masks=[IndexMask(cols)], reduction="none")
    assert_rel_close(got, rows.sum() / 5, rtol=1e-14)
    assert abs(float(mod(x, y).detach()) - float(got.detach())) > 1e-6
    got.backward()
    assert mod.bias.grad is not None and mod.temperature.log_scale.grad is not None
    b = torch.tensor(-2.0, dtype=D64, requires_grad=True)
    t = torch.tensor(0.2, dtype=D64, requires_grad=True)
    gb, gt = torch.autograd.grad(naive_siglip(x, y, t, b, drop=drop), [b, t])
    assert_rel_close(mod.bias.grad, gb, rtol=1e-10)
    assert_rel_close(mod.temperature.log_scale.grad, -0.2 * gt, rtol=1e-9)
    assert torch.equal(siglip(x, y, temperature=0.2, masks=()), siglip(x, y, temperature=0.2))
    with pytest.raises(ValueError, match="local pair path"):
        mod.pair_rows(x, y, masks=[IndexMask(cols)])


def test_siglip_masks_on_a_positive_pair_raise(monkeypatch):
    from contrastkit.engine import masks as masks_module

    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(7, 3, dtype=D64, generator=g), torch.randn(9, 3, dtype=D64, generator=g)
    pos = torch.tensor([2, 0, -1, 8, 4, 4, 1])
    labels_r, labels_c = torch.arange(7) + 10, torch.arange(9) + 20
    cases = [
        (DiagonalMask(-1), 1),                                    # (1, 0) is row 1's positive
        (IndexMask(torch.tensor([[-1], [-1], [-1], [-1], [-1], [4], [-1]])), 5),
        (LabelMask(labels_r, labels_c.index_put((torch.tensor([8]),), torch.tensor(13))), 3),
        (DifferentLabelMask(labels_r, labels_c), 0),
    ]
    dense = torch.zeros(7, 9, dtype=torch.bool)
    dense[6, 1] = True
    cases.append((DenseMask(dense), 6))
    # small probe blocks: row 6 sits in the last block of the generic probe
    monkeypatch.setattr(masks_module, "_PROBE_ROWS", 2)
    monkeypatch.setattr(masks_module, "_PROBE_COLS", 3)
    for mask, row in cases:
        with pytest.raises(ValueError, match=f"anchor row {row} \\(column {int(pos[row])}\\)"):
            siglip(x, y, pos, temperature=0.3, masks=[mask])
    # a row without positive has no positive pair to cover; a generic mask beside the positives is fine
    ok = torch.zeros(7, 9, dtype=torch.bool)
    ok[2] = True
    ok[6, 0] = ok[6, 2] = ok[0, 3] = True
    got = siglip(x, y, pos, temperature=0.3, masks=[DenseMask(ok), DiagonalMask(-2)], tile_size=(2, 4))
    drop = ok.clone()
    for i in range(2, 7):
        drop[i, i - 2] = True
    assert_rel_close(got, naive_siglip(x, y, 0.3, -10.0, positives=pos, drop=drop), rtol=1e-12)
    with pytest.raises(ValueError, match="TileMask"):
        siglip(x, y, pos, temperature=0.3, masks=[torch.zeros(7, 9, dtype=torch.bool)])


# ---------------------------------------------------------------- the engine itself


# (the softplus tile op left tiled_pairwise: SigLIP's engine is tiled_softplus, tested in test_engine_walker.py)


def test_tiled_pairwise_weighted_student_t_lse_columns():
    g = torch.Generator().manual_seed(7)
    n, m, d = 7, 9, 3
    a = torch.randn(n, d, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(m, d, dtype=D64, generator=g, requires_grad=True)
    lr, lc = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    scale = torch.rand(n, dtype=D64, generator=g)
    op = KernelStats("student_t", weights=LabelWeights(lr, lc, scale), lse=True)
    ra, cb = -0.5 * a.pow(2).sum(1), -0.5 * b.pow(2).sum(1)
    rows, cols = tiled_pairwise(a, b, op, row_bias=ra, col_bias=cb, columns=True, tile_size=(3, 4))
    x = -torch.log1p(torch.cdist(a, b).pow(2))
    w = (lr[:, None] == lc[None, :]).to(D64) * scale[:, None]
    want = [(w * x).sum(1), torch.logsumexp(x, 1), (w * x).sum(0), torch.logsumexp(x, 0)]
    got = [rows[0], rows[1], cols[0], cols[1]]
    total_g = sum((t * (i + 1)).sum() for i, t in enumerate(got))
    total_w = sum((t * (i + 1)).sum() for i, t in enumerate(want))
    for ga, wa in zip(got, want):
        assert_rel_close(ga, wa)
    for ga, wa in zip(grads_of(total_g, [a, b]), grads_of(total_w, [a, b])):
        assert_rel_close(ga, wa, atol=1e-13)


def test_tiled_pairwise_bad_input():
    with pytest.raises(ValueError, match="q \\(N, d\\)"):
        tiled_pairwise(torch.randn(3, 2), torch.randn(3, 4), KernelStats(lse=True))
    with pytest.raises(ValueError, match="row_bias"):
        tiled_pairwise(torch.randn(3, 2), torch.randn(3, 2), KernelStats(lse=True), row_bias=torch.zeros(2))
    with pytest.raises(ValueError, match="TileOp"):
        tiled_pairwise(torch.randn(3, 2), torch.randn(3, 2), "softplus")


@pytest.mark.parametrize("magnitude", [0.5, 30.0])  # direct log1p(exp) path and the stable path
@pytest.mark.parametrize("per_row", [False, True])
def test_tiled_softplus_rows_matches_naive(magnitude, per_row):
    from contrastkit.engine.tiled_softplus import tiled_softplus_rows

    g = torch.Generator().manual_seed(3)
    n, m, d = 9, 13, 5
    q = (torch.randn(n, d, dtype=torch.float64, generator=g) * magnitude).requires_grad_()
    k = torch.randn(m, d, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    s = (torch.rand(n if per_row else (), dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    w = torch.randn(n, dtype=torch.float64, generator=g)
    for tile in (1, 4, (3, 5), None):
        got = tiled_softplus_rows(q, k, row_bias=b, scale=s, tile_size=tile)
        u = (q * (s[:, None] if per_row else s)) @ k.T + b[:, None]
        want = torch.nn.functional.softplus(u, threshold=1000.0).sum(1)
        ga = torch.autograd.grad((got * w).sum(), [q, k, b, s])
        gb = torch.autograd.grad((want * w).sum(), [q, k, b, s])
        assert_rel_close(got, want, what="rows")
        for a_, b_, name in zip(ga, gb, "qkbs"):
            assert_rel_close(a_, b_, what=f"grad {name}")
