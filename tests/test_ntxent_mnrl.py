"""NT-Xent (SimCLR) and MNRL (sentence-transformers' multiple negatives ranking loss)
against their materialised formulas, as lightly / PML / sentence-transformers write them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from conftest import assert_rel_close, grads_of
from contrastkit.functional import multiple_negatives_ranking, nt_xent

D64 = torch.float64
ZERO_FLOOR = 1e-13  # absolute floor (times the logit scale) for gradients that are exactly 0


# ----------------------------------------------------------------------------- references

def ntxent_lightly(z1, z2, temperature, similarity="cosine"):
    """lightly's NTXentLoss without memory bank: 2N rows, self masked, CE to the other view."""
    z = torch.cat([z1, z2])
    if similarity == "cosine":
        z = F.normalize(z, dim=-1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n) + n, torch.arange(n)])
    return F.cross_entropy(logits, labels)


def ntxent_pml(z1, z2, temperature):
    """PML's NTXentLoss: for every positive pair (a, p) with labels cat([arange, arange]),
    -log(e^{s_ap} / (e^{s_ap} + sum_{label(n) != label(a)} e^{s_an})), mean over pairs."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    lab = torch.cat([torch.arange(n), torch.arange(n)])
    s = z @ z.T / temperature
    losses = []
    for a in range(2 * n):
        neg = s[a][lab != lab[a]]
        for p in range(2 * n):
            if p != a and lab[p] == lab[a]:
                losses.append(-(s[a, p] - torch.logsumexp(torch.cat([s[a, p:p + 1], neg]), 0)))
    return torch.stack(losses).mean()


def mnrl_st(anchors, positives, *negatives, scale=20.0, symmetric=False):
    """sentence-transformers' MNRL: scale * cos_sim(anchor, cat([positive, negatives...])),
    cross-entropy to the diagonal; symmetric: + positive -> anchors, averaged."""
    cands = torch.cat([positives, *negatives])
    scores = F.normalize(anchors, dim=-1) @ F.normalize(cands, dim=-1).T * scale
    lab = torch.arange(anchors.shape[0])
    loss = F.cross_entropy(scores, lab)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(scores[:, : anchors.shape[0]].T, lab))
    return loss


def _check(got, want, inputs, mag):
    assert_rel_close(got, want, scale=mag, what="loss")
    for i, (g, r) in enumerate(zip(grads_of(got, inputs), grads_of(want, inputs))):
        assert_rel_close(g, r, what=f"grad {i}", atol=ZERO_FLOOR * mag)


def _tile(draw, n):
    return draw(st.sampled_from([1, None, n + 5, (2, 3), (n, 1), max(1, n // 2 + 1)]), label="tile")


# ----------------------------------------------------------------------------- NT-Xent

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_nt_xent_matches_lightly_formula(data):
    n = data.draw(st.integers(1, 16), label="N")
    d = data.draw(st.integers(2, 10), label="d")
    t = data.draw(st.floats(0.01, 2.0), label="temperature")
    similarity = data.draw(st.sampled_from(["cosine", "dot"]), label="similarity")
    learn = data.draw(st.booleans(), label="tensor temperature")
    tile = _tile(data.draw, 2 * n)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    z1 = torch.randn(n, d, generator=gen, dtype=D64)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=gen, dtype=D64)
    if similarity == "dot":
        z1, z2 = z1 / math.sqrt(d), z2 / math.sqrt(d)
    z1.requires_grad_(), z2.requires_grad_()
    temp = torch.tensor(t, dtype=D64, requires_grad=True) if learn else t
    got = nt_xent(z1, z2, temperature=temp, similarity=similarity, tile_size=tile)
    want = ntxent_lightly(z1, z2, temp, similarity)
    inputs = [z1, z2] + ([temp] if learn else [])
    zz = torch.cat([z1, z2]).detach()
    if similarity == "cosine":
        zz = F.normalize(zz, dim=-1)
    _check(got, want, inputs, float((zz @ zz.T).abs().max()) / t + 1.0)


def test_nt_xent_matches_pml_pair_formula(rng):
    z1 = torch.randn(7, 5, generator=rng, dtype=D64, requires_grad=True)
    z2 = torch.randn(7, 5, generator=rng, dtype=D64, requires_grad=True)
    got = nt_xent(z1, z2, temperature=0.3, tile_size=4)
    want = ntxent_pml(z1, z2, 0.3)
    _check(got, want, [z1, z2], 1 / 0.3)


def test_nt_xent_one_sample_is_zero():
    z1 = torch.randn(1, 4, dtype=D64, requires_grad=True)
    z2 = torch.randn(1, 4, dtype=D64, requires_grad=True)
    loss = nt_xent(z1, z2, temperature=0.1)
    assert abs(loss.item()) < 1e-12  # each view's only candidate is its positive


def test_ntxent_module_and_learnable_temperature(rng):
    z1 = torch.randn(12, 6, generator=rng, dtype=D64, requires_grad=True)
    z2 = torch.randn(12, 6, generator=rng, dtype=D64, requires_grad=True)
    mod = ck.losses.NTXent(temperature=0.5, tile_size=5)
    assert_rel_close(mod(z1, z2), ntxent_lightly(z1, z2, 0.5), rtol=1e-6)
    mod = ck.losses.NTXent(temperature=0.2, learn_temperature=True, tile_size=(3, 7))
    (log_scale,) = list(mod.parameters())
    loss = mod(z1, z2)
    loss.backward()
    ls = log_scale.detach().double().requires_grad_()
    want = ntxent_lightly(z1.detach(), z2.detach(), torch.exp(-ls))
    (g_ref,) = torch.autograd.grad(want, [ls])
    assert_rel_close(loss.detach(), want.detach(), rtol=1e-6)
    assert_rel_close(log_scale.grad.double(), g_ref, rtol=1e-5)


# ----------------------------------------------------------------------------- MNRL

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mnrl_matches_sentence_transformers_formula(data):
    n = data.draw(st.integers(1, 12), label="N")
    d = data.draw(st.integers(2, 10), label="d")
    n_neg = data.draw(st.integers(0, 3), label="hard-negative columns")
    as_3d = n_neg > 0 and data.draw(st.booleans(), label="(N, k, d) negatives")
    scale = data.draw(st.floats(0.5, 100.0), label="scale")
    tensor_scale = data.draw(st.booleans(), label="tensor scale")
    symmetric = data.draw(st.booleans(), label="symmetric")
    tile = _tile(data.draw, n * (1 + n_neg))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    a = torch.randn(n, d, generator=gen, dtype=D64, requires_grad=True)
    p = torch.randn(n, d, generator=gen, dtype=D64, requires_grad=True)
    negs = [torch.randn(n, d, generator=gen, dtype=D64, requires_grad=True) for _ in range(n_neg)]
    s = torch.tensor(scale, dtype=D64, requires_grad=True) if tensor_scale else scale
    if as_3d:
        stacked = torch.stack(negs, 1)  # (N, k, d): column h is negs[h]
        got = multiple_negatives_ranking(a, p, stacked, scale=s, symmetric=symmetric, tile_size=tile)
    else:
        got = multiple_negatives_ranking(a, p, *negs, scale=s, symmetric=symmetric, tile_size=tile)
    want = mnrl_st(a, p, *negs, scale=s, symmetric=symmetric)
    _check(got, want, [a, p, *negs] + ([s] if tensor_scale else []), scale + 1.0)


def test_mnrl_several_negative_tensors_and_3d_agree(rng):
    a = torch.randn(9, 8, generator=rng, dtype=D64, requires_grad=True)
    p = torch.randn(9, 8, generator=rng, dtype=D64, requires_grad=True)
    n3 = torch.randn(9, 3, 8, generator=rng, dtype=D64, requires_grad=True)
    n2 = torch.randn(9, 8, generator=rng, dtype=D64, requires_grad=True)
    got = multiple_negatives_ranking(a, p, n3, n2, tile_size=4)  # mixed (N, k, d) and (N, d)
    want = mnrl_st(a, p, n3[:, 0], n3[:, 1], n3[:, 2], n2)
    _check(got, want, [a, p, n3, n2], 21.0)
    # the hard negatives do change the loss (they are in the denominator)
    assert got.item() > multiple_negatives_ranking(a, p).item()


def test_mnrl_module(rng):
    a = torch.randn(10, 8, generator=rng, dtype=D64)
    p = torch.randn(10, 8, generator=rng, dtype=D64)
    neg = torch.randn(10, 8, generator=rng, dtype=D64)
    mod = ck.losses.MultipleNegativesRanking(scale=20.0, tile_size=3)
    assert_rel_close(mod(a, p), mnrl_st(a, p))
    assert_rel_close(mod(a, p, neg), mnrl_st(a, p, neg))
    sym = ck.losses.MultipleNegativesRanking(scale=10.0, symmetric=True)
    assert_rel_close(sym(a, p, neg), mnrl_st(a, p, neg, scale=10.0, symmetric=True))
    dot = ck.losses.MultipleNegativesRanking(scale=1.0, similarity="dot")
    want = F.cross_entropy(a @ torch.cat([p, neg]).T, torch.arange(10))
    assert_rel_close(dot(a, p, neg), want)
