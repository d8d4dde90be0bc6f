"""Chunks from a memory budget (contrastkit.scale.memory): the saved-activation count, its
linear model in the padded tokens, the chunk it chooses, and the main job with it."""

import json

import pytest
import torch

from contrastkit.scale.memory import activation_bytes_per_token, chunk_tokens_for_budget, saved_activation_bytes


def test_saved_bytes_of_a_small_network_by_hand():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(32, 8)
    # the input (first weight's gradient) and the ReLU output (ReLU's backward and the second weight's)
    assert saved_activation_bytes(net, x) == 32 * 8 * 4 + 32 * 16 * 4
    x64 = torch.randn(5, 8, dtype=torch.float64)
    assert saved_activation_bytes(net.double(), x64) == 5 * 8 * 8 + 5 * 16 * 8
    # parameters are not activations: a network that saves only its weights counts 0 bytes
    w = torch.nn.Parameter(torch.randn(3))
    holder = torch.nn.Module()
    holder.w = w
    assert saved_activation_bytes(holder, forward=lambda: (w * w).sum()) == 0


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from contrastkit.models import TextEncoder
    from main_job_fixtures import make_tiny_model

    return TextEncoder(str(make_tiny_model(tmp_path_factory.mktemp("mem") / "model")), normalize=True)


def _forward_bytes(enc, rows, length, autocast_dtype=None):
    text = " ".join(["token"] * length)
    batch = dict(enc.tokenizer([text] * rows, padding="max_length", truncation=True, max_length=length,
                               return_tensors="pt"))
    enc.train()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        return saved_activation_bytes(enc, **batch)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_bytes_per_token_predict_other_chunk_sizes_and_leave_the_rng(tiny_encoder, autocast_dtype):
    state, was = torch.get_rng_state(), tiny_encoder.training
    tiny_encoder.eval()
    m = activation_bytes_per_token(tiny_encoder, 24, autocast_dtype=autocast_dtype)
    assert torch.equal(torch.get_rng_state(), state) and not tiny_encoder.training
    tiny_encoder.train(was)
    assert m["per_token"] > 0
    for rows in (2, 5, 8):
        want = _forward_bytes(tiny_encoder, rows, 24, autocast_dtype)
        assert want == pytest.approx(m["per_pass"] + m["per_token"] * rows * 24, rel=0.02)
    # shorter rows cost less per token (the attention term grows with the length): the bound holds
    assert _forward_bytes(tiny_encoder, 4, 12, autocast_dtype) <= m["per_pass"] + m["per_token"] * 4 * 12


def test_the_chosen_chunk_is_the_largest_within_the_budget(tiny_encoder):
    length, groups = 20, 3
    m = activation_bytes_per_token(tiny_encoder, length)
    budget = groups * (m["per_pass"] + m["per_token"] * length * 6.5)   # 6.5 rows per group
    plan = chunk_tokens_for_budget(tiny_encoder, budget, length, groups=groups)
    assert plan["fits"] and plan["rows_at_max_length"] == 6
    rows = plan["chunk_tokens"] // length
    assert groups * _forward_bytes(tiny_encoder, rows, length) <= budget
    assert groups * _forward_bytes(tiny_encoder, rows + 1, length) > budget
    # a budget below one row per group still gives one row, and says so
    tight = chunk_tokens_for_budget(tiny_encoder, 1000.0, length, groups=groups)
    assert not tight["fits"] and tight["chunk_tokens"] == length
    with pytest.raises(ValueError, match="budget_bytes must be positive"):
        chunk_tokens_for_budget(tiny_encoder, 0, length)


def test_the_main_job_sizes_its_chunks_from_chunk_memory_gb(tmp_path):
    """The same run with chunks from a budget and with one chunk per group: the same
    weights (gradient caching is exact; no dropout, fp32), the plan in metrics.json."""
    from safetensors.torch import load_file

    from contrastkit.cli import main
    from main_job_fixtures import make_beir, make_tiny_model

    data, model = make_beir(tmp_path / "beir"), make_tiny_model(tmp_path / "model", dropout=False)
    args = ["train", "--data", str(data), "--model", str(model), "--batch-size", "8", "--lr", "1e-3",
            "--precision", "fp32", "--max-steps", "3", "--no-interpolation", "--set", "data.sts=false",
            "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
            "--set", "model.train_document_max_length=32",
            "--set", "train.dev_corpus_size=20", "--set", "data.dev_fraction=0.25",
            "--set", "negatives.rank_window=[0, 10]", "--set", "negatives.sampling=random",
            "--set", "evaluation.bootstrap_resamples=200"]
    from contrastkit.models import TextEncoder

    # a budget of 3 rows of 32 tokens for each of the 3 groups (queries, positives, one negative)
    m = activation_bytes_per_token(TextEncoder(str(model), normalize=True), 32)
    gb = 3 * (m["per_pass"] + m["per_token"] * 32 * 3.5) / 2**30
    assert main(args + ["--output", str(tmp_path / "whole"), "--chunk-size", "8"]) == 0
    assert main(args + ["--output", str(tmp_path / "budget"), "--set", f"batching.chunk_memory_gb={gb}"]) == 0
    plan = json.loads((tmp_path / "budget" / "metrics.json").read_text())["chunking"]
    assert plan["chunk_memory_gb"] == pytest.approx(gb) and plan["fits"] and plan["rows_at_max_length"] == 3
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("whole", "budget"))
    base = load_file(str(model / "model.safetensors"))
    assert max(float((a[k] - base[k]).abs().max()) for k in base if k in a) > 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
