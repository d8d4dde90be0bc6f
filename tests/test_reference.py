"""contrastkit.reference is the one copy of the naive formulas: the tests compare the
tiled objectives with it, and ``bench loss`` times it as the "naive" row. Here: every
benchmark case's tiled loss equals its reference, value and gradients, in float64."""

from __future__ import annotations

import pytest
import torch

from contrastkit import reference
from contrastkit.bench.loss_cases import CASES, make_inputs
from conftest import assert_rel_close


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_case_equals_reference(name):
    case = CASES[name]
    a, b, labels = make_inputs(48, 8, 3, "cpu", torch.float64)
    ours = case.ours(a, b, labels, 16)
    naive = case.naive(a, b, labels, None)
    assert_rel_close(ours, naive, rtol=1e-12, what=name)
    for g, h in zip(torch.autograd.grad(ours, (a, b), allow_unused=True),
                    torch.autograd.grad(naive, (a, b), allow_unused=True)):
        if g is None or h is None:
            assert (g is None or not g.abs().max()) and (h is None or not h.abs().max()), name
            continue
        assert_rel_close(g, h, rtol=1e-10, what=f"{name} gradient")


def test_moco_reference_is_info_nce_with_own_key_only():
    g = torch.Generator().manual_seed(0)
    q, k, u = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (5, 5, 7))
    drop = torch.zeros(5, 12, dtype=torch.bool)
    drop[:, :5] = ~torch.eye(5, dtype=torch.bool)
    assert_rel_close(reference.moco(q, k, u, temperature=0.1),
                     reference.info_nce(q, torch.cat([k, u]), temperature=0.1, drop=drop), rtol=1e-13)
