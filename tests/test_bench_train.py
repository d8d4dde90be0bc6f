"""contrastkit bench train end to end on a tiny BEIR folder and a tiny BERT: ours, the
sentence-transformers peer and one ablation each in its own subprocess, result files,
resumability (a second invocation runs nothing), the summary table and figure, --table-from."""

import json
import math
import time

import pytest

from contrastkit.cli import main
from main_job_fixtures import make_beir, make_tiny_model

# what makes one run take seconds (as tests/test_main_job.py::_args); batch 4: the peer's
# top-1 mined negatives of a random tiny model repeat too often to fill larger no-duplicate batches
TINY = ["batching.batch_size=4", "batching.chunk_size=3", "optim.lr=1e-3", "train.precision=fp32",
        "model.query_max_length=16", "model.document_max_length=32", "train.dev_corpus_size=20",
        "data.dev_fraction=0.25", "negatives.rank_window=[0, 10]", "evaluation.bootstrap_resamples=200",
        "data.sts=false", "output.report=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchtrain")
    return make_beir(root / "beir", n_queries=48), make_tiny_model(root / "model")


def _argv(data, model, results, *extra):
    argv = ["bench", "train", "--results", str(results), "--seeds", "0", "--max-steps", "2",
            "--data", str(data), "--model", str(model)]
    for o in TINY:
        argv += ["--set", o]
    return argv + list(extra)


