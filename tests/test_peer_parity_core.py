"""Parity with the peer libraries people use today, for the core objectives.

1. Golden vectors (tests/data/peer_losses.npz, described in tests/data/PEER_LOSSES.md):
   loss values and gradients computed by open_clip, lightly, pytorch-metric-learning and
   sentence-transformers on fixed float64 inputs (open_clip and lightly cannot be
   installed beside the CPU torch, so their numbers are frozen here).
2. Live parity with pytorch-metric-learning's NTXentLoss and sentence-transformers'
   MultipleNegativesRankingLoss (its formula via util.cos_sim, and the real loss class
   driven by a stub model that returns given embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import contrastkit as ck
from conftest import assert_rel_close, grads_of
from contrastkit.functional import info_nce, multiple_negatives_ranking, nt_xent

DATA = Path(__file__).parent / "data"
NPZ = DATA / "peer_losses.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(NPZ) as f:
        return {k: torch.from_numpy(f[k].copy()) for k in f.files}


def _inputs(golden, case, names):
    return [golden[f"{case}.in_{n}"].clone().requires_grad_() for n in names]


def _check_golden(golden, case, loss, inputs, names, rtol=1e-9):
    assert_rel_close(loss, golden[f"{case}.loss"], rtol=rtol, what=f"{case} loss")
    for name, g in zip(names, grads_of(loss, inputs)):
        assert_rel_close(g, golden[f"{case}.grad_{name}"], rtol=rtol, what=f"{case} d{name}")


def test_golden_file_matches_its_description(golden):
    meta = json.loads((DATA / "peer_losses.json").read_text())
    for case in meta["cases"]:
        assert abs(float(golden[f"{case['name']}.loss"]) - case["loss"]) < 1e-12
        for name in case["inputs"]:
            assert f"{case['name']}.in_{name}" in golden


@pytest.mark.parametrize("tile", [None, 1, 7, (5, 64), 1000])
def test_openclip_clip_loss(golden, tile):
    # ClipLoss()(x, y, logit_scale): symmetric CE on logit_scale * x @ y.T, features as given
    x, y, logit_scale = _inputs(golden, "openclip_clip", ["x", "y", "logit_scale"])
    loss = info_nce(x, y, temperature=1.0 / logit_scale, similarity="dot", symmetric=True, tile_size=tile)
    _check_golden(golden, "openclip_clip", loss, [x, y, logit_scale], ["x", "y", "logit_scale"])


@pytest.mark.parametrize("tile", [None, 3, (16, 100)])
def test_lightly_ntxent(golden, tile):
    x, y = _inputs(golden, "lightly_ntxent", ["x", "y"])
    loss = nt_xent(x, y, temperature=0.5, tile_size=tile)
    _check_golden(golden, "lightly_ntxent", loss, [x, y], ["x", "y"])
    x, y = _inputs(golden, "lightly_ntxent", ["x", "y"])
    loss = ck.losses.NTXent(temperature=0.5)(x, y)  # module: float32 temperature buffer
    _check_golden(golden, "lightly_ntxent", loss, [x, y], ["x", "y"], rtol=1e-6)


@pytest.mark.parametrize("tile", [None, 5, (96, 7)])
def test_pml_ntxent(golden, tile):
    x, y = _inputs(golden, "pml_ntxent", ["x", "y"])
    loss = nt_xent(x, y, temperature=0.5, tile_size=tile)
    _check_golden(golden, "pml_ntxent", loss, [x, y], ["x", "y"])


@pytest.mark.parametrize("tile", [None, 1, 9, (40, 13)])
def test_st_mnrl_hard_negative(golden, tile):
    q, p, n = _inputs(golden, "st_mnrl_hardneg", ["q", "p", "n"])
    loss = multiple_negatives_ranking(q, p, n, scale=20.0, tile_size=tile)
    _check_golden(golden, "st_mnrl_hardneg", loss, [q, p, n], ["q", "p", "n"])
    q, p, n = _inputs(golden, "st_mnrl_hardneg", ["q", "p", "n"])
    loss = ck.losses.MultipleNegativesRanking(scale=20.0)(q, p, n[:, None, :])  # (N, 1, d) form
    _check_golden(golden, "st_mnrl_hardneg", loss, [q, p, n], ["q", "p", "n"])


# ----------------------------------------------------------------------------- live: PML

@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_pml_ntxent_live(dtype, rtol, temperature):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(3)
    n, d = 24, 16
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    z2 = (z1 + 0.5 * torch.randn(n, d, generator=g, dtype=dtype))
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ours = nt_xent(a1, a2, temperature=temperature, tile_size=(7, 10))
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    theirs = pml_losses.NTXentLoss(temperature=temperature)(torch.cat([b1, b2]), labels)
    assert_rel_close(ours, theirs, rtol=rtol, what="loss")
    for name, a, b in zip(["z1", "z2"], grads_of(ours, [a1, a2]), grads_of(theirs, [b1, b2])):
        assert_rel_close(a, b, rtol=10 * rtol, what=f"d{name}")


# ----------------------------------------------------------------------------- live: ST

def _st_formula(anchors, *columns, scale):
    util = pytest.importorskip("sentence_transformers.util")
    scores = util.cos_sim(anchors, torch.cat(columns)) * scale
    return torch.nn.functional.cross_entropy(scores, torch.arange(anchors.shape[0]))


@pytest.mark.parametrize("n_neg", [0, 1, 3])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_st_mnrl_formula_live(n_neg, dtype, rtol):
    g = torch.Generator().manual_seed(5 + n_neg)
    n, d = 20, 12
    cols = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(2 + n_neg)]
    ours_in = [c.clone().requires_grad_() for c in cols]
    theirs_in = [c.clone().requires_grad_() for c in cols]
    ours = multiple_negatives_ranking(*ours_in, scale=20.0, tile_size=(6, 9))
    theirs = _st_formula(*theirs_in, scale=20.0)
    assert_rel_close(ours, theirs, rtol=rtol, what="loss")
    for a, b in zip(grads_of(ours, ours_in), grads_of(theirs, theirs_in)):
        assert_rel_close(a, b, rtol=10 * rtol, what="grad")


class _StubModel(torch.nn.Module):
    """Stands in for a SentenceTransformer: each feature dict carries its embeddings."""

    def forward(self, features):
        return {"sentence_embedding": features["emb"]}


@pytest.mark.parametrize(
    "n_neg, symmetric",
    [(0, False), (1, False), (3, False), (0, True), (2, True)],
)
def test_st_mnrl_class_live(n_neg, symmetric):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    kwargs = {}
    if symmetric:  # ST's symmetric InfoNCE: query->doc and doc->query, one softmax each, averaged
        kwargs = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    theirs_fn = st_losses.MultipleNegativesRankingLoss(_StubModel(), scale=20.0, **kwargs)
    g = torch.Generator().manual_seed(11 + n_neg)
    n, d = 16, 10
    cols = [torch.randn(n, d, generator=g) for _ in range(2 + n_neg)]
    ours_in = [c.clone().requires_grad_() for c in cols]
    theirs_in = [c.clone().requires_grad_() for c in cols]
    theirs = theirs_fn([{"emb": c} for c in theirs_in], None)
    ours_fn = ck.losses.MultipleNegativesRanking(scale=20.0, symmetric=symmetric, tile_size=(5, 7))
    ours = ours_fn(*ours_in)
    assert_rel_close(ours, theirs, rtol=1e-5, what="loss")
    for a, b in zip(grads_of(ours, ours_in), grads_of(theirs, theirs_in)):
        assert_rel_close(a, b, rtol=1e-4, what="grad")
