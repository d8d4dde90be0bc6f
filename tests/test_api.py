"""The frozen public API (issue 7, section 4): one base for every module, one meaning per
argument name, keyword-only settings, float64 end to end, citations, masks= on the
index-target objectives; and the section-0 regressions that live in the objectives."""

from __future__ import annotations

import inspect

import pytest
import torch

import contrastkit as ck
from contrastkit import reference
from contrastkit.engine import IndexMask, LabelMask
from contrastkit.objectives.base import Objective, Work
from conftest import assert_rel_close

D64 = torch.float64
OBJECTIVES = sorted(
    (c for c in (getattr(ck.losses, n) for n in ck.losses.__all__)
     if isinstance(c, type) and issubclass(c, Objective) and c is not Objective),
    key=lambda c: c.__name__,
)


def test_every_module_shares_the_base():
    assert len(OBJECTIVES) >= 15
    for cls in OBJECTIVES:
        obj = cls()
        assert isinstance(obj.work, Work), cls
        assert obj.reduction == "mean", cls
        assert obj.citation.startswith("@") and "year" in obj.citation and "arXiv" in obj.citation, cls
        # settings are keyword-only: a positional number is a TypeError, not a silent misreading
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        assert all(p.kind == p.KEYWORD_ONLY for p in params), (cls, params)
        assert "learnable" not in params or cls is ck.losses.SigLIP


def test_functionals_take_settings_keyword_only():
    for name in ck.functional.__all__:
        fn = getattr(ck.functional, name)
        params = inspect.signature(fn).parameters.values()
        for p in params:
            if p.name in ("temperature", "similarity", "reduction", "tile_size", "symmetric", "two_view", "margin"):
                assert p.kind == p.KEYWORD_ONLY, (name, p.name)
        t = inspect.signature(fn).parameters.get("temperature")
        if t is not None and name != "multiple_negatives_ranking":
            assert t.default is not inspect.Parameter.empty, f"{name}: temperature has a default everywhere"


def test_float64_module_equals_functional():
    """Section 0: the temperature was a float32 parameter (2e-8 relative off in float64)."""
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(12, 6, generator=g, dtype=D64), torch.randn(12, 6, generator=g, dtype=D64)
    y = torch.randint(0, 3, (12,), generator=g)
    pairs = [
        (ck.losses.InfoNCE(temperature=0.07, learn_temperature=True).double(),
         lambda: ck.functional.info_nce(q, d, temperature=0.07), (q, d)),
        (ck.losses.NTXent(temperature=0.3).double(), lambda: ck.functional.nt_xent(q, d, temperature=0.3), (q, d)),
        (ck.losses.MultipleNegativesRanking(scale=20.0).double(),
         lambda: ck.functional.multiple_negatives_ranking(q, d, temperature=0.05), (q, d)),
        (ck.losses.SigLIP(temperature=0.1, bias=-3.0).double(),
         lambda: ck.functional.siglip(q, d, temperature=0.1, bias=-3.0), (q, d)),
        (ck.losses.SupCon(temperature=0.1).double(), lambda: ck.functional.supcon(q, y, temperature=0.1), (q, y)),
        (ck.losses.DCL(temperature=0.1, two_view=True).double(),
         lambda: ck.functional.dcl(q, d, temperature=0.1, two_view=True), (q, d)),
        (ck.losses.CWCL(temperature=0.07).double(), lambda: ck.functional.cwcl(q, d, temperature=0.07), (q, d)),
    ]
    for module, functional, args in pairs:
        assert module.temperature().dtype == D64
        assert_rel_close(module(*args), functional(), rtol=1e-12, what=type(module).__name__)
    assert ck.losses.SigLIP().double().bias.dtype == D64


