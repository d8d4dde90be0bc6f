"""contrastkit bench dev on a tiny BEIR folder and a tiny BERT: dev-only records (the test
qrels are never read), one corpus encode shared by every run, resumability, the summary."""

import json

import pytest

import contrastkit.recipes.text_retrieval as tr
from contrastkit.bench import dev as bench_dev
from contrastkit.cli import main
from main_job_fixtures import make_beir, make_tiny_model

TINY = ["batching.batch_size=4", "batching.chunk_size=3", "optim.lr=1e-3", "train.precision=fp32",
        "model.query_max_length=16", "model.document_max_length=32", "train.dev_corpus_size=20",
        "data.dev_fraction=0.25", "negatives.rank_window=[0, 10]", "optim.max_steps=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchdev")
    return make_beir(root / "beir", n_queries=48), make_tiny_model(root / "model")


def _argv(data, model, results, *configs):
    argv = ["bench", "dev", "--results", str(results), "--seeds", "0", "1",
            "--set", f"data.source={data}", "--set", f"model.name={model}"]
    for o in TINY:
        argv += ["--set", o]
    for c in configs:
        argv += ["--config", *c]
    return argv


def test_bench_dev_sweeps_on_dev_only_with_one_corpus_encode(tiny, tmp_path, capsys, monkeypatch):
    data, model = tiny
    corpus_encodes, test_reads = [], []
    real_documents, real_test = tr.Encoders.documents, tr.evaluate_test

    def documents(self, texts, progress=None, max_length=None):
        if progress and "corpus" in progress:
            corpus_encodes.append(len(texts))
        return real_documents(self, texts, progress=progress, max_length=max_length)

    def evaluate_test(*a, **k):
        test_reads.append(1)
        return real_test(*a, **k)

    monkeypatch.setattr(tr.Encoders, "documents", documents)
    monkeypatch.setattr(tr, "evaluate_test", evaluate_test)
    results = tmp_path / "dev"
    assert main(_argv(data, model, results, ["ref"], ["hot", "optim.lr=3e-3"])) == 0
    out = capsys.readouterr().out
    recs = bench_dev.load_results(str(results))
    assert sorted(recs) == ["hot", "ref"] and all(len(v) == 2 for v in recs.values())
    assert corpus_encodes == [corpus_encodes[0]], "four runs, one corpus encode (the base model's, cached)"
    assert test_reads == [], "no test evaluation in a dev sweep"
    for name, rs in recs.items():
        for r in rs:
            assert 0.0 <= r["dev"]["chosen"] <= 1.0 and r["steps"] == 2 and r["metric"] == "ndcg@10"
            # the score is the one the run itself recorded for the model it kept
            m = json.loads((results / name / f"seed{r['seed']}" / "metrics.json").read_text())
            assert "before" not in m and "after" not in m and "sts" not in m
            interp = m["dev"]["interpolation"]
            assert r["dev"]["chosen"] == interp["scores"][interp["alphas"].index(interp["chosen_alpha"])]
    assert "optim.lr=3e-3" in recs["hot"][0]["overrides"]
    # the forgetting guard on STS-B dev: the kept model's Spearman, recomputed here from model/
    from contrastkit.training.config import load_config
    r = recs["hot"][1]
    cfg = load_config(overrides=[*r["overrides"], "train.seed=1"])
    assert r["sts_dev"]["kept"] == pytest.approx(bench_dev.sts_dev_spearman(str(results / "hot" / "seed1" / "model"), cfg))
    assert r["sts_dev"]["base"] == pytest.approx(bench_dev.sts_dev_spearman(str(model), cfg))
    assert r["sts_dev"]["kept"] != r["sts_dev"]["base"]
    # the summary: reference first, paired difference over both seeds
    assert "STS-B dev change" in out
    assert "| ref |" in out and "| hot |" in out and (results / "summary.png").is_file()
    diffs = [recs["hot"][i]["dev"]["chosen"] - recs["ref"][i]["dev"]["chosen"] for i in range(2)]
    assert f"{sum(diffs) / 2:+.4f}" in out
    # resumable: nothing runs again
    assert main(_argv(data, model, results, ["ref"], ["hot", "optim.lr=3e-3"])) == 0
    assert "done before, skipped" in capsys.readouterr().err and corpus_encodes == [corpus_encodes[0]]


def test_bench_dev_rejects_bad_configs(tiny, tmp_path, capsys):
    data, model = tiny
    assert main(_argv(data, model, tmp_path / "a")) == 2
    assert "at least one configuration" in capsys.readouterr().err
    assert main(_argv(data, model, tmp_path / "b", ["x"], ["x", "optim.lr=1e-4"])) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(_argv(data, model, tmp_path / "c", ["x", "optim.nope=1"])) == 2
    assert "optim.nope" in capsys.readouterr().err
