"""SimCSE recipe (``contrastkit train --recipe simcse``): data, the dropout views, the
step against a naive float64 reference, and end-to-end runs on a tiny BERT.

The end-to-end runs use small slices of the bundled STS-B (a few training sentences, a
few dozen dev / test pairs) so that they take seconds; the slicing is the only thing
patched."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import contrastkit.recipes.simcse as simcse
from contrastkit.cli import main
from contrastkit.data import Example, data_dir, load_sts
from contrastkit.data.sts import StsData
from contrastkit.losses import MultipleNegativesRanking
from contrastkit.models import TextEncoder
from contrastkit.recipes.simcse import (build_simcse_step, load_simcse_data, stsb_sentences, supervised_examples,
                                        unsupervised_examples)
from contrastkit.training.config import ConfigError, load_config
from main_job_fixtures import make_tiny_model

SENTENCES = ["a man is playing a guitar", "a woman slices an onion", "the cat sleeps on the mat",
             "two dogs run in a field of snow", "a plane is taking off", "it is raining in the city today",
             "children play football", "an old man reads the newspaper on a bench"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("simcse") / "model")


@pytest.fixture
def encoder(tiny_model):
    torch.manual_seed(0)
    return TextEncoder(str(tiny_model), normalize=True, max_length=32)


class Recorder(torch.nn.Module):
    """The objective with the embeddings it was given kept (detached) for inspection."""

    def __init__(self, objective):
        super().__init__()
        self.objective, self.seen = objective, []

    def forward(self, *embs, **kwargs):
        self.seen.append([e.detach().clone() for e in embs])
        return self.objective(*embs, **kwargs)


def naive_mnrl(anchors, candidates, temperature, drop=None):
    """Float64 MNRL: anchor i against every candidate column, its positive is column i;
    ``drop`` (bool, N x M) leaves entries out of the denominator."""
    a = F.normalize(anchors.double(), dim=-1)
    c = F.normalize(candidates.double(), dim=-1)
    logits = a @ c.T / temperature
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    return F.cross_entropy(logits, torch.arange(a.shape[0]))


# -- data -----------------------------------------------------------------------------------

def test_stsb_sentences_are_the_distinct_train_sentences_of_both_columns():
    lines = (data_dir() / "stsbenchmark" / "sts-train.csv").read_text(encoding="utf-8").splitlines()
    naive, seen = [], set()
    for line in lines:
        if not line.strip():
            continue
        cols = line.split("\t")
        for s in (cols[5].strip(), cols[6].strip()):
            if s not in seen:
                seen.add(s)
                naive.append(s)
    got = stsb_sentences("train")
    assert got == naive
    assert len(got) == len(set(got)) > len(load_sts("train"))  # both columns, no duplicate


def test_unsupervised_examples_are_two_identical_views_without_duplicates():
    ex = unsupervised_examples(["x", "y", "x", "  "], prefix="p: ")
    assert [(e.query, e.positive, e.negatives) for e in ex] == [("p: x", "p: x", ()), ("p: y", "p: y", ())]
    with pytest.raises(ValueError, match="single str"):
        unsupervised_examples("a sentence")
    with pytest.raises(ValueError, match="sentence 1 is int"):
        unsupervised_examples(["a", 3])


def test_supervised_examples_layout_ids_and_negative_counts():
    rows = [Example("a", "b", ("c", "c2"), source="f.jsonl:1"), Example("a", "d", ("e", "e2"), source="f.jsonl:2"),
            Example("x", "b", ("y", "y2"), source="f.jsonl:3")]
    d = supervised_examples(rows, num_negatives=1, query_prefix="q: ", document_prefix="d: ")
    assert d.supervised and d.num_negatives == 1
    assert [(e.query, e.positive, e.negatives) for e in d.examples] == [
        ("q: a", "d: b", ("d: c",)), ("q: a", "d: d", ("d: e",)), ("q: x", "d: b", ("d: y",))]
    # same text, same id; the anchor "a" knows both of its positives
    assert d.examples[0].query_id == d.examples[1].query_id and d.examples[0].positive_id == d.examples[2].positive_id
    assert d.known_positives[d.examples[0].query_id] == {d.examples[0].positive_id, d.examples[1].positive_id}
    assert any("keep their first 1" in n for n in d.notes)
    pairs = supervised_examples([Example("a", "b"), Example("c", "d")], num_negatives=1)
    assert pairs.num_negatives == 0 and any("in-batch negatives only" in n for n in pairs.notes)
    with pytest.raises(ConfigError, match=r"f\.jsonl:2 has 0"):
        supervised_examples([Example("a", "b", ("c",), source="f.jsonl:1"), Example("d", "e", source="f.jsonl:2")],
                            num_negatives=1)


def test_load_simcse_data_sources(tmp_path):
    cfg = load_config(overrides=["data.source=stsb", "data.max_train_examples=5"]).data
    d = load_simcse_data(cfg)
    assert not d.supervised and len(d.examples) == 5 and d.examples[0].query == stsb_sentences()[0]
    txt = tmp_path / "corpus.txt"
    txt.write_text("first text\n\nsecond text\nfirst text\n")
    d = load_simcse_data(load_config(overrides=[f"data.source={txt}"]).data)
    assert [e.query for e in d.examples] == ["first text", "second text"] and not d.supervised
    jl = tmp_path / "corpus.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    d = load_simcse_data(load_config(overrides=[f"data.source={jl}", "data.format=corpus"]).data)
    assert [e.query for e in d.examples] == ["one", "two"]
    with pytest.raises(ConfigError, match="format=corpus"):
        load_simcse_data(load_config(overrides=["data.source=scifact"]).data)
    with pytest.raises(ConfigError, match="data.format"):
        load_simcse_data(load_config(overrides=["data.source=stsb", "data.format=pairs"]).data)
    with pytest.raises(ConfigError, match="not a file"):
        load_simcse_data(load_config(overrides=[f"data.source={tmp_path / 'missing.jsonl'}"]).data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a", "positive": "b"}) + "\n" + json.dumps({"query": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_simcse_data(load_config(overrides=[f"data.source={bad}"]).data)


# -- the dropout views and the step ----------------------------------------------------------

def test_the_two_views_differ_in_train_mode_and_match_in_eval_mode(encoder):
    """Chunks of 3 rows: the first chunks are re-encoded in backward, the last one is kept
    with its graph (both code paths of GradCache)."""
    chunk_size = 3
    rec = Recorder(MultipleNegativesRanking(temperature=0.05))
    step = build_simcse_step(encoder, rec, max_length=32, chunk_size=chunk_size)
    batch = unsupervised_examples(SENTENCES)
    encoder.train()
    step(batch)
    a, p = rec.seen[-1]
    assert a.shape == p.shape == (len(SENTENCES), 32)
    # every row's two views differ (independent dropout masks), by much more than rounding
    assert bool(((a - p).norm(dim=1) > 1e-3).all()), (a - p).norm(dim=1)
    # ... but they are two noisy views of the same sentence: closer to each other than to other sentences
    sim = a @ p.T
    assert bool((sim.diagonal() > sim.masked_fill(torch.eye(len(a), dtype=torch.bool), -2).max(1).values).all())
    encoder.eval()
    step(batch)
    a, p = rec.seen[-1]
    torch.testing.assert_close(a, p, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, encoder.encode(SENTENCES, max_length=32), atol=1e-5, rtol=1e-4)


def test_gradient_cached_step_equals_a_plain_float64_step_with_the_same_dropout(encoder):
    """The recipe's step (chunks, RNG replay) gives the loss and the parameter gradients of
    encoding the same chunks with autograd (same RNG stream) and a naive float64 InfoNCE."""
    chunk_size = 3
    t = 0.05
    step = build_simcse_step(encoder, MultipleNegativesRanking(temperature=t), max_length=32, chunk_size=chunk_size)
    batch = unsupervised_examples(SENTENCES)
    params = [p for p in encoder.parameters() if p.requires_grad]
    encoder.train()
    torch.manual_seed(123)
    loss = step(batch)
    cached = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    encoder.zero_grad(set_to_none=True)
    # the plain reference: the same chunks, in the same order, from the same seed, with autograd
    torch.manual_seed(123)
    tokens = encoder.tokenizer(SENTENCES, padding=True, truncation=True, max_length=32, return_tensors="pt")
    tokens = dict(tokens)
    gc = step.cache
    views = []
    for group in range(2):
        parts = [(idx, gc.encode(group, tokens, idx)) for idx in gc.plan(tokens)]
        views.append(torch.cat([e for _, e in parts])[torch.argsort(torch.cat([i for i, _ in parts]))])
    ref = naive_mnrl(views[0], views[1], t)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ref) and float(ref.detach()) > 0
    for p, g in zip(params, cached):
        ref_g = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, ref_g, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().max()) > 0 for g in cached)


def test_supervised_step_is_mnrl_with_hard_negatives_and_masks_known_positives(encoder):
    rows = [Example("a man plays guitar", "someone makes music", ("nobody plays",)),
            Example("a man plays guitar", "a guitar is played", ("the man is silent",)),
            Example("a dog runs", "an animal moves", ("the dog sleeps",)),
            Example("it rains", "the weather is wet", ("it is sunny",))]
    d = supervised_examples(rows, num_negatives=1)
    rec = Recorder(MultipleNegativesRanking(temperature=0.05))
    step = build_simcse_step(encoder, rec, max_length=32, chunk_size=2, known_positives=d.known_positives)
    encoder.eval()  # no dropout: the embeddings are what encode() gives
    loss = step(d.examples)
    a, p, n = rec.seen[-1]
    torch.testing.assert_close(a, encoder.encode([e.query for e in d.examples], max_length=32), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(n, encoder.encode([e.negatives[0] for e in d.examples], max_length=32),
                               atol=1e-5, rtol=1e-4)
    # anchors 0 and 1 are the same text: each one's positive is a known positive of the other, masked out
    drop = torch.zeros(4, 8, dtype=torch.bool)
    drop[0, 1] = drop[1, 0] = True
    expected = naive_mnrl(a, torch.cat([p, n]), 0.05, drop)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert abs(float(expected) - float(naive_mnrl(a, torch.cat([p, n]), 0.05))) > 1e-4  # the mask matters here


# -- end to end through the command line ---------------------------------------------------

@pytest.fixture
def small_sts(monkeypatch):
    """STS-B slices: 12 train pairs (about 24 sentences), 40 dev and 40 test pairs."""
    sizes = {"train": 12, "dev": 40, "test": 40}

    def small(split="test", path=None):
        full = load_sts(split, path)
        k = sizes[split]
        return StsData(full.sentences1[:k], full.sentences2[:k], full.scores[:k], full.genres[:k], full.path)

    monkeypatch.setattr(simcse, "load_sts", small)
    return sizes


def _args(model, out, *extra):
    return ["train", "--recipe", "simcse", "--model", str(model), "--output", str(out), "--batch-size", "6",
            "--chunk-size", "4", "--lr", "1e-3", "--precision", "fp32", "--max-steps", "3",
            "--set", "model.query_max_length=24", "--set", "train.encode_batch_size=16",
            "--set", "train.eval_every=2", "--set", "interpolation.alphas=[0.5, 1.0]", *extra]


def test_unsupervised_run_writes_the_run_folder(tiny_model, small_sts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, out, "--data", "stsb")) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("before", "after", "dev", "train", "phases", "wall_seconds", "sts"):
        assert key in m, key
    for side in ("before", "after"):
        assert set(m[side]) >= {"spearman", "pearson"} and m[side]["n"] == small_sts["test"]
        assert -1.0 <= m[side]["spearman"] <= 1.0
    assert m["mode"] == "unsupervised" and m["train"]["steps"] == 3 and m["train"]["num_negatives"] == 0
    assert m["dev"]["metric"] == "spearman" and m["dev"]["pairs"] == small_sts["dev"]
    assert m["dev"]["best_step"] in (2, 3)
    assert m["dev"]["interpolation"]["chosen_alpha"] in (0.5, 1.0)
    assert m["train"]["examples"] == len(stsb_sentences("train"))  # the patched 12 pairs' distinct sentences
    assert set(m["phases"]) >= {"load", "before", "train", "interpolate", "after"}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "dev"] == [0, 2, 3]
    assert all("spearman" in r for r in records if r["phase"] == "dev")
    assert any(r["phase"] == "train" for r in records) and any(r["phase"] == "timing" for r in records)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["recipe"] == "simcse" and cfg["data"]["source"] == "stsb" and cfg["optim"]["max_steps"] == 3
    # the saved model is the chosen one: its STS-B test numbers are the "after" numbers
    saved = TextEncoder(str(out / "model"), max_length=24)
    from contrastkit.evaluation import evaluate_sts

    again = evaluate_sts(lambda t: saved.encode(t), simcse.load_sts("test"))
    assert again["spearman"] == pytest.approx(m["after"]["spearman"], abs=1e-4)
    assert "STS-B" in capsys.readouterr().out


def test_supervised_run_from_a_jsonl_file(tiny_model, small_sts, tmp_path):
    data = tmp_path / "nli.jsonl"
    rows = [{"anchor": f"sentence number {i} about {w}", "entailment": f"a text on {w} {i}",
             "contradiction": f"nothing about {w}, {i}"}
            for i, w in enumerate(["music", "dogs", "rain", "cats", "trains", "food", "sports", "books"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(_args(tiny_model, out, "--data", str(data), "--set", "data.query_column=anchor",
                      "--set", "data.positive_column=entailment",
                      "--set", "data.negative_columns=[contradiction]", "--no-interpolation", "--max-steps", "2",
                      "--set", "output.report=false")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "supervised" and m["train"]["num_negatives"] == 1 and m["train"]["examples"] == 8
    assert m["train"]["steps"] == 2 and "spearman" in m["after"]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "modules.json").is_file()


def test_config_errors_exit_with_code_2(tiny_model, small_sts, tmp_path, capsys):
    assert main(_args(tiny_model, tmp_path / "a", "--data", "scifact")) == 2
    assert "format=corpus" in capsys.readouterr().err
    assert main(_args(tiny_model, tmp_path / "b", "--data", "stsb", "--set", "model.separate_towers=true")) == 2
    assert "separate_towers" in capsys.readouterr().err
    assert main(_args(tiny_model, tmp_path / "c", "--data", "stsb", "--batch-size", "500")) == 2
    assert "batching.batch_size" in capsys.readouterr().err
    # options of the text_retrieval recipe that SimCSE would otherwise ignore: each one set is refused
    from contrastkit.recipes.simcse import UNREAD_FIELDS

    values = {"negatives.rank_window": "[2, 40]", "negatives.sampling": "random", "negatives.pool_size": "2",
              "negatives.relative_margin": "0.95", "negatives.absolute_margin": "0.1", "negatives.guide_mask": "true",
              "negatives.guide_margin": "0.1", "negatives.memory_steps": "2", "negatives.mine": "false",
              "data.sts": "false", "data.dev_fraction": "0.2", "data.train_split": "dev", "data.test_split": "dev",
              "evaluation.ks": "[5]", "evaluation.bootstrap_resamples": "100", "data.stream": "true",
              # fields without a reason of their own get the generic one
              "train.dev_document_max_length": "64", "train.dev_corpus_size": "100"}
    assert set(UNREAD_FIELDS) <= set(values)
    for i, (field, value) in enumerate(values.items()):
        assert main(_args(tiny_model, tmp_path / f"u{i}", "--data", "stsb", "--set", f"{field}={value}")) == 2
        err = capsys.readouterr().err
        assert f"{field}: " in err and "leave it at its default" in err, err
        assert UNREAD_FIELDS.get(field, "the simcse recipe does not read it") in err, err
    # set to its default it is no error (the run goes on: stopped here by a batch too large)
    assert main(_args(tiny_model, tmp_path / "v", "--data", "stsb", "--set", "negatives.rank_window=[0, 30]",
                      "--batch-size", "500")) == 2
    assert "batching.batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["NTXent", "DCL", "SigLIP"])
def test_unsupervised_simcse_with_other_objectives(tiny_model, small_sts, tmp_path, objective):
    # SimCSE's two views through the one column layout: NT-Xent is SimCLR's loss on them
    out = tmp_path / objective
    assert main(_args(tiny_model, out, "--data", "stsb", "--objective", objective, "--no-interpolation",
                      "--set", "output.report=false")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["steps"] == 3 and -1.0 <= m["after"]["spearman"] <= 1.0


def test_simcse_objective_that_does_not_fit_is_a_config_error(tiny_model, small_sts, tmp_path, capsys):
    assert main(_args(tiny_model, tmp_path / "a", "--data", "stsb", "--objective", "SupCon")) == 2
    assert "objective.name: SupCon does not take" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["no_duplicates", "random", "b3"])
def test_build_batches_covers_each_example_at_most_once_per_epoch_and_resumes(kind):
    from contrastkit.recipes.simcse import build_batches

    ex = unsupervised_examples([f"sentence {i}" for i in range(23)])
    calls = []

    def anchors(texts):  # a stand-in for the base model: 2-d points on a line
        calls.append(list(texts))
        return torch.stack([torch.tensor([1.0, float(i)]) for i in range(len(texts))])

    batches = build_batches(ex, kind=kind, batch_size=5, seed=3, anchor_embeddings=anchors)
    batches.set_epoch(0)
    got = [b for b in batches]
    assert all(len(b) == 5 for b in got) and len(got) == len(batches) == 4
    ids = [e.query for b in got for e in b]
    assert len(ids) == len(set(ids))
    assert calls == ([[e.query for e in ex]] if kind == "b3" else [])
    # resume in the middle of the epoch: the same remaining batches
    again = build_batches(ex, kind=kind, batch_size=5, seed=3, anchor_embeddings=anchors)
    again.set_epoch(0)
    it = iter(again)
    next(it)
    state = again.state_dict()
    resumed = build_batches(ex, kind=kind, batch_size=5, seed=3, anchor_embeddings=anchors)
    resumed.set_epoch(0)
    resumed.load_state_dict(state)
    assert [[e.query for e in b] for b in resumed] == [[e.query for e in b] for b in got[1:]]


def test_build_batches_errors():
    from contrastkit.recipes.simcse import build_batches

    ex = unsupervised_examples(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="anchor_embeddings"):
        build_batches(ex, kind="b3", batch_size=2)
    with pytest.raises(ConfigError, match="allowed values"):
        build_batches(ex, kind="bogus", batch_size=2)


def _record_config_reads(monkeypatch):
    """The config fields (``section.name``) that ``run_simcse`` reads, recorded while it runs
    (reads by ``dump_config``, which writes every field, are not reads of the recipe)."""
    import dataclasses

    from contrastkit.training.config import RunConfig

    reads, active = set(), []
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        cls, names = type(value), {f.name for f in dataclasses.fields(value)}
        original = cls.__getattribute__

        def getattribute(self, name, _original=original, _section=section.name, _names=names):
            if active and name in _names:
                reads.add(f"{_section}.{name}")
            return _original(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)
    run, dump = simcse.run_simcse, simcse.dump_config

    def recorded_run(*args, **kwargs):
        active.append(1)
        try:
            return run(*args, **kwargs)
        finally:
            active.clear()

    def quiet_dump(*args, **kwargs):
        saved = list(active)
        active.clear()
        try:
            return dump(*args, **kwargs)
        finally:
            active.extend(saved)

    monkeypatch.setattr(simcse, "run_simcse", recorded_run)
    monkeypatch.setattr(simcse, "dump_config", quiet_dump)
    return reads


def test_the_fields_simcse_declares_it_reads_are_the_fields_it_reads(tiny_model, small_sts, tmp_path, monkeypatch):
    """READS (what refuse_unread_fields lets through) is what an unsupervised and a
    supervised run read, no more and no less: a field it ignores cannot be set silently."""
    reads = _record_config_reads(monkeypatch)
    monkeypatch.setattr(simcse, "refuse_unread_fields", lambda *a, **k: None)  # it reads every field
    assert main(_args(tiny_model, tmp_path / "u", "--data", "stsb", "--set", "batching.sampler=random")) == 0
    data = tmp_path / "nli.jsonl"
    rows = [{"anchor": f"sentence number {i} about {w}", "entailment": f"a text on {w} {i}",
             "contradiction": f"nothing about {w}, {i}"} for i, w in enumerate(["cats", "dogs", "rain", "sun"] * 4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(_args(tiny_model, tmp_path / "s", "--data", str(data), "--set", "data.query_column=anchor",
                      "--set", "data.positive_column=entailment", "--set", "data.negative_columns=[contradiction]",
                      "--set", "negatives.num_negatives=1")) == 0
    # (a shared check reads negatives.memory_steps to refuse it for other objectives: refused here first)
    assert {r for r in reads if not r.startswith("output.")} - set(simcse.UNREAD_FIELDS) == set(simcse.READS)
    assert not set(simcse.READS) & set(simcse.UNREAD_FIELDS)
