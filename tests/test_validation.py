"""Bad input is a ValueError whose message names the problem, never a silent wrong answer
(nor a bare RuntimeError from deep inside torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import contrastkit as ck
from contrastkit.engine import IndexMask, LabelMask, tiled_logsumexp
from contrastkit.engine.validation import check_index, check_pair
from contrastkit.functional import info_nce, multiple_negatives_ranking, nt_xent


def _ab(n=4, m=4, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def _with(x, idx, value):
    x = x.clone()
    x[idx] = value
    return x


A, C = _ab()


@pytest.mark.parametrize(
    "anchors, candidates, match",
    [
        (A, _ab(d=7)[1], r"different embedding dimensions: 8 vs 7"),
        (A[:0], C, r"anchors is an empty batch"),
        (A, C[:0], r"candidates is an empty batch"),
        (A[:, :0], C[:, :0], r"embedding dimension 0"),
        (_with(A, (1, 2), float("nan")), C, r"anchors contains NaN .*\(1, 2\)"),
        (A, _with(C, (3, 0), float("inf")), r"candidates contains inf .*\(3, 0\)"),
        (A, _with(C, (0, 0), -float("inf")), r"candidates contains inf"),
        (A, C.double(), r"anchors is torch.float32 but candidates is torch.float64"),
        (A.long(), C.long(), r"anchors must be a floating tensor.*int64"),
        (A.bool(), C, r"anchors must be a floating tensor.*bool"),
        (A[0], C, r"anchors must have shape \(N, d\), got \(8,\)"),
        (A, C[None], r"candidates must have shape \(N, d\), got \(1, 4, 8\)"),
        (A.numpy(), C, r"anchors must be a torch.Tensor, got ndarray"),
        (A.tolist(), C, r"anchors must be a torch.Tensor, got list"),
        (A, C[:3], r"default diagonal positives need at least as many candidates as anchors"),
    ],
)
def test_info_nce_bad_embeddings(anchors, candidates, match):
    with pytest.raises(ValueError, match=match):
        info_nce(anchors, candidates, temperature=0.1)


@pytest.mark.parametrize(
    "positives, match",
    [
        (torch.tensor([0, 1, 9, 2]), r"positives\[2\] = 9 is out of range: candidates have 4 rows"),
        (torch.tensor([0, 4, 1, 2]), r"positives\[1\] = 4 is out of range"),
        (torch.tensor([0, 1, -2, 2]), r"positives\[2\] = -2 is out of range"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"positives must be an integer tensor.*float32"),
        (torch.tensor([True, False, True, False]), r"positives must be an integer tensor.*bool"),
        (torch.tensor([0, 1, 2]), r"positives must have shape \(4,\)"),
        (torch.tensor([[0, 1, 2, 3]]), r"positives must have shape \(4,\)"),
        ([0, 1, 2, 3], r"positives must be a LongTensor of column indices, got list"),
        (torch.full((4,), -1), r"no anchor row has a positive"),
    ],
)
def test_info_nce_bad_positives(positives, match):
    with pytest.raises(ValueError, match=match):
        info_nce(A, C, temperature=0.1, positives=positives)


@pytest.mark.parametrize(
    "temperature, match",
    [
        (0.0, r"temperature must be positive and finite, got 0.0"),
        (-0.5, r"temperature must be positive and finite"),
        (float("nan"), r"temperature must be positive and finite"),
        (float("inf"), r"temperature must be positive and finite"),
        (torch.tensor(0.0), r"temperature must be positive and finite"),
        (torch.tensor(-1.0, requires_grad=True), r"temperature must be positive and finite"),
        (torch.tensor(float("nan")), r"temperature must be positive and finite"),
        (torch.tensor([0.1, 0.1, -0.1, 0.1]), r"temperature must be positive and finite"),
        (torch.tensor([0.1, 0.2, 0.3]), r"temperature must be a scalar or have one entry per anchor row \(4\), got shape \(3,\)"),
        (torch.full((4, 1), 0.1), r"temperature must be a scalar or have one entry per anchor row"),
        (torch.tensor([]), r"temperature is an empty tensor"),
        (torch.tensor(1), r"temperature must be a floating tensor, got torch.int64"),
        ("0.1x", r"temperature must be a number or a tensor, got str"),
        (None, r"temperature must be a number or a tensor"),
    ],
)
def test_info_nce_bad_temperature(temperature, match):
    with pytest.raises(ValueError, match=match):
        info_nce(A, C, temperature=temperature)


def test_info_nce_bad_options():
    with pytest.raises(ValueError, match=r"similarity must be one of \('cosine', 'dot'\), got 'l2'"):
        info_nce(A, C, temperature=0.1, similarity="l2")
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'avg'"):
        info_nce(A, C, temperature=0.1, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction='none' is not defined for symmetric"):
        info_nce(A, C, temperature=0.1, symmetric=True, reduction="none")
    with pytest.raises(ValueError, match=r"tile_size must be positive, got 0"):
        info_nce(A, C, temperature=0.1, tile_size=0)
    with pytest.raises(ValueError, match=r"tile_size must be positive"):
        info_nce(A, C, temperature=0.1, tile_size=(4, -1))
    with pytest.raises(ValueError, match=r"tile_size must be an int or a \(rows, cols\) pair"):
        info_nce(A, C, temperature=0.1, tile_size=(1, 2, 3))
    with pytest.raises(ValueError, match=r"tile_size must be an int or a \(rows, cols\) pair"):
        info_nce(A, C, temperature=0.1, tile_size="big")


def test_bad_masks():
    lab = torch.arange(4)
    with pytest.raises(ValueError, match=r"LabelMask row_labels must have shape \(4,\), got \(3,\)"):
        info_nce(A, C, temperature=0.1, masks=[LabelMask(lab[:3], lab)])
    with pytest.raises(ValueError, match=r"LabelMask col_labels must be an integer tensor, got torch.float32"):
        info_nce(A, C, temperature=0.1, masks=[LabelMask(lab, lab.float())])
    with pytest.raises(ValueError, match=r"IndexMask columns must lie in \[-1, 4\), got range \[0, 4\]"):
        info_nce(A, C, temperature=0.1, masks=[IndexMask(torch.tensor([[0], [4], [1], [2]]))])
    with pytest.raises(ValueError, match=r"IndexMask columns must lie in \[-1, 4\)"):
        info_nce(A, C, temperature=0.1, masks=[IndexMask(torch.tensor([0, -3, 1, 2]))])
    with pytest.raises(ValueError, match=r"IndexMask columns must have shape \(4, k\), got \(2, 1\)"):
        info_nce(A, C, temperature=0.1, masks=[IndexMask(torch.tensor([0, 1]))])


def test_device_mix_is_named():
    # no second real device is needed: the checks compare devices before touching data
    a = torch.randn(4, 8)
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match=r"anchors is on cpu but candidates is on meta"):
        check_pair("anchors", a, "candidates", meta)
    with pytest.raises(ValueError, match=r"positives is on meta but the embeddings are on cpu"):
        check_index("positives", torch.empty(4, dtype=torch.long, device="meta"), 4, 4, a.device)
    with pytest.raises(ValueError, match=r"temperature is on meta but the embeddings are on cpu"):
        info_nce(A, C, temperature=torch.empty((), device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mix_cuda():
    with pytest.raises(ValueError, match=r"anchors is on cpu but candidates is on cuda"):
        info_nce(A, C.cuda(), temperature=0.1)


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match=r"z1 and z2 must hold the same number of samples, got 4 and 3"):
        nt_xent(A, C[:3])
    with pytest.raises(ValueError, match=r"different embedding dimensions"):
        nt_xent(A, _ab(d=5)[1])
    with pytest.raises(ValueError, match=r"z2 contains NaN"):
        nt_xent(A, _with(C, (0, 0), float("nan")))
    with pytest.raises(ValueError, match=r"z1 is an empty batch"):
        nt_xent(A[:0], C[:0])
    with pytest.raises(ValueError, match=r"temperature must be positive and finite"):
        nt_xent(A, C, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature"):
        ck.losses.NTXent(temperature=-1.0)


def test_mnrl_bad_input():
    with pytest.raises(ValueError, match=r"anchors and candidates \(their positives\) must have the same number of rows, got 4 and 3"):
        multiple_negatives_ranking(A, C[:3])
    with pytest.raises(ValueError, match=r"hard_negatives\[0\] has 3 rows for 4 anchors"):
        multiple_negatives_ranking(A, C, torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match=r"hard_negatives\[1\] must be a tensor, got list"):
        multiple_negatives_ranking(A, C, C, [[0.0] * 8] * 4)
    with pytest.raises(ValueError, match=r"candidates and hard_negatives\[0\] have different embedding dimensions: 8 vs 6"):
        multiple_negatives_ranking(A, C, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"hard_negatives\[1\] contains inf"):
        multiple_negatives_ranking(A, C, C, _with(C, (2, 2), float("inf")))
    with pytest.raises(ValueError, match=r"hard_negatives\[0\] is torch.float64"):
        multiple_negatives_ranking(A, C, C.double())
    with pytest.raises(ValueError, match=r"scale must be positive and finite"):
        multiple_negatives_ranking(A, C, scale=0.0)
    with pytest.raises(ValueError, match=r"scale must be positive and finite"):
        multiple_negatives_ranking(A, C, scale=torch.tensor(-20.0))
    with pytest.raises(ValueError, match=r"scale must be positive and finite"):
        ck.losses.MultipleNegativesRanking(scale=math.nan)


def test_tiled_logsumexp_bad_input():
    with pytest.raises(ValueError, match=r"tiled_logsumexp needs q \(N, d\) and k \(M, d\), got \(8,\) and \(4, 8\)"):
        tiled_logsumexp(A[0], C)
    with pytest.raises(ValueError, match=r"got \(4, 8\) and \(4, 7\)"):
        tiled_logsumexp(A, _ab(d=7)[1])
    with pytest.raises(ValueError, match=r"row_bias must have shape \(4,\), got \(3,\)"):
        tiled_logsumexp(A, C, row_bias=torch.zeros(3))
    with pytest.raises(ValueError, match=r"col_bias must have shape \(4,\), got \(4, 1\)"):
        tiled_logsumexp(A, C, col_bias=torch.zeros(4, 1))


def test_valid_input_is_not_rejected():
    # the other side of the checks: the accepted forms all work
    info_nce(A, C, temperature=np.float32(0.1))
    info_nce(A, C, temperature=torch.tensor([0.1]))
    info_nce(A, C, temperature=torch.full((4,), 0.1))
    info_nce(A, C, temperature=0.1, positives=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    info_nce(A, C, temperature=0.1, positives=torch.tensor([3, -1, 3, 0]))
    info_nce(A.half(), C.half(), temperature=0.1)