@pytest.mark.parametrize("objective", ["info_nce", "mnrl", "nt_xent"])
def test_masks_match_naive_boolean_mask(objective):
    """masks= drops candidates per anchor (false negatives): equal to the materialised
    formula with the same entries removed, values and gradients."""
    g = torch.Generator().manual_seed(1)
    n, d = 7, 5
    a = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    h = torch.randn(n, d, generator=g, dtype=D64, requires_grad=True)
    m = 2 * n if objective != "info_nce" else n
    cols = torch.randint(0, m, (n if objective != "nt_xent" else 2 * n, 2), generator=g)
    rows = cols.shape[0]
    positive = torch.arange(rows) if objective != "nt_xent" else torch.cat([torch.arange(n) + n, torch.arange(n)])
    cols = torch.where(cols == positive[:, None], torch.full_like(cols, -1), cols)  # false negatives only
    labels_r, labels_c = torch.arange(rows) % 3, torch.arange(m) % 3
    masks = [IndexMask(cols), LabelMask(labels_r + 10, labels_c + 10 * (torch.arange(m) % 2))]
    drop = torch.zeros(rows, m, dtype=torch.bool)
    for i in range(rows):
        for c in cols[i].tolist():
            if c >= 0:
                drop[i, c] = True
    # the label mask may cover a positive cell too: masks drop whatever they cover (engine semantics)
    drop |= (labels_r + 10)[:, None] == (labels_c + 10 * (torch.arange(m) % 2))[None, :]
    if objective == "info_nce":
        got = ck.functional.info_nce(a, b, temperature=0.2, masks=masks, tile_size=3)
        want = reference.info_nce(a, b, temperature=0.2, drop=drop)
        mod = ck.losses.InfoNCE(temperature=0.2).double()(a, b, masks=masks)
    elif objective == "mnrl":
        got = ck.functional.multiple_negatives_ranking(a, b, h, temperature=0.2, masks=masks, tile_size=3)
        want = reference.multiple_negatives_ranking(a, b, h, temperature=0.2, drop=drop)
        mod = ck.losses.MultipleNegativesRanking(temperature=0.2).double()(a, b, h, masks=masks)
    else:
        got = ck.functional.nt_xent(a, b, temperature=0.2, masks=masks, tile_size=3)
        want = reference.nt_xent(a, b, temperature=0.2, drop=drop)
        mod = ck.losses.NTXent(temperature=0.2).double()(a, b, masks=masks)
    assert_rel_close(got, want, rtol=1e-12)
    assert_rel_close(mod, want, rtol=1e-12)
    plain = reference.info_nce(a, b, temperature=0.2) if objective == "info_nce" else None
    if plain is not None:
        assert abs(float(plain.detach()) - float(want.detach())) > 1e-6  # the masks did drop something
    for x, y in zip(torch.autograd.grad(got, (a, b, h), allow_unused=True),
                    torch.autograd.grad(want, (a, b, h), allow_unused=True)):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert_rel_close(x, y, rtol=1e-10)


def test_one_meaning_per_name():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    # symmetric means "add the column direction"; the two-view layout is two_view=
    for call in (lambda: ck.functional.dcl(a, b, symmetric=True),
                 lambda: ck.functional.debiased_contrastive(a, b, symmetric=True),
                 lambda: ck.functional.hard_negative_contrastive(a, b, symmetric=True),
                 lambda: ck.losses.DCL(symmetric=True), lambda: ck.losses.DCLW(symmetric=True),
                 lambda: ck.losses.DebiasedContrastive(symmetric=True)):
        with pytest.raises(ValueError, match="two_view"):
            call()
    # MNRL: temperature, with scale (= 1 / temperature) as its documented alias
    x = ck.losses.MultipleNegativesRanking(scale=20.0)(a, b)
    y = ck.losses.MultipleNegativesRanking(temperature=0.05)(a, b)
    z = ck.functional.multiple_negatives_ranking(a, b, scale=20.0)
    assert torch.allclose(x, y) and torch.allclose(x, z)
    assert ck.losses.MultipleNegativesRanking(scale=20.0).scale == pytest.approx(20.0)
    with pytest.raises(ValueError, match="not both"):
        ck.losses.MultipleNegativesRanking(temperature=0.05, scale=20.0)
    # SigLIP: learn_temperature like every module (learnable kept as an alias)
    assert ck.losses.SigLIP(learn_temperature=False).temperature.learnable is False
    assert ck.losses.SigLIP(learnable=False).temperature.learnable is False
    assert isinstance(ck.losses.SigLIP().bias, torch.nn.Parameter)
    # hard_negative_contrastive shows its signature
    assert "kwargs" not in inspect.signature(ck.functional.hard_negative_contrastive).parameters
    # reduction on every module, checked once
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\)"):
        ck.losses.SupCon(reduction="avg")
    rows = ck.losses.InfoNCE(reduction="none")(a, b)
    assert rows.shape == (6,)
    with pytest.raises(ValueError, match="symmetric"):
        ck.losses.InfoNCE(symmetric=True, reduction="none")


def test_siglip_noisy_pair_small_temperature_is_finite():
    """Section 0: softplus of the positive term overflowed to inf (gradients NaN)."""
    for dtype in (torch.float32, D64):
        x = torch.tensor([[1.0, 0.0]], dtype=dtype, requires_grad=True)
        y = torch.tensor([[-1.0, 0.0]], dtype=dtype)
        loss = ck.functional.siglip(x, y, temperature=0.01, bias=-10.0)
        assert abs(float(loss.detach()) - 110.0) < 1e-4
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all()


def test_huge_finite_inputs_are_not_a_silent_wrong_answer():
    """Section 0: rows of magnitude 1e20 normalised to zero and the loss became log(M)."""
    g = torch.Generator().manual_seed(2)
    q, d = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    want = ck.functional.info_nce(q.double(), d.double(), temperature=0.1)
    try:
        got = ck.functional.info_nce(q * 1e20, d * 1e20, temperature=0.1)
    except ValueError as err:  # raising and naming the problem is also acceptable
        assert "row" in str(err) or "overflow" in str(err)
        return
    assert abs(float(got) - float(want)) < 1e-4 * abs(float(want))
