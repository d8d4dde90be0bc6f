"""The main job end to end on a tiny BEIR folder and a tiny BERT: run folder contents,
the saved model in sentence-transformers layout, exact resume, overwrite refusal, errors."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from contrastkit.cli import main
from main_job_fixtures import make_beir, make_tiny_model, run_killed_after_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mainjob")
    return make_beir(root / "beir"), make_tiny_model(root / "model")


def _args(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--output", str(out), "--batch-size", "8",
            "--chunk-size", "3", "--lr", "1e-3", "--precision", "fp32",
            "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
            "--set", "train.dev_corpus_size=20", "--set", "train.eval_every=2", "--set", "data.dev_fraction=0.25",
            "--set", "negatives.rank_window=[0, 10]", "--set", "negatives.sampling=random",
            "--set", "evaluation.bootstrap_resamples=200", *extra]


def test_default_config_is_the_documented_main_job():
    from contrastkit.training.config import load_config

    cfg = load_config()
    assert (cfg.data.source, cfg.model.name, cfg.objective.name) == ("scifact", "all-MiniLM-L6-v2",
                                                                      "MultipleNegativesRanking")
    assert cfg.interpolation.enabled and cfg.negatives.mine and cfg.data.sts


def test_recipe_defaults_apply_under_what_the_user_wrote(tmp_path):
    from contrastkit.training.config import dump_config, load_config

    assert load_config().optim.lr == 1.2e-4                                 # the main job's, chosen on dev
    assert load_config(overrides=["recipe=simcse"]).optim.lr == 3e-5        # SimCSE's paper value
    assert load_config(overrides=["recipe=simcse", "optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config(values={"recipe": "simcse", "optim": {"epochs": 1.0}}).optim.lr == 3e-5
    cfg = load_config(overrides=["recipe=simcse"])
    dump_config(cfg, tmp_path / "c.yaml")                                   # the resolved value is recorded
    assert load_config(tmp_path / "c.yaml").optim.lr == 3e-5
    assert load_config(overrides=["recipe=simcse"]).optim.lr == 3e-5        # the table is not mutated


def test_an_epoch_without_a_full_batch_is_an_error_not_a_hang(tiny, tmp_path, capsys):
    # the tiny random model's top-ranked negatives are a few hub documents shared by most
    # queries, so no-duplicate batches of 8 cannot be filled: the loop must say so, in one line
    data, model = tiny
    assert main(_args(data, model, tmp_path / "run", "--max-steps", "4", "--set", "negatives.sampling=top",
                      "--set", "data.sts=false")) == 2
    err = capsys.readouterr().err
    assert "epoch 0 gave no batch" in err and "batching.batch_size" in err and "Traceback" not in err


def test_train_writes_the_run_folder(tiny, tmp_path, capsys):
    data, model = tiny
    out = tmp_path / "run"
    assert main(_args(data, model, out, "--max-steps", "4", "--set", "data.sts=true")) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("before", "after", "difference", "sts", "dev", "mining", "train", "phases", "wall_seconds"):
        assert key in m, key
    assert 0.0 <= m["before"]["ndcg@10"] <= 1.0 and 0.0 <= m["after"]["ndcg@10"] <= 1.0
    d = m["difference"]["ndcg@10"]
    assert d["low"] <= d["mean_diff"] <= d["high"]
    assert m["dev"]["interpolation"]["chosen_alpha"] in m["dev"]["interpolation"]["alphas"]
    assert m["train"]["steps"] == 4
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "dev"] == [0, 2, 4]
    assert any(r["phase"] == "train" for r in records) and any(r["phase"] == "timing" for r in records)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["max_steps"] == 4 and cfg["output"]["dir"] == str(out)
    pq = json.loads((out / "per_query.json").read_text())
    assert len(pq["before"]) == len(pq["after"]) == m["after"]["n_queries"]
    # the saved model loads in sentence-transformers and gives our embeddings
    from sentence_transformers import SentenceTransformer

    from contrastkit.models import TextEncoder

    texts = ["what about protein 3?", "we measured gene and cell in patients 7"]
    ours = TextEncoder(str(out / "model"), max_length=None).encode(texts)
    theirs = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "95% CI" in printed


def test_two_towers_are_saved_and_evaluated_each_on_its_side(tiny, tmp_path, capsys):
    data, model = tiny
    out = tmp_path / "run"
    assert main(_args(data, model, out, "--max-steps", "4", "--no-interpolation", "--set", "data.sts=false",
                      "--set", "model.separate_towers=true")) == 0
    m = json.loads((out / "metrics.json").read_text())
    from safetensors.torch import load_file

    q = load_file(str(out / "model" / "query" / "model.safetensors"))
    d = load_file(str(out / "model" / "document" / "model.safetensors"))
    assert max(float((q[k] - d[k]).abs().max()) for k in q) > 1e-4, "the two towers must have trained apart"
    capsys.readouterr()
    # eval on the run's model/ encodes queries with query/ and the corpus with document/: the
    # run's own test figures (the tiny texts are shorter than every token limit; fp32 both)
    assert main(["eval", str(out / "model"), "--data", str(data), "--output", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["two_towers"] and e["retrieval"]["ndcg@10"] == pytest.approx(m["after"]["ndcg@10"], abs=1e-6)
    # one tower alone is evaluated, with a warning that it encodes both sides
    assert main(["eval", str(out / "model" / "query"), "--data", str(data)]) == 0
    assert "one tower of the two-tower model" in capsys.readouterr().err


def test_the_test_split_is_never_trained_on(tiny, tmp_path):
    from contrastkit.recipes.retrieval_task import build_retrieval_task
    from contrastkit.training.config import load_config

    data, _ = tiny
    task = build_retrieval_task(load_config(overrides=[f"data.source={data}", "data.dev_fraction=0.25"]).data)
    train_q = {e.query_id for e in task.train_examples}
    assert not train_q & set(task.test_qrels) and not train_q & set(task.dev_qrels)
    assert set(task.dev_qrels) <= set(load_beir_train(data))


def load_beir_train(data):
    from contrastkit.data import load_beir

    return load_beir(data).load_qrels("train")


@pytest.mark.parametrize("memory_steps", [0, 2])   # 2: the cross-batch memory is part of the checkpoint
def test_resume_gives_the_same_final_weights(tiny, tmp_path, memory_steps):
    from safetensors.torch import load_file

    data, model = tiny
    common = ["--max-steps", "6", "--no-interpolation", "--set", "data.sts=false",
              "--set", "train.checkpoint_every=1", "--set", f"negatives.memory_steps={memory_steps}"]
    assert main(_args(data, model, tmp_path / "full", *common)) == 0
    # a run that is killed after its step-3 checkpoint, then resumed
    run_killed_after_checkpoint(_args(data, model, tmp_path / "part", *common), step=3)
    assert main(_args(data, model, tmp_path / "part", *common, "--resume")) == 0
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_existing_run_folder_is_refused_and_config_errors_are_named(tiny, tmp_path, capsys):
    data, model = tiny
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_args(data, model, out, "--max-steps", "1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["train", "--set", "batching.sampler=magic"]) == 2
    assert "batching.sampler: 'magic' is not allowed; allowed values: no_duplicates, random, b3" in \
        capsys.readouterr().err
    assert main(_args(data, model, tmp_path / "x", "--objective", "NoSuchLoss", "--max-steps", "1")) == 2
    assert "objective.name: 'NoSuchLoss'" in capsys.readouterr().err


def test_docs_table_lists_every_config_field():
    from contrastkit.training.config import describe_fields

    page = (Path(__file__).resolve().parents[1] / "docs" / "main-job.md").read_text()
    missing = [name for name, *_ in describe_fields() if f"| `{name}` |" not in page]
    assert not missing, f"docs/main-job.md lacks the fields {missing}: paste fields_markdown()'s output"


def test_pairs_file_and_corpus_only_runs(tiny, tmp_path, capsys, monkeypatch):
    from contrastkit.recipes.common import ExampleBatches

    data, model = tiny
    seen = []  # the (query, negatives) of every example handed to training
    original_iter = ExampleBatches.__iter__

    def spy(self):
        for batch in original_iter(self):
            seen.extend((e.query, e.negatives) for e in batch)
            yield batch

    monkeypatch.setattr(ExampleBatches, "__iter__", spy)
    # a triplets file with one malformed line, skipped and counted
    lines = [json.dumps({"query": f"what about protein {i}?", "positive": f"protein study {i} results",
                         "negative": f"unrelated note {i}"}) for i in range(40)]
    lines.insert(5, "{not json")
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs"
    args = _args(tmp_path / "t.jsonl", model, out, "--max-steps", "2", "--set", "data.sts=false")
    assert main(args) == 2
    assert "t.jsonl:6" in capsys.readouterr().err
    assert main(args + ["--skip-bad-records", "--overwrite"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_split"] == "held-out share" and any("skipped 1" in n for n in m["notes"])
    # the file's negatives are the user's: trained on as given, nothing mined over them
    assert "mining" not in m and m["negatives_brought"]["short"] == 0
    assert seen and all(negs == (f"unrelated note {q.split()[-1][:-1]}",) for q, negs in seen)
    seen.clear()
    # a pairs file with two negatives per row, one asked: the first; three asked: mined after the two
    rows = [json.dumps({"query": f"what about protein {i}?", "positive": f"protein study {i} results",
                        "negative_1": f"unrelated note {i}", "negative_2": f"another note {i}"}) for i in range(40)]
    (tmp_path / "t2.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "pairs3"
    assert main(_args(tmp_path / "t2.jsonl", model, out, "--max-steps", "2", "--set", "data.sts=false",
                      "--set", "negatives.num_negatives=3", "--set", "batching.sampler=random")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["negatives_brought"]["short"] == m["negatives_brought"]["examples"] > 0 and "mining" in m
    for q, negs in seen:
        i = q.split()[-1][:-1]
        assert negs[:2] == (f"unrelated note {i}", f"another note {i}") and len(negs) == 3
        assert negs[2] not in negs[:2]
    seen.clear()
    # corpus only (Contriever crops), evaluated on the folder's qrels
    out = tmp_path / "crops"
    assert main(_args(data, model, out, "--max-steps", "2", "--format", "corpus", "--set", "data.sts=false")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "after" in m and "mining" not in m and any("independent crops" in n for n in m["notes"])
    # what needs the crops' base-model embeddings is refused before anything is encoded
    capsys.readouterr()
    for extra, field in ((("--set", "batching.sampler=b3"), "batching.sampler: b3"),
                         (("--set", "negatives.guide_mask=true"), "negatives.guide_mask")):
        assert main(_args(data, model, tmp_path / "refused", "--max-steps", "2", "--format", "corpus", *extra)) == 2
        err = capsys.readouterr()
        assert field in err.err and "crops of data.format: corpus are not encoded" in err.err
        assert "encode corpus" not in err.out + err.err


def test_negative_pool_gives_each_epoch_its_own_set_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    # negatives.pool_size=2: 2 x num_negatives are mined per example; epoch e trains on
    # set e mod 2; 8 steps span several epochs and the kill after step 5 lands mid-epoch
    from safetensors.torch import load_file

    from contrastkit.recipes.common import ExampleBatches

    data, model = tiny
    common = ["--max-steps", "8", "--no-interpolation", "--set", "data.sts=false", "--set", "train.eval_every=100",
              "--set", "train.checkpoint_every=1", "--set", "negatives.pool_size=2",
              "--set", "negatives.num_negatives=1"]
    seen = []  # (epoch, {query id: negative ids}) of every batch handed to training
    original_iter = ExampleBatches.__iter__

    def spy(self):
        for batch in original_iter(self):
            seen.append((self.epoch, {e.query_id: e.negative_ids for e in batch}))
            yield batch

    monkeypatch.setattr(ExampleBatches, "__iter__", spy)
    assert main(_args(data, model, tmp_path / "full", *common)) == 0
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert m["mining"]["num_negatives"] == 2 and m["train"]["steps"] == 8    # the pool was mined
    by_epoch = {}
    for epoch, ids in seen[:8]:
        by_epoch.setdefault(epoch, {}).update(ids)
    assert {0, 1, 2} <= set(by_epoch)
    assert all(len(ids) == 1 for ep in by_epoch.values() for ids in ep.values())
    both = set(by_epoch[0]) & set(by_epoch[1])
    assert len(both) >= 8
    assert all(by_epoch[0][q] != by_epoch[1][q] for q in both)               # a fresh negative in epoch 1
    assert all(by_epoch[2][q] == by_epoch[0][q] for q in set(by_epoch[2]) & set(by_epoch[0]))  # set 0 again
    full_batches = seen[:8]

    seen.clear()
    run_killed_after_checkpoint(_args(data, model, tmp_path / "part", *common), step=5)
    assert main(_args(data, model, tmp_path / "part", *common, "--resume")) == 0
    assert seen[:5] + seen[-3:] == full_batches                             # the same batches and negatives
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_example_batches_rotate_a_pool_of_negatives():
    from contrastkit.data import Example
    from contrastkit.recipes.common import ExampleBatches

    class Fixed:
        def __init__(self):
            self.epoch = None

        def set_epoch(self, e):
            self.epoch = e

        def __len__(self):
            return 1

        def __iter__(self):
            return iter([[0, 1]])

    ex = [Example("q", "p", negatives=("a", "b", "c", "d"), negative_ids=("1", "2", "3", "4")),
          Example("r", "s", negatives=("e", "f"), negative_ids=("5", "6"))]
    batches = ExampleBatches(Fixed(), ex, num_negatives=2)
    got = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        got.append([(e.negatives, e.negative_ids) for e in next(iter(batches))])
    assert got[0] == [(("a", "b"), ("1", "2")), (("e", "f"), ("5", "6"))]
    assert got[1] == [(("c", "d"), ("3", "4")), (("e", "f"), ("5", "6"))]   # a pool of one set stays
    assert got[2] == got[0]
    with pytest.raises(ValueError, match="example 'q' holds 3 negatives.*multiple of num_negatives=2"):
        ExampleBatches(Fixed(), [Example("q", "p", negatives=("a", "b", "c"))], num_negatives=2)


def test_negative_pool_size_must_be_positive():
    from contrastkit.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="negatives.pool_size"):
        load_config(overrides=["negatives.pool_size=0"])


def test_memory_columns_are_the_last_steps_documents_with_known_positives_masked(tiny):
    # negatives.memory_steps (XBM): step 2's candidates are its own [positives, negatives] and
    # step 1's documents; a remembered document that is a known positive of the anchor's
    # query is masked. Loss and every parameter gradient against a float64 autograd reference.
    import torch.nn.functional as F

    import contrastkit as ck
    from contrastkit.data import Example
    from contrastkit.models import TextEncoder
    from contrastkit.recipes.text_steps import RetrievalStep

    _, model = tiny
    enc = TextEncoder(str(model), normalize=True, max_length=16).double().eval()   # eval: no dropout

    def ex(i):
        return Example(f"query number {i}", f"document about topic {i}", (f"unrelated text {i} here",),
                       query_id=f"q{i}", positive_id=f"d{i}", negative_ids=(f"n{i}",))

    b1, b2 = [ex(i) for i in range(4)], [ex(i) for i in (2, 3, 4, 5)]
    known = {f"q{i}": {f"d{i}"} for i in range(6)}
    known["q4"] = {"d4", "d0"}                       # d0, remembered from step 1, is also relevant to q4
    step = RetrievalStep(query_encoder=enc, objective=ck.losses.MultipleNegativesRanking(temperature=0.05),
                         query_max_length=16, doc_max_length=16, chunk_size=3, known_positives=known, memory_steps=1)
    def embed(texts):
        return enc(**step._tokens(enc, texts, 16))

    step(b1)
    with torch.no_grad():                            # step 1's documents, encoded on their own: d0..d3, n0..n3
        memory = torch.cat([embed([e.positive for e in b1]), embed([e.negatives[0] for e in b1])])
    assert len(step.memory) == 1 and step.memory[0][1] == [["d0", "d1", "d2", "d3", "n0", "n1", "n2", "n3"]]
    torch.testing.assert_close(step.memory[0][0], memory, rtol=0, atol=1e-12)
    enc.zero_grad()
    loss = step(b2)
    got = [None if p.grad is None else p.grad.clone() for p in enc.parameters()]
    assert sum(g is not None for g in got) > 10

    enc.zero_grad()
    q = embed([e.query for e in b2])
    cands = torch.cat([embed([e.positive for e in b2]), embed([e.negatives[0] for e in b2]), memory])
    cols = ["d2", "d3", "d4", "d5", "n2", "n3", "n4", "n5", "d0", "d1", "d2", "d3", "n0", "n1", "n2", "n3"]
    logits = F.normalize(q, dim=-1) @ F.normalize(cands, dim=-1).T / 0.05
    keep = torch.ones_like(logits, dtype=torch.bool)
    for i, e in enumerate(b2):
        for j, c in enumerate(cols):
            if j != i and c in known[e.query_id] | {e.positive_id}:
                keep[i, j] = False
    assert (~keep).sum() == 3                        # d2 and d3 remembered for q2 / q3, d0 for q4
    want = (torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits.diagonal()).mean()
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=0)
    for g, p in zip(got, enc.parameters()):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-12)
    unmasked = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    assert abs(float(unmasked.detach()) - float(want.detach())) > 1e-3  # the masks matter here: the test can tell


def test_memory_needs_document_ids(tiny):
    import contrastkit as ck
    from contrastkit.data import Example
    from contrastkit.models import TextEncoder
    from contrastkit.recipes.text_steps import RetrievalStep

    _, model = tiny
    enc = TextEncoder(str(model), normalize=True, max_length=16)
    step = RetrievalStep(query_encoder=enc, objective=ck.losses.MultipleNegativesRanking(), query_max_length=16,
                         doc_max_length=16, chunk_size=4, memory_steps=2)
    with pytest.raises(ValueError, match="memory_steps needs document ids"):
        step([Example("a query", "a doc"), Example("b query", "b doc")])
    with pytest.raises(ValueError, match="memory_steps must be >= 0"):
        RetrievalStep(query_encoder=enc, objective=ck.losses.MultipleNegativesRanking(), query_max_length=16,
                      doc_max_length=16, chunk_size=4, memory_steps=-1)


def test_memory_config_errors_name_the_field(tiny, tmp_path, capsys):
    data, model = tiny
    assert main(_args(data, model, tmp_path / "a", "--max-steps", "2", "--set", "data.sts=false",
                      "--set", "negatives.memory_steps=2", "--objective", "InfoNCE")) == 2
    err = capsys.readouterr().err
    assert "negatives.memory_steps" in err and "MultipleNegativesRanking" in err


def test_layer_decay_and_weight_average_reach_the_main_job(tiny, tmp_path):
    # the same seeded run with and without each option: each changes the kept model, and the
    # resolved config records it
    from safetensors.torch import load_file

    data, model = tiny
    common = ["--max-steps", "3", "--set", "data.sts=false", "--set", "interpolation.enabled=false"]

    def weights(name, *extra):
        out = tmp_path / name
        assert main(_args(data, model, out, *common, *extra)) == 0
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        files = sorted((out / "model").rglob("*.safetensors"))
        return cfg, {k: v for f in files for k, v in load_file(str(f)).items()}

    _, plain = weights("plain")
    cfg, decayed = weights("decayed", "--set", "optim.layer_decay=0.5")
    assert cfg["optim"]["layer_decay"] == 0.5
    cfg, averaged = weights("averaged", "--set", "optim.ema_decay=0.5")
    assert cfg["optim"]["ema_decay"] == 0.5
    _, again = weights("again")
    for k in plain:  # the run is deterministic, so a difference is the option's
        torch.testing.assert_close(plain[k], again[k], rtol=0, atol=0)
    emb = next(k for k in plain if "word_embeddings" in k)
    assert not torch.equal(plain[emb], decayed[emb])
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)


@pytest.mark.parametrize("objective, extra", [
    ("InfoNCE", ()),
    ("DCL", ()),
    ("HardNegativeContrastive", ("--set", "objective.options={beta: 1.0, tau_plus: 0.05}")),
    ("SigLIP", ("--set", "objective.learn_temperature=true")),
    ("NTXent", ("--set", "negatives.num_negatives=0", "--set", "negatives.mask_duplicates=false")),
    ("AlignUniform", ("--set", "negatives.num_negatives=0", "--set", "negatives.mask_duplicates=false")),
])
def test_every_column_objective_trains_in_the_main_job(tiny, tmp_path, objective, extra):
    # the default masks (duplicate positives) and one mined negative reach every objective
    # that takes them, through the one column layout (objectives.columns)
    data, model = tiny
    out = tmp_path / objective
    assert main(_args(data, model, out, "--max-steps", "2", "--objective", objective, "--set", "data.sts=false",
                      *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["steps"] == 2 and 0.0 <= m["after"]["ndcg@10"] <= 1.0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["phase"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("extra, message", [
    (("--objective", "SupCon"), "objective.name: SupCon does not take (query, positive, negatives) batches"),
    (("--objective", "NTXent"), "negatives.num_negatives: NTXent takes (query, positive) pairs and no hard negatives"),
    (("--objective", "NTXent", "--set", "negatives.num_negatives=0"),
     "negatives.mask_duplicates: NTXent takes no false-negative masks"),
    (("--objective", "AlignUniform", "--set", "objective.learn_temperature=true"),
     "objective.learn_temperature: AlignUniform has no temperature to learn"),
])
def test_an_objective_that_does_not_fit_is_a_config_error_before_encoding(tiny, tmp_path, capsys, extra, message):
    data, model = tiny
    assert main(_args(data, model, tmp_path / "x", "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr()
    assert message in err.err
    assert "encode corpus" not in err.out + err.err


def test_train_file_of_mined_records_trains_on_them_and_evaluates_on_the_folder(tiny, tmp_path, capsys, monkeypatch):
    """`contrastkit mine` then `train --set data.train_file=...`: the file's records (by id)
    are the training examples with their negatives, texts from the folder; dev and test
    queries' records are left out; the test numbers are the folder's test split."""
    from contrastkit.recipes.common import ExampleBatches
    from contrastkit.recipes.retrieval_task import build_retrieval_task
    from contrastkit.training.config import load_config

    data, model = tiny
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--data", str(data), "--model", str(model), "--output", str(mined), "--num-negatives", "2",
                 "--rank-window", "0", "10", "--relative-margin", "none"]) == 0
    records = {json.loads(x)["query_id"]: json.loads(x) for x in mined.read_text().splitlines()}
    seen = []
    original_iter = ExampleBatches.__iter__

    def spy(self):
        for batch in original_iter(self):
            seen.extend(batch)
            yield batch

    monkeypatch.setattr(ExampleBatches, "__iter__", spy)
    out = tmp_path / "run"
    assert main(_args(data, model, out, "--max-steps", "3", "--set", "data.sts=false", "--set", f"data.train_file={mined}",
                      "--set", "negatives.num_negatives=2", "--set", "batching.sampler=random")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_split"] == "test" and "mining" not in m and m["negatives_brought"]["short"] == 0
    task = build_retrieval_task(load_config(overrides=[f"data.source={data}", "data.dev_fraction=0.25"]).data)
    assert seen and {e.query_id for e in seen} <= {e.query_id for e in task.train_examples}
    for e in seen:   # the file's negatives, by id, with the folder's texts
        assert list(e.negative_ids) == records[e.query_id]["negative_ids"] and e.positive_id == records[e.query_id]["positive_id"]
    # a record naming a document the folder does not have: file and line
    lines = mined.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["negative_ids"] = ["nope", bad["negative_ids"][1]]
    lines[2] = json.dumps(bad)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(_args(data, model, tmp_path / "bad", "--set", f"data.train_file={tmp_path / 'bad.jsonl'}")) == 2
    assert "bad.jsonl:3: document id 'nope' is not in" in capsys.readouterr().err
    # only with a BEIR source
    assert main(_args(tmp_path / "bad.jsonl", model, tmp_path / "x", "--set", f"data.train_file={mined}")) == 2
    assert "data.train_file: training records by the ids of a BEIR folder" in capsys.readouterr().err
