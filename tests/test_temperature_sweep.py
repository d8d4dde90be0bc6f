"""Every objective at small temperatures (1e-4 .. 1e-2) in float32 and float64: finite
values and gradients, equal to the float64 reference (contrastkit.reference) where the
reference itself is finite, and float32 within its precision of the float64 value
(errors measured relative to the logit scale 1 / t)."""

from __future__ import annotations

import pytest
import torch

import contrastkit as ck
from contrastkit import reference as ref
from conftest import assert_rel_close

F = ck.functional
N, D = 6, 4

# name: (ours(a, b, y, t), reference(a, b, y, t))
CASES = {
    "info_nce": (lambda a, b, y, t: F.info_nce(a, b, temperature=t),
                 lambda a, b, y, t: ref.info_nce(a, b, temperature=t)),
    "clip_margin": (lambda a, b, y, t: F.info_nce(a, b, temperature=t, symmetric=True, margin=0.2),
                    lambda a, b, y, t: ref.info_nce(a, b, temperature=t, symmetric=True, margin=0.2)),
    "mnrl": (lambda a, b, y, t: F.multiple_negatives_ranking(a, b, b.roll(1, 0), temperature=t),
             lambda a, b, y, t: ref.multiple_negatives_ranking(a, b, b.roll(1, 0), temperature=t)),
    "nt_xent": (lambda a, b, y, t: F.nt_xent(a, b, temperature=t, margin=0.1),
                lambda a, b, y, t: ref.nt_xent(a, b, temperature=t, margin=0.1)),
    "siglip": (lambda a, b, y, t: F.siglip(a, b, temperature=t, bias=-10.0),
               lambda a, b, y, t: ref.siglip(a, b, temperature=t, bias=-10.0)),
    "supcon_out": (lambda a, b, y, t: F.supcon(torch.stack([a, b], 1), y, temperature=t),
                   lambda a, b, y, t: ref.supcon(torch.stack([a, b], 1), y, temperature=t)),
    "supcon_in_margin": (lambda a, b, y, t: F.supcon(torch.stack([a, b], 1), y, temperature=t, variant="in",
                                                     margin=0.1),
                         lambda a, b, y, t: ref.supcon(torch.stack([a, b], 1), y, temperature=t, variant="in",
                                                       margin=0.1)),
    "dcl": (lambda a, b, y, t: F.dcl(a, b, temperature=t, two_view=True),
            lambda a, b, y, t: ref.dcl(a, b, temperature=t, two_view=True)),
    "dclw": (lambda a, b, y, t: F.dcl(a, b, temperature=t, weighted=True),
             lambda a, b, y, t: ref.dcl(a, b, temperature=t, weighted=True)),
    "debiased": (lambda a, b, y, t: F.debiased_contrastive(a, b, temperature=t, tau_plus=0.1, two_view=True),
                 lambda a, b, y, t: ref.debiased_contrastive(a, b, temperature=t, tau_plus=0.1, two_view=True)),
    "hard_negative": (lambda a, b, y, t: F.hard_negative_contrastive(a, b, temperature=t),
                      lambda a, b, y, t: ref.hard_negative_contrastive(a, b, temperature=t)),
    "cwcl": (lambda a, b, y, t: F.cwcl(a, b, temperature=t, symmetric=True),
             lambda a, b, y, t: ref.cwcl(a, b, temperature=t, symmetric=True)),
    "icon": (lambda a, b, y, t: F.icon(a, y, temperature=t),
             lambda a, b, y, t: ref.icon(a, y, temperature=t)),
    "multiview": (lambda a, b, y, t: F.multiview_info_nce(torch.stack([a, b], 1), temperature=t),
                  lambda a, b, y, t: ref.multiview_info_nce(torch.stack([a, b], 1), temperature=t)),
    "multiview_joint": (lambda a, b, y, t: F.multiview_info_nce(torch.stack([a, b], 1), temperature=t,
                                                                aggregation="joint"),
                        lambda a, b, y, t: ref.multiview_info_nce(torch.stack([a, b], 1), temperature=t,
                                                                  aggregation="joint")),
}


def test_every_functional_with_a_temperature_is_swept():
    swept = {"info_nce", "multiple_negatives_ranking", "nt_xent", "siglip", "supcon", "dcl",
             "debiased_contrastive", "hard_negative_contrastive", "cwcl", "icon", "multiview_info_nce"}
    import inspect
    with_t = {n for n in F.__all__ if "temperature" in inspect.signature(getattr(F, n)).parameters}
    assert with_t == swept, with_t ^ swept


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(N, D, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), y


@pytest.mark.parametrize("t", [1e-4, 1e-3, 1e-2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_small_temperatures(name, t):
    ours, naive = CASES[name]
    a64, b64, y = _inputs(torch.float64)
    got64 = ours(a64, b64, y, t)
    g64 = torch.autograd.grad(got64, (a64, b64), allow_unused=True)
    assert torch.isfinite(got64), (name, t, got64)
    assert all(g is None or torch.isfinite(g).all() for g in g64), (name, t)
    want = naive(a64, b64, y, t)
    if torch.isfinite(want):  # the published debiased / joint formulas exponentiate raw logits
        assert_rel_close(got64, want, rtol=1e-10, scale=1.0 / t, what=f"{name} t={t}")
        gw = torch.autograd.grad(want, (a64, b64), allow_unused=True)
        for x, w in zip(g64, gw):
            if x is not None and w is not None and torch.isfinite(w).all():
                assert_rel_close(x, w, rtol=1e-8, scale=1.0 / t, what=f"{name} t={t} gradient")
    a32, b32, _ = _inputs(torch.float32)
    got32 = ours(a32, b32, y, t)
    g32 = torch.autograd.grad(got32, (a32, b32), allow_unused=True)
    assert torch.isfinite(got32), (name, t, got32)
    assert all(g is None or torch.isfinite(g).all() for g in g32), (name, t)
    # float32 keeps about 7 digits of the logits, whose size is 1 / t
    assert abs(float(got32.detach()) - float(got64.detach())) <= 1e-5 * max(1.0, abs(float(got64)), 1.0 / t), (name, t)