def test_bench_train_runs_resumes_and_summarizes(tiny, tmp_path, capsys):
    data, model = tiny
    results = tmp_path / "bench"
    argv = _argv(data, model, results, "--only", "ours", "peer", "no-interpolation", "peer-report")
    assert main(argv) == 0
    out = capsys.readouterr()
    files = {p.relative_to(results).as_posix() for p in results.rglob("seed*.json")}
    assert files == {"ours/seed0.json", "peer/seed0.json", "no-interpolation/seed0.json", "peer-report/seed0.json"}
    # the peer producing ours' evidence: the same training (2 steps, no epoch end, so no dev
    # evaluation mid-training moves the random stream: the same after numbers), plus a before
    # phase whose numbers are ours' before numbers by sentence-transformers' evaluators
    report = json.loads((results / "peer-report" / "seed0.json").read_text())
    ours_before = json.loads((results / "ours" / "seed0" / "metrics.json").read_text())["before"]
    assert set(report["phases"]) == {"load", "before", "mine", "train", "after"}
    assert report["after"]["ndcg@10"] == pytest.approx(
        json.loads((results / "peer" / "seed0.json").read_text())["after"]["ndcg@10"], abs=1e-6)
    assert report["evidence"]["before"]["test"]["test_cosine_ndcg@10"] == pytest.approx(ours_before["ndcg@10"],
                                                                                        abs=1e-4)
    assert 0.0 <= report["evidence"]["dev_before"]["dev_cosine_ndcg@10"] <= 1.0
    recs = {name: json.loads((results / name / "seed0.json").read_text())
            for name in ("ours", "peer", "no-interpolation")}
    for name, r in recs.items():
        assert r["name"] == name and r["seed"] == 0
        assert 0.0 <= r["after"]["ndcg@10"] <= 1.0 and r["after"]["n_queries"] == 8
        assert r["wall_seconds"] > 0 and r["train"]["steps"] == 2
        assert "optim.max_steps=2" in r["overrides"] and "train.seed=0" in r["overrides"]
    # ours ran the real main job in its own run folder; the ablation's override reached it
    assert (results / "ours" / "seed0" / "metrics.json").is_file()
    assert "interpolation" in recs["ours"]["dev"] and "interpolation" not in recs["no-interpolation"]["dev"]
    assert "interpolation.enabled=false" in recs["no-interpolation"]["overrides"]
    # the peer: same task, tiny settings honoured, evaluated on the same test queries as ours
    peer = recs["peer"]
    assert peer["kind"] == "peer" and peer["precision"] == "fp32"
    assert peer["train"]["pairs"] == recs["ours"]["train"]["examples"]
    assert peer["per_query"]["query_ids"] == json.loads(
        (results / "ours" / "seed0" / "per_query.json").read_text())["query_ids"]
    assert set(peer["phases"]) == {"load", "mine", "train", "after"}
    assert (results / "peer" / "seed0" / "model" / "modules.json").is_file()
    # summary: markdown table with every configuration, the base row, ratios to the peer
    table = (results / "summary.md").read_text()
    assert (results / "summary.png").stat().st_size > 1000
    assert (results / "summary_time.png").stat().st_size > 1000
    main_table = table.split("Mean seconds per phase")[0]
    rows = {line.split("|")[1].strip(): line for line in main_table.splitlines() if line.startswith("| ")}
    assert {"base", "ours", "peer", "no-interpolation"} <= set(rows)
    assert "(one seed)" in rows["no-interpolation"] and "(one seed)" not in rows["ours"]
    cells = [c.strip() for c in rows["ours"].split("|")]
    assert float(cells[3]) == pytest.approx(recs["ours"]["after"]["ndcg@10"], abs=1e-4)
    ratio = recs["ours"]["after"]["ndcg@10"] / peer["after"]["ndcg@10"]
    assert float(cells[8]) == pytest.approx(ratio, abs=1e-3)
    assert [c.strip() for c in rows["peer"].split("|")][8:10] == ["1.000", "1.00"]
    diff = recs["ours"]["after"]["ndcg@10"] - peer["after"]["ndcg@10"]      # one seed: the paired mean
    assert cells[10].startswith(f"{diff:+.4f} [")
    assert table in out.out or rows["ours"] in out.out

    # resumable: a second invocation runs nothing and leaves every result file as it was
    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("seed*.json")}
    time.sleep(0.01)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("done before, skipped") == 4 and "running" not in err
    assert {p: p.stat().st_mtime_ns for p in results.rglob("seed*.json")} == stamps

    # a run that finished before the benchmark wrote its result file gives it without rerunning
    assert not list(results.rglob("_seed*"))        # the peer worker's own record became the result
    (results / "ours" / "seed0.json").unlink()
    (results / "peer" / "seed0.json").rename(results / "peer" / "_seed0.worker.json")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ours seed 0: result taken from its finished run folder" in err
    assert "peer seed 0: result taken from its finished worker" in err
    assert json.loads((results / "ours" / "seed0.json").read_text())["after"] == recs["ours"]["after"]
    assert json.loads((results / "peer" / "seed0.json").read_text())["after"] == peer["after"]

    # results made with other settings are never mixed in: refused before anything runs
    assert main(_argv(data, model, results, "--only", "ours", "--set", "optim.lr=2e-3")) == 2
    assert "ours/seed0.json was made with other settings" in capsys.readouterr().err
    # ... nor are results made under other defaults (same --set, another contrastkit version)
    done = results / "ours" / "seed0.json"
    original = done.read_text()
    record = json.loads(original)
    record["config"]["optim"]["epochs"] += 1.0
    done.write_text(json.dumps(record))
    assert main(argv) == 2
    assert "other defaults" in capsys.readouterr().err
    done.write_text(original)
    # the peer's results stay valid when only a field the peer never reads changed (ours'
    # interpolation grid), and are refused when one it reads changed
    peer_done = results / "peer" / "seed0.json"
    peer_original = peer_done.read_text()
    record = json.loads(peer_original)
    record["config"]["interpolation"]["alphas"] = [0.5, 1.0]
    record["config"]["train"]["dev_corpus_size"] += 1
    peer_done.write_text(json.dumps(record))
    assert main(argv) == 0
    assert "peer seed 0: done before, skipped" in capsys.readouterr().err
    record["config"]["optim"]["lr"] *= 2
    peer_done.write_text(json.dumps(record))
    assert main(argv) == 2
    assert "peer/seed0.json was made with other settings" in capsys.readouterr().err
    peer_done.write_text(peer_original)

    # --table-from prints the summary of what is there without running
    (results / "summary.md").unlink()
    assert main(["bench", "train", "--table-from", str(results)]) == 0
    printed = capsys.readouterr().out
    assert rows["ours"] in printed and (results / "summary.md").is_file()


