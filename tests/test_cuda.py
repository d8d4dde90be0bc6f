"""Exactness on CUDA: every objective of ``contrastkit bench loss`` on a CUDA device, in
float32 and bfloat16 inputs, against its naive formula in float64 on the CPU; the tile
chooser's CUDA path; a model step with bf16 autocast. Skipped (with the reason) where no
CUDA device is present; ``scripts/gpu_check.sh`` runs it on a GPU machine."""

import pytest
import torch

import os

DEVICE = os.environ.get("CONTRASTKIT_TEST_DEVICE", "cuda")  # "cpu" checks this file itself on a CPU machine
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (scripts/gpu_check.sh)")


def _cases():
    from contrastkit.bench.loss_cases import CASES

    return sorted(CASES)


def _run(fn, a, b, labels, tile):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    loss = fn(a, b, labels, tile)
    loss.backward()
    grads = [torch.zeros(x.shape, dtype=torch.float64) if x.grad is None else x.grad.double().cpu() for x in (a, b)]
    return (loss.detach().double().cpu(), *grads)  # single-view objectives leave b without a gradient


@pytest.mark.parametrize("name", _cases() if DEVICE != "cuda" or torch.cuda.is_available() else ["none"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n, tile", [(96, 32), (300, (64, 128)), (300, None)])  # None: the automatic tile
def test_objective_on_cuda_matches_float64_reference(name, dtype, rtol, n, tile):
    from contrastkit.bench.loss_cases import CASES, make_inputs

    case = CASES[name]
    a64, b64, labels = make_inputs(n, 32, seed=1, device="cpu", dtype=torch.float64)
    ref = _run(case.naive, a64, b64, labels, tile)
    a, b, lab = (a64.detach().to(DEVICE, dtype), b64.detach().to(DEVICE, dtype), labels.to(DEVICE))
    # the reference sees exactly the rounded inputs the CUDA run sees
    ref = _run(case.naive, a.double().cpu(), b.double().cpu(), labels, tile)
    got = _run(case.ours, a, b, lab, tile)
    scale = max(1.0, float(ref[0].abs()))
    assert abs(float(got[0]) - float(ref[0])) <= rtol * scale, (name, float(got[0]), float(ref[0]))
    for g, r in zip(got[1:], ref[1:]):
        err = float((g - r).abs().max())
        assert err <= rtol * max(1e-3, float(r.abs().max())) * 10, (name, err)


def test_tile_chooser_cuda_path():
    from contrastkit.engine import choose_tile

    tr, tc = choose_tile(65536, 65536, 256, torch.device("cuda"))
    assert 1 <= tr <= 65536 and 1 <= tc <= 65536
    free, _ = torch.cuda.mem_get_info()
    assert tr * tc * 4 * 3 < free


def test_text_encoder_bf16_on_cuda_agrees_with_fp32():
    from contrastkit.models import TextEncoder

    enc = TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=64).cuda()
    texts = ["protein folding in cells", "vitamin D and bone density", "a claim"]
    e32 = enc.encode(texts, precision="fp32")
    e16 = enc.encode(texts, precision="bf16")
    assert e32.device.type == "cuda"
    assert float(torch.nn.functional.cosine_similarity(e32, e16).min()) > 0.99
