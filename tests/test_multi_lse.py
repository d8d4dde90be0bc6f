"""engine.tiled_multi_logsumexp (several scaled / masked log-sum-exps in one tile walk) and
DifferentLabelMask, against the materialised float64 formula: values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from contrastkit.engine import (
    DiagonalMask,
    DifferentLabelMask,
    IndexMask,
    LabelMask,
    LSEStat,
    tiled_logsumexp,
    tiled_multi_logsumexp,
)
from objective_checks import assert_rel_close, grads_of

D64 = torch.float64
NEG = float("-inf")


def _drop_matrix(mask, n, m):
    x = torch.zeros(n, m, dtype=D64)
    mask.apply_(x, 0, n, 0, m)
    return torch.isinf(x)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 14), m=st.integers(1, 14), d=st.integers(1, 5),
       tile=st.sampled_from([1, 2, 5, 100, None]), seed=st.integers(0, 2**31),
       scales=st.lists(st.sampled_from([0.25, 1.0, 1.5, 3.0]), min_size=1, max_size=3),
       extra=st.lists(st.sampled_from(["none", "label", "difflabel", "diag1"]), min_size=3, max_size=3),
       base=st.sampled_from(["none", "diag", "index"]))
def test_matches_naive(n, m, d, tile, seed, scales, extra, base):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    k = torch.randn(m, d, generator=g, dtype=D64, requires_grad=True)
    yr, yc = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    make = {"none": lambda: (), "label": lambda: (LabelMask(yr, yc),),
            "difflabel": lambda: (DifferentLabelMask(yr, yc),), "diag1": lambda: (DiagonalMask(1),)}
    stats = [LSEStat(s, make[e]()) for s, e in zip(scales, extra)]
    base_masks = {"none": [], "diag": [DiagonalMask(0)],
                  "index": [IndexMask(torch.randint(-1, m, (n, 2), generator=g))]}[base]
    out = tiled_multi_logsumexp(q, k, stats, masks=base_masks, tile_size=tile)
    x = q @ k.T
    base_drop = torch.zeros(n, m, dtype=torch.bool)
    for mk in base_masks:
        base_drop |= _drop_matrix(mk, n, m)
    refs = []
    for st_ in stats:
        drop = base_drop.clone()
        for mk in st_.masks:
            drop |= _drop_matrix(mk, n, m)
        refs.append(torch.logsumexp((st_.scale * x).masked_fill(drop, NEG), 1))
    ref = torch.stack(refs)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin)
    assert_rel_close(torch.where(fin, out, 0), torch.where(fin, ref, 0), scale=1.0)
    w = torch.randn(ref.shape, generator=g, dtype=D64)
    go = grads_of((torch.where(fin, out, 0) * w).sum(), [q, k])
    gr = grads_of((torch.where(fin, ref, 0) * w).sum(), [q, k])
    for a, b in zip(go, gr):
        assert_rel_close(a, b, scale=1.0)
    # count=True: the same statistics and gradients, plus each row's entries kept by the shared masks
    out2, kept = tiled_multi_logsumexp(q, k, stats, masks=base_masks, tile_size=tile, count=True)
    assert kept.dtype == torch.int64 and not kept.requires_grad
    assert torch.equal(kept, (~base_drop).sum(1))
    assert torch.equal(torch.isfinite(out2), fin) and torch.equal(torch.where(fin, out2, 0), torch.where(fin, out, 0))
    for a, b in zip(grads_of((torch.where(fin, out2, 0) * w).sum(), [q, k]), gr):
        assert_rel_close(a, b, scale=1.0)


@pytest.mark.parametrize("scale", [0.5, 60.0])   # the direct regime and the stabilised one
def test_count_of_kept_entries(scale):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(37, 8, generator=g), torch.randn(53, 8, generator=g)
    drop = torch.randint(-1, 53, (37, 5), generator=g)
    (lse,), kept = tiled_multi_logsumexp(q, k, [LSEStat()], masks=[IndexMask(drop), DiagonalMask(0)], count=True,
                                         tile_size=(8, 16), scale=scale)
    dense = torch.zeros(37, 53, dtype=torch.bool)
    for i in range(37):
        dense[i, [j for j in drop[i].tolist() if j >= 0]] = True
        dense[i, i] = True
    assert torch.equal(kept, (~dense).sum(1))
    ref = torch.logsumexp((scale * q.double() @ k.double().T).masked_fill(dense, NEG), 1)
    assert_rel_close(lse.double(), ref, rtol=1e-4)
    # a row with every entry dropped: count 0, -inf
    (lse,), kept = tiled_multi_logsumexp(q[:2], k[:3], [LSEStat()], masks=[IndexMask(torch.tensor([[0, 1, 2], [0, -1, -1]]))],
                                         count=True)
    assert kept.tolist() == [0, 2] and lse[0] == NEG and torch.isfinite(lse[1])


def test_single_stat_equals_tiled_logsumexp_float32():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(300, 16, generator=g), torch.randn(257, 16, generator=g)
    a = tiled_multi_logsumexp(q, k, [LSEStat(1.0)], masks=[DiagonalMask()], tile_size=64)[0]
    b, _ = tiled_logsumexp(q, k, masks=[DiagonalMask()], tile_size=64)
    assert a.dtype == torch.float32
    assert_rel_close(a, b, rtol=1e-5)


def test_label_masks_partition_the_row():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 4, generator=g, dtype=D64)
    y = torch.randint(0, 4, (20,), generator=g)
    neg, pos = tiled_multi_logsumexp(z, z, [LSEStat(1.0, (LabelMask(y, y),)),
                                            LSEStat(1.0, (DifferentLabelMask(y, y), DiagonalMask(0)))], tile_size=3)
    full, _ = tiled_logsumexp(z, z, masks=[DiagonalMask(0)])
    assert_rel_close(torch.logaddexp(neg, pos), full)


def test_bad_input():
    q = torch.randn(3, 2)
    with pytest.raises(ValueError, match="positive finite"):
        tiled_multi_logsumexp(q, q, [LSEStat(0.0)])
    with pytest.raises(ValueError, match="positive finite"):
        tiled_multi_logsumexp(q, q, [LSEStat(-1.0)])
    with pytest.raises(ValueError, match="at least one"):
        tiled_multi_logsumexp(q, q, [])
    with pytest.raises(ValueError, match=r"q \(N, d\) and k \(M, d\)"):
        tiled_multi_logsumexp(q, torch.randn(3, 4), [LSEStat()])
    with pytest.raises(ValueError, match=r"row_labels must have shape \(3,\)"):
        tiled_multi_logsumexp(q, q, [LSEStat(1.0, (DifferentLabelMask(torch.zeros(2, dtype=torch.long),
                                                                       torch.zeros(3, dtype=torch.long)),))])
