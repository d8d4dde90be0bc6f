"""The column layout every (query, positive, hard negatives) path reads
(contrastkit.objectives.columns): which objectives take which layout, and ColumnObjective
against the naive float64 formula of each objective on the concatenated columns, values and
gradients, with false-negative masks, random shapes and tile sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import contrastkit as ck
from contrastkit import reference
from contrastkit.engine import DiagonalMask, IndexMask, LabelMask
from contrastkit.objectives.columns import ColumnObjective, call_with_columns, column_layout, takes_column_masks
from objective_checks import assert_rel_close, grads_of

D64 = torch.float64

LAYOUTS = {
    "MultipleNegativesRanking": "hard_negatives",
    "InfoNCE": "positives", "DCL": "positives", "DCLW": "positives", "DebiasedContrastive": "positives",
    "HardNegativeContrastive": "positives", "SigLIP": "positives",
    "NTXent": "pairs", "Alignment": "pairs", "AlignUniform": "pairs", "CWCL": "pairs",
    "SupCon": None, "MultiViewInfoNCE": None, "ICon": None, "Uniformity": None,
}


@pytest.mark.parametrize("name, layout", sorted(LAYOUTS.items()))
def test_every_loss_has_its_column_layout(name, layout):
    cls = getattr(ck.losses, name)
    if layout is None:
        with pytest.raises(ValueError, match="not an \\(anchor, positive, negatives\\) column objective"):
            column_layout(cls)
        with pytest.raises(ValueError, match="column objective"):
            ColumnObjective(cls())
        return
    assert column_layout(cls) == layout
    assert takes_column_masks(cls) == (layout != "pairs")


def test_every_loss_is_listed():
    names = {n for n in ck.losses.__all__ if isinstance(getattr(ck.losses, n), type)
             and issubclass(getattr(ck.losses, n), torch.nn.Module) and n not in ("Objective", "Temperature")}
    assert names == set(LAYOUTS), "a new loss needs its expected layout here"


def _modules(name):
    """(our module, the naive formula on (anchors, columns, positives, drop))."""
    if name == "InfoNCE":
        return (ck.losses.InfoNCE(temperature=0.07),
                lambda a, c, p, drop: reference.info_nce(a, c, p, temperature=0.07, drop=drop))
    if name == "DCL":
        return (ck.losses.DCL(temperature=0.07),
                lambda a, c, p, drop: reference.dcl(a, c, p, temperature=0.07, drop=drop))
    if name == "DCLW":
        return (ck.losses.DCLW(temperature=0.07),
                lambda a, c, p, drop: reference.dcl(a, c, p, temperature=0.07, weighted=True, drop=drop))
    if name == "HardNegativeContrastive":
        return (ck.losses.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.05),
                lambda a, c, p, drop: reference.debiased_contrastive(a, c, p, temperature=0.5, beta=1.0,
                                                                     tau_plus=0.05, drop=drop))
    if name == "SigLIP":
        return (ck.losses.SigLIP(temperature=0.1, bias=-5.0, learn_temperature=False),
                lambda a, c, p, drop: reference.siglip(a, c, p, temperature=0.1, bias=-5.0, drop=drop))
    raise KeyError(name)


def _dense(masks, n, m):
    x = torch.zeros(n, m, dtype=D64)
    for mask in masks:
        mask.apply_(x, 0, n, 0, m)
    return torch.isinf(x)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["InfoNCE", "DCL", "DCLW", "HardNegativeContrastive", "SigLIP"]),
       n=st.integers(2, 7), h=st.integers(0, 2), d=st.integers(2, 5), tile=st.sampled_from([1, 3, None]),
       masked=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_column_objective_equals_the_naive_formula_on_the_concatenated_columns(name, n, h, d, tile, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=D64).requires_grad_()
    docs = torch.randn(n, d, generator=g, dtype=D64).requires_grad_()
    negs = [torch.randn(n, d, generator=g, dtype=D64).requires_grad_() for _ in range(h)]
    m = n * (1 + h)
    masks = []
    if masked:  # another row's positive (a duplicate) and a label clash, never the own positive
        masks.append(DiagonalMask(1))
        labels = torch.randint(0, 3, (n,), generator=g)
        col_labels = torch.randint(3, 6, (m,), generator=g)
        col_labels[: n] = labels + 10  # no clash on the positive block
        masks.append(LabelMask(labels, col_labels))
        masks.append(IndexMask(torch.full((n, 1), -1, dtype=torch.long)))
    drop = _dense(masks, n, m)
    positives = torch.arange(n)
    # a row with no negative left is covered by each objective's own tests
    assume(not bool((drop | torch.eye(n, m, dtype=torch.bool)).all(1).any()))
    module, naive = _modules(name)
    module.tile_size = tile
    ours = ColumnObjective(module.double())(q, docs, *negs, masks=masks)
    want = naive(q, torch.cat([docs, *negs]), positives, drop if masked else None)
    inputs = [q, docs, *negs]
    assert_rel_close(ours, want, rtol=1e-9, what=f"{name} value")
    for a, b, w in zip(grads_of(ours, inputs), grads_of(want, inputs), ["q", "docs"] + ["neg"] * h):
        assert_rel_close(a, b, rtol=1e-8, atol=1e-12, what=f"{name} d/d{w}")


@pytest.mark.parametrize("name", ["DCL", "DCLW", "HardNegativeContrastive"])
def test_a_row_the_masks_leave_without_negatives_leaves_the_loss_in_training(name):
    """In a training step (ColumnObjective, call_with_columns) a loss whose denominator needs a
    negative skips a row the masks (e.g. the GISTEmbed guide) emptied, with a warning, and
    equals the naive formula without that row; the bare objective still raises."""
    g = torch.Generator().manual_seed(3)
    q, docs, neg = (torch.randn(4, 5, generator=g, dtype=D64).requires_grad_() for _ in range(3))
    # row 2 loses every column but its positive (column 2 of [docs; neg])
    masks = [IndexMask(torch.tensor([[-1] * 7, [-1] * 7, [0, 1, 3, 4, 5, 6, 7], [-1] * 7]))]
    drop = _dense(masks, 4, 8)
    module, naive = _modules(name)
    module = module.double()
    for call in (lambda: ColumnObjective(module)(q, docs, neg, masks=masks),
                 lambda: call_with_columns(module, q, docs, [neg], masks=masks)):
        with pytest.warns(RuntimeWarning, match="1 of 4 anchor row"):
            got = call()
        want = naive(q, torch.cat([docs, neg]), torch.tensor([0, 1, -1, 3]), drop)
        assert_rel_close(got, want, rtol=1e-10)
        for x, y in zip(grads_of(got, [q, docs, neg]), grads_of(want, [q, docs, neg])):
            assert_rel_close(x, y, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="anchor row 2 has no negative left"):
        module(q, torch.cat([docs, neg]), torch.arange(4), masks=masks)
    # a training step counts such rows instead of warning; other warnings pass on
    import warnings

    from contrastkit.objectives.common import EmptyRowsWarning, count_empty_rows

    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with count_empty_rows() as count:
            ColumnObjective(module)(q, docs, neg, masks=masks)
            ColumnObjective(module)(q, docs, neg, masks=masks)
            warnings.warn("something else", UserWarning)
    assert (count.skipped, count.calls) == (2, 2)
    assert [w.category for w in outside] == [UserWarning]
    assert not any(issubclass(w.category, EmptyRowsWarning) for w in outside)


def test_infonce_through_the_columns_is_mnrl():
    g = torch.Generator().manual_seed(0)
    q, d, n1, n2 = (torch.randn(6, 4, generator=g, dtype=D64) for _ in range(4))
    masks = [DiagonalMask(6)]
    a = ColumnObjective(ck.losses.InfoNCE(temperature=0.05))(q, d, n1, n2, masks=masks)
    b = ck.losses.MultipleNegativesRanking(temperature=0.05)(q, d, n1, n2, masks=masks)
    assert_rel_close(a, b, rtol=1e-12)


def test_what_a_layout_cannot_take_is_an_error_not_dropped():
    q, d, n1 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="takes no hard negatives"):
        call_with_columns(ck.losses.NTXent(), q, d, [n1])
    with pytest.raises(ValueError, match="takes no false-negative masks"):
        call_with_columns(ck.losses.NTXent(), q, d, masks=[DiagonalMask(1)])
    assert torch.isfinite(call_with_columns(ck.losses.NTXent(), q, d))