def test_bench_train_rejects_unknown_names_and_bad_overrides(tmp_path, capsys):
    assert main(["bench", "train", "--results", str(tmp_path / "r"), "--only", "ours", "nope"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err
    assert main(["bench", "train", "--results", str(tmp_path / "r"), "--set", "batching.sampler=magic"]) == 2
    assert "batching.sampler: 'magic' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["bench", "train", "--table-from", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_summary_statistics_and_ratios(tmp_path):
    from contrastkit.bench.train import summarize, write_summary

    def rec(name, seed, ndcg, wall, sts=None, before=None):
        r = {"name": name, "seed": seed, "after": {"ndcg@10": ndcg}, "wall_seconds": wall, "phases": {"train": wall}}
        if sts is not None:
            r["sts"] = {"after": {"spearman": sts}, **({"before": {"spearman": 0.8}} if before else {})}
        if before is not None:
            r["before"] = {"ndcg@10": before}
        return r

    results = {"ours": [rec("ours", 0, 0.70, 100, 0.81, 0.60), rec("ours", 1, 0.74, 120, 0.83, 0.60)],
               "peer": [rec("peer", 0, 0.60, 50, 0.79), rec("peer", 1, 0.64, 70, 0.77)],
               "batch-128": [rec("batch-128", 0, 0.72, 90)]}
    # per-query scores of 4 test queries: ours beats the peer by 0.5 on two of them at both seeds
    for seed in (0, 1):
        results["ours"][seed]["per_query"] = {"query_ids": ["a", "b", "c", "d"], "after": [1.0, 1.0, 0.5, 0.0]}
        results["peer"][seed]["per_query"] = {"query_ids": ["a", "b", "c", "d"], "after": [0.5, 0.5, 0.5, 0.0]}
    rows = {r["name"]: r for r in summarize(results)}
    d = rows["ours"]["diff_vs_peer"]
    assert d["mean_diff"] == pytest.approx(0.25) and d["seeds"] == [0, 1]
    assert 0.0 <= d["low"] <= 0.25 <= d["high"] <= 0.5
    assert rows["ours"]["diff_vs_ours"] is None and rows["peer"]["diff_vs_peer"] is None
    assert rows["peer"]["diff_vs_ours"]["mean_diff"] == pytest.approx(-0.25)
    assert rows["batch-128"]["diff_vs_peer"] is None      # no per-query scores
    assert rows["base"]["ndcg"]["mean"] == 0.60 and rows["base"]["sts"] == 0.8
    o = rows["ours"]
    assert o["ndcg"]["n"] == 2 and o["ndcg"]["mean"] == pytest.approx(0.72)
    assert (o["ndcg"]["min"], o["ndcg"]["max"]) == (0.70, 0.74)
    assert o["ndcg"]["std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))   # sample std of {0.70, 0.74}
    assert o["sts"] == pytest.approx(0.82) and o["wall"] == 110
    assert o["ndcg_vs_peer"] == pytest.approx(0.72 / 0.62) and o["time_vs_peer"] == pytest.approx(110 / 60)
    assert rows["batch-128"]["ndcg"]["std"] == 0.0 and rows["batch-128"]["sts"] is None
    # the same through the files
    for name, recs in results.items():
        (tmp_path / name).mkdir()
        for r in recs:
            (tmp_path / name / f"seed{r['seed']}.json").write_text(json.dumps(r))
    text = write_summary(str(tmp_path))
    assert "| ours | 0,1 (n=2) | 0.7200 | 0.7000..0.7400 |" in text and "| +0.2500 [" in text
    assert "| batch-128 | 0 (n=1) | 0.7200 |" in text and "(one seed)" in text
    # per-query scores over different queries are an error, not a silent comparison
    results["peer"][1]["per_query"]["query_ids"] = ["a", "b", "c", "e"]
    with pytest.raises(ValueError, match="seed 1: the per-query test scores are over different queries"):
        summarize(results)
    (tmp_path / "peer" / "seed1.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"peer/seed1.json:1: not valid JSON"):
        write_summary(str(tmp_path))


def test_peer_documented_differs_from_the_peer_only_in_the_learning_rate():
    """``peer-documented`` is the peer recipe at sentence-transformers' documented learning
    rate (2e-5, warm-up ratio 0.1): every other resolved setting is the peer's, at every seed."""
    from contrastkit.bench.train import CONFIGURATIONS, DOCUMENTED_LR, _overrides, _resolved

    doc, peer = CONFIGURATIONS["peer-documented"], CONFIGURATIONS["peer"]
    assert doc.kind == "peer" and doc.all_seeds and not doc.evidence
    for seed in (0, 3):
        a = _resolved(_overrides(doc, seed, ["optim.lr=1e-3"]))
        b = _resolved(_overrides(peer, seed, ["optim.lr=1e-3"]))
        assert a["optim"].pop("lr") == DOCUMENTED_LR == 2e-5 and b["optim"].pop("lr") == 1e-3
        assert a["optim"]["warmup_ratio"] == 0.1 and a == b
