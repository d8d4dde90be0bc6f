"""SupCon (ck.functional.supcon, ck.losses.SupCon) against the materialised float64 formula
of Khosla et al. 2020 (L_out and L_in, with and without an additive margin and extra
labelled candidates): values and gradients of the features and the temperature, over
random shapes, views, tiles, labels with many / one / no positives; PML parity (golden
vector and live); statistics; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from objective_checks import assert_rel_close, draw_temperature, grads_of
from contrastkit.functional import supcon

D64 = torch.float64
DATA = __import__("pathlib").Path(__file__).parent / "data" / "peer_losses.npz"


def naive_supcon(features, labels, temperature, *, variant="out", margin=0.0, extra=None, extra_labels=None,
                 similarity="cosine", reduction="mean"):
    """The published formula on the materialised (rows x candidates) similarity matrix."""
    return reference.supcon(features, labels, extra, extra_labels, temperature=temperature, variant=variant,
                            margin=margin, similarity=similarity, reduction=reduction)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12), label="N samples")
    views = draw(st.sampled_from([None, 1, 2, 3]), label="views")
    d = draw(st.integers(1, 6), label="d")
    classes = draw(st.sampled_from([1, 2, 3, 20]), label="classes")
    rows = n * (views or 1)
    tile = draw(st.sampled_from([1, 3, "rows", "big", None]), label="tile")
    tile = {"rows": max(1, rows - 1), "big": rows + 50}.get(tile, tile)
    similarity = draw(st.sampled_from(["cosine", "dot"]), label="similarity")
    if similarity == "cosine" and d == 1:
        d = 2  # 1-d cosine: every similarity is +-1 and every gradient exactly 0 (pure rounding noise)
    return dict(
        n=n, views=views, d=d, classes=classes, tile=tile, similarity=similarity,
        n_extra=draw(st.sampled_from([0, 0, 5]), label="extra candidates"),
        variant=draw(st.sampled_from(["out", "in"]), label="variant"),
        margin=draw(st.sampled_from([0.0, 0.0, 0.3]), label="margin"),
        temp=draw(st.sampled_from([0.01, 0.07, 0.5, 2.0]), label="temperature"),
        temp_kind=draw(st.sampled_from(["float", "scalar", "rows"]), label="temperature kind"),
        reduction=draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
        seed=draw(st.integers(0, 2**31)),
    )


def _make(p):
    g = torch.Generator().manual_seed(p["seed"])
    n, v, d = p["n"], p["views"], p["d"]
    shape = (n, v, d) if v else (n, d)
    scale = 1.0 if p["similarity"] == "cosine" or p["temp"] >= 0.5 else 0.3
    feats = (scale * torch.randn(*shape, generator=g, dtype=D64)).requires_grad_()
    labels = torch.randint(0, p["classes"], (n,), generator=g)
    extra = extra_labels = None
    if p["n_extra"]:
        extra = (scale * torch.randn(p["n_extra"], d, generator=g, dtype=D64)).requires_grad_()
        extra_labels = torch.randint(0, p["classes"], (p["n_extra"],), generator=g)
    t = draw_temperature(p, g, n)
    return feats, labels, extra, extra_labels, t


@settings(max_examples=60, deadline=None)
@given(problems())
def test_supcon_matches_naive_formula(p):
    feats, labels, extra, extra_labels, t = _make(p)
    kw = dict(variant=p["variant"], margin=p["margin"], similarity=p["similarity"], reduction=p["reduction"])
    inputs = [feats] + ([extra] if extra is not None else []) + ([t] if isinstance(t, torch.Tensor) else [])
    ref = naive_supcon(feats, labels, t, extra=extra, extra_labels=extra_labels, **kw)
    # does any row have a positive?
    y = labels.repeat(p["views"] or 1)
    yk = y if extra is None else torch.cat([y, extra_labels])
    same = (y[:, None] == yk[None, :]).sum(1) - 1
    if not bool((same > 0).any()):
        with pytest.raises(ValueError, match="no anchor has a positive"):
            supcon(feats, labels, temperature=t, extra_candidates=extra, extra_labels=extra_labels,
                   tile_size=p["tile"], **kw)
        return
    out = supcon(feats, labels, temperature=t, extra_candidates=extra, extra_labels=extra_labels,
                 tile_size=p["tile"], **kw)
    # rounding of logits of size 1 / t: compare relative to that magnitude
    inv_t = 1.0 / float(t.detach().min()) if isinstance(t, torch.Tensor) else 1.0 / t
    assert_rel_close(out, ref, scale=inv_t, what="value")
    w = torch.randn(out.shape, dtype=D64, generator=torch.Generator().manual_seed(1)) if out.dim() else 1.0
    g_out = grads_of((out * w).sum(), inputs)
    g_ref = grads_of((ref * w).sum(), inputs)
    names = ["features"] + (["extra"] if extra is not None else []) + (["temperature"] if len(inputs) > 1 + (extra is not None) else [])
    for a, b, name in zip(g_out, g_ref, names):
        # d/dt carries one more factor 1/t than d/dz
        assert_rel_close(a, b, what=f"grad {name}", atol=1e-14 * inv_t * (inv_t if name == "temperature" else 1.0))


def test_l_in_and_l_out_differ_and_l_in_is_smaller():
    # Jensen: L_in <= L_out per row (log of a mean >= mean of logs)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(40, 2, 16, generator=g, dtype=D64), torch.randint(0, 5, (40,), generator=g)
    lo = supcon(z, y, temperature=0.1, reduction="none")
    li = supcon(z, y, temperature=0.1, variant="in", reduction="none")
    assert bool((li <= lo + 1e-12).all()) and float((lo - li).max()) > 1e-3


def test_stats_count_rows_without_positive():
    z = torch.randn(6, 8, dtype=D64)
    y = torch.tensor([0, 0, 1, 2, 3, 3])
    loss, stats = supcon(z, y, temperature=0.1, return_stats=True)
    assert stats.n_rows == 6 and stats.n_rows_without_positive == 2
    assert stats.mean_positives == 1.0
    assert_rel_close(loss, naive_supcon(z, y, 0.1))
    mod = ck.losses.SupCon(temperature=0.1)
    mod(z, y)
    assert mod.last_stats.n_rows_without_positive == 2
    rows = supcon(z, y, temperature=0.1, reduction="none")
    assert rows[2] == 0 and rows[3] == 0 and bool((rows[[0, 1, 4, 5]] > 0).all())


def test_no_positive_anywhere_is_an_error():
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon(torch.randn(5, 4), torch.arange(5), temperature=0.1)
    # one view per sample, (N, 1, d), unique labels: same
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon(torch.randn(5, 1, 4), torch.arange(5), temperature=0.1)
    # but two views of unique labels are each other's positive
    supcon(torch.randn(5, 2, 4), torch.arange(5), temperature=0.1)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, dtype=torch.long), r"labels must have shape \(5,\)"),
    (torch.zeros(5, dtype=torch.float32), "labels must be an integer tensor"),
    (torch.zeros(5, 2, dtype=torch.long), r"labels must have shape \(5,\)"),
    ([0, 1, 0, 1, 0], "labels must be an integer tensor"),
])
def test_bad_labels(bad, match):
    with pytest.raises(ValueError, match=match):
        supcon(torch.randn(5, 3, 8), bad, temperature=0.1)


def test_bad_arguments():
    z, y = torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="variant"):
        supcon(z, y, temperature=0.1, variant="mid")
    with pytest.raises(ValueError, match="margin"):
        supcon(z, y, temperature=0.1, margin=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, y, temperature=torch.ones(4))
    with pytest.raises(ValueError, match="given together"):
        supcon(z, y, temperature=0.1, extra_candidates=torch.randn(3, 8))
    with pytest.raises(ValueError, match="different embedding dimensions"):
        supcon(z, y, temperature=0.1, extra_candidates=torch.randn(3, 7), extra_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"extra_labels must have shape \(3,\)"):
        supcon(z, y, temperature=0.1, extra_candidates=torch.randn(3, 8), extra_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="features must have shape"):
        supcon(torch.randn(2, 3, 4, 5), y, temperature=0.1)
    with pytest.raises(ValueError, match="NaN"):
        supcon(torch.full((6, 8), float("nan")), y, temperature=0.1)


def test_per_sample_and_per_row_temperature_agree():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(7, 2, 5, generator=g, dtype=D64), torch.randint(0, 3, (7,), generator=g)
    t = 0.05 + torch.rand(7, generator=g, dtype=D64)
    a = supcon(z, y, temperature=t)
    b = supcon(z, y, temperature=t.repeat(2))
    assert_rel_close(a, b)


def test_learnable_temperature_module_gets_gradient():
    mod = ck.losses.SupCon(temperature=0.1, learn_temperature=True, variant="in", margin=0.1)
    z, y = torch.randn(16, 2, 8, requires_grad=True), torch.randint(0, 4, (16,))
    mod(z, y).backward()
    assert mod.temperature.log_scale.grad is not None and torch.isfinite(mod.temperature.log_scale.grad)
    assert torch.isfinite(z.grad).all()


def test_float32_close_to_float64():
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(64, 2, 32, generator=g, dtype=D64), torch.randint(0, 8, (64,), generator=g)
    for variant in ("out", "in"):
        a = supcon(z.float(), y, temperature=0.05, variant=variant, tile_size=17)
        b = naive_supcon(z, y, 0.05, variant=variant)
        assert abs(float(a) - float(b)) < 1e-5 * abs(float(b))


def test_pml_golden_vector():
    d = np.load(DATA)
    z = torch.tensor(d["pml_supcon.in_z"], requires_grad=True)
    labels = torch.tensor(d["pml_supcon.in_labels"])
    loss = supcon(z, labels, temperature=0.1, tile_size=13)
    loss.backward()
    assert abs(float(loss) - float(d["pml_supcon.loss"])) < 1e-12
    assert_rel_close(z.grad, torch.tensor(d["pml_supcon.grad_z"]), rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pml_live(seed):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(seed)
    n = [24, 40, 57][seed]
    z = torch.randn(n, 16, generator=g, dtype=D64)
    y = torch.randint(0, [3, 10, 60][seed], (n,), generator=g)  # seed 2: many rows without positive
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ref = losses.SupConLoss(temperature=0.07)(z1, y)
    ours = supcon(z2, y, temperature=0.07, tile_size=9)
    ref.backward()
    ours.backward()
    assert abs(float(ours) - float(ref)) <= 1e-5 * abs(float(ref))
    assert_rel_close(z2.grad, z1.grad, rtol=1e-5)


def test_pml_ntxent_is_supcon_of_two_views():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(20, 8, generator=g, dtype=D64), torch.randn(20, 8, generator=g, dtype=D64)
    ref = losses.NTXentLoss(temperature=0.5)(torch.cat([a, b]), torch.cat([torch.arange(20), torch.arange(20)]))
    ours = supcon(torch.stack([a, b], 1), torch.arange(20), temperature=0.5)
    assert abs(float(ours) - float(ref)) <= 1e-9 * abs(float(ref))


def test_memory_queue_as_labelled_candidates():
    g = torch.Generator().manual_seed(11)
    queue = ck.negatives.MemoryQueue(16, 8, with_labels=True)
    old = torch.randn(10, 8, generator=g, dtype=D64)
    old_y = torch.randint(0, 4, (10,), generator=g)
    queue.enqueue(old, labels=old_y)
    z = torch.randn(6, 2, 8, generator=g, dtype=D64, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=g)
    out = supcon(z, y, temperature=0.1, extra_candidates=queue.candidates(), extra_labels=queue.labels())
    ref = naive_supcon(z, y, 0.1, extra=old, extra_labels=old_y)
    assert_rel_close(out, ref)
    out.backward()
    assert queue.candidates().grad is None
