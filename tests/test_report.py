"""The run report (contrastkit.diagnostics.report): a realistic run folder in, one
self-contained, escaped HTML page out, with every number taken from the files."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from contrastkit.diagnostics import read_run, render_report, write_report
from contrastkit.evaluation.stats import paired_bootstrap

N_QUERIES = 300
METRICS = ("ndcg@1", "ndcg@10", "ndcg@100", "mrr@10", "recall@10", "recall@100", "map@100", "precision@10")


def _per_query(rng, n, base_mean, gain):
    before = np.clip(rng.beta(4 * base_mean, 4 * (1 - base_mean), n), 0, 1)
    change = rng.normal(gain, 0.12, n)
    change[rng.random(n) < 0.45] = 0.0          # many queries do not move at all
    after = np.clip(before + change, 0, 1)
    return before, after


def make_run(root: Path, *, sts=True, sts_after=0.8105, interpolation=True, mining=True, test=True,
             per_query=True, config=True, model="sentence-transformers/all-MiniLM-L6-v2",
             config_text=None) -> Path:
    """A run folder as ``contrastkit train`` writes it (the schema of issue 8), with numbers
    that agree with each other (the intervals are bootstrapped from the per-query values)."""
    run = root / "run"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = {}
    for i, m in enumerate(METRICS):
        per[m] = _per_query(np.random.default_rng(i), N_QUERIES, 0.62 if "recall" not in m else 0.85, 0.04)
    before = {m: float(per[m][0].mean()) for m in METRICS}
    after = {m: float(per[m][1].mean()) for m in METRICS}
    before["n_queries"] = after["n_queries"] = N_QUERIES
    difference = {}
    for m in ("ndcg@10", "mrr@10", "recall@100"):
        r = paired_bootstrap(per[m][0], per[m][1], n_resamples=2000, seed=0)
        difference[m] = r            # as the recipe writes it: mean_diff, low, high, p_value, n, n_resamples, ...
    dev_before = {"ndcg@10": 0.6012, "mrr@10": 0.5733, "recall@100": 0.9011}
    dev_steps = [0, 50, 100, 150, 200]           # step 0: the base model, logged before training
    dev_scores = [0.6012, 0.6451, 0.6702, 0.6689, 0.6650]
    records = []
    t = 1_790_000_000.0
    records.append({"time": t, "phase": "timing", "name": "load", "seconds": 4.2})
    if test:
        records.append({"time": t + 100, "phase": "before", "split": "test", **before})
    records.append({"time": t + 140, "phase": "dev", "step": 0, "epoch": 0, **dev_before, "n_queries": 81})
    for step in range(1, 201):
        if step % 10 == 0 or step == 1:
            loss = 1.9 * math.exp(-step / 80) + 0.35 + 0.05 * float(rng.normal())
            records.append({"time": t + 150 + step, "phase": "train", "step": step, "loss": loss,
                            "lr": 2e-5 * min(1.0, step / 20)})
        if step in dev_steps[1:]:
            i = dev_steps.index(step)
            records.append({"time": t + 151 + step, "phase": "dev", "step": step, "epoch": step // 100,
                            "ndcg@10": dev_scores[i], "mrr@10": dev_scores[i] - 0.03, "recall@100": 0.91,
                            "seconds": 6.1})
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    interp_scores = [0.6012, 0.6498, 0.6777, 0.6745, 0.6702]
    if interpolation:
        for a, sc in zip(alphas, interp_scores):
            records.append({"time": t + 400, "phase": "interpolation", "alpha": a, "ndcg@10": sc})
    if test:
        records.append({"time": t + 450, "phase": "after", "split": "test", **after})
    phases = {"load": 4.2, "encode_corpus": 131.5, "before": 3.1, "mine": 2.4, "train": 301.7,
              "interpolate": 21.0, "after": 133.9, "report": 1.3}
    summary = {
        "recipe": "text_retrieval", "model": model, "data": "bundled:scifact", "device": "cpu",
        "precision": "bf16", "world_size": 1,
        "task": "beir: 809 (query, relevant document) pairs from 727 train queries; dev 81 queries carved from train",
        "notes": [],
        "dev": {"before": dev_before, "corpus_size": 2000, "queries": 81, "best_step": 100,
                "best": {"ndcg@10": 0.6702, "mrr@10": 0.6402, "recall@100": 0.91}},
        "train": {"steps": 200, "examples": 727, "batch_size": 64, "epochs": 2.0, "steps_per_epoch": 11,
                  "loss_first": 1.8934, "loss_last": 0.4127},
        "phases": phases, "wall_seconds": 603.2, "test_split": "test",
        "versions": {"contrastkit": "0.1.0", "torch": "2.13.0", "transformers": "4.57.1"},
    }
    if test:
        summary.update(before=before, after=after, difference=difference)
    if sts:
        summary["sts"] = {"split": "test", "before": {"spearman": 0.8203, "pearson": 0.8341},
                          "after": {"spearman": sts_after, "pearson": 0.8250}}
    if interpolation:
        summary["dev"]["interpolation"] = {"alphas": alphas, "scores": interp_scores, "metric": "ndcg@10",
                                           "chosen_alpha": 0.5}
    if mining:
        summary["mining"] = {
            "queries": 727, "num_negatives": 1, "negatives": 719,
            "positive_score": {"count": 727, "mean": 0.6312, "std": 0.1105, "min": 0.1523, "q05": 0.4431,
                               "q25": 0.5612, "q50": 0.6398, "q75": 0.7101, "q95": 0.8012, "max": 0.9104},
            "negative_score": {"count": 719, "mean": 0.5104, "std": 0.0911, "min": 0.2011, "q05": 0.3612,
                               "q25": 0.4487, "q50": 0.5123, "q75": 0.5733, "q95": 0.6588, "max": 0.8431},
            "gap": {"count": 719, "mean": 0.1203, "std": 0.1001, "min": -0.1201, "q05": -0.0312,
                    "q25": 0.0511, "q50": 0.1187, "q75": 0.1842, "q95": 0.2811, "max": 0.5012},
            "candidates": 20356, "filtered": 1873, "filtered_fraction": 1873 / 20356, "short_queries": 8,
            "no_negative_queries": 8, "rank_window": [3, 30], "relative_margin": 0.95,
            "absolute_margin": None, "sampling": "top", "method": "exact", "seed": 0}
    for name, sec in phases.items():
        if name != "load":
            records.append({"time": t + 500, "phase": "timing", "name": name, "seconds": sec})
    (run / "metrics.json").write_text(json.dumps(summary, indent=2))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config:
        (run / "config.yaml").write_text(config_text or
                                         "recipe: text_retrieval\nmodel: all-MiniLM-L6-v2\ndata: bundled:scifact\n"
                                         "objective: mnrl\ntemperature: 0.05\nbatch_size: 64\nepochs: 2\n"
                                         "lr: 2.0e-05\nseed: 0\ninterpolation: true\n")
    if per_query and test:
        (run / "per_query.json").write_text(json.dumps(
            {"metric": "ndcg@10", "query_ids": [f"q{1000 + i}" for i in range(N_QUERIES)],
             "before": per["ndcg@10"][0].tolist(), "after": per["ndcg@10"][1].tolist()}))
    return run


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.imgs, self.refs, self.scripts, self.text = [], set(), [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for k in ("src", "href"):
            if k in a:
                self.refs.append(a[k])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    assert c.stack == [], f"unclosed tags: {c.stack}"
    return c


def _text(page: str) -> str:
    """The visible text, text nodes joined by one space (so table cells stay apart); a comma
    that starts a text node is glued back to the word before it."""
    return " ".join(" ".join(_parse(page).text).split()).replace(" ,", ",")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The complete fixture run and its written report (drawn once for the tests that only read it)."""
    run = make_run(tmp_path_factory.mktemp("full"))
    return run, write_report(run)


def test_full_report_headline_sections_and_self_contained(full_run):
    run, out = full_run
    assert out == run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    c = _parse(page)
    summary = json.loads((run / "metrics.json").read_text())
    b, a, d = summary["before"]["ndcg@10"], summary["after"]["ndcg@10"], summary["difference"]["ndcg@10"]
    text = _text(page)
    # the headline: before -> after, the interval and its verdict
    assert f"{b:.4f} → {a:.4f} ({a - b:+.4f})" in text
    assert f"[{d['low']:+.4f}, {d['high']:+.4f}]" in text
    assert d["low"] > 0 and "excludes 0: a real improvement" in text
    pq = json.loads((run / "per_query.json").read_text())
    dq = np.array(pq["after"]) - np.array(pq["before"])
    assert (f"per query: {int((dq > 1e-9).sum())} better, {int((dq < -1e-9).sum())} worse, "
            f"{int((np.abs(dq) <= 1e-9).sum())} unchanged") in text
    assert "82.03 → 81.05 (-0.98 points)" in text and "within 2 points" in text
    # every retrieval metric, before / after / difference
    for m in METRICS:
        label = {"ndcg": "nDCG", "mrr": "MRR", "recall": "Recall", "map": "MAP", "precision": "P"}[m.split("@")[0]]
        row = f"{label}@{m.split('@')[1]} {summary['before'][m]:.4f} {summary['after'][m]:.4f} " \
              f"{summary['after'][m] - summary['before'][m]:+.4f}"
        assert row in text, row
    for m in ("mrr@10", "recall@100"):
        iv = summary["difference"][m]
        assert f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" in text
    # the sections
    for sid in ("headline", "retrieval", "per-query", "training", "interpolation", "mining", "time", "environment",
                "config"):
        assert sid in c.ids, sid
    assert "best checkpoint (step 100)" in text
    assert "interpolation a = 0.5" in text
    pq = json.loads((run / "per_query.json").read_text())
    diffs = np.array(pq["after"]) - np.array(pq["before"])
    assert (f"{int((diffs > 1e-9).sum())} improved · {int((np.abs(diffs) <= 1e-9).sum())} unchanged · "
            f"{int((diffs < -1e-9).sum())} worse (of {N_QUERIES} queries") in text
    assert "20356" in text and "9.20%" in text and "ranks 3 to 30" in text           # mining
    assert "0.4431" in text and "0.8431" in text
    assert "encode_corpus 131.5 s (2 min 12 s)" in text and "wall time 603.2 s (10 min 03 s)" in text
    assert "other (outside the phases) 4.1 s" in text                                  # 603.2 - 599.1
    assert "<details>" in page and "objective: mnrl" in text
    assert "bf16" in text and "2.13.0" in text and "4.57.1" in text
    assert "Check these" not in text and "Notes from the run" not in text               # consistent, no notes
    assert "dev 81 queries carved from train" in text
    # self-contained: 5 embedded PNG figures, no script, no external reference
    assert c.scripts == 0 and "<link" not in page
    assert len(c.imgs) == 5
    for src in c.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r.startswith(("#", "data:")) for r in c.refs), c.refs
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert "url(" not in page and "@import" not in page


def test_regression_and_forgetting_are_flagged(tmp_path):
    run = make_run(tmp_path, sts_after=0.7951)
    s = json.loads((run / "metrics.json").read_text())
    s["before"], s["after"] = s["after"], s["before"]
    pq = json.loads((run / "per_query.json").read_text())
    pq["before"], pq["after"] = pq["after"], pq["before"]
    for m, d in s["difference"].items():
        s["difference"][m] = {"mean_diff": -d["mean_diff"], "low": -d["high"], "high": -d["low"],
                              "p_value": d["p_value"]}
    (run / "metrics.json").write_text(json.dumps(s))
    (run / "per_query.json").write_text(json.dumps(pq))
    text = _text(render_report(read_run(run)))
    assert "excludes 0: a real regression" in text
    assert "(-2.52 points)" in text and "fell by 2.52 points, more than 2" in text
    assert "Check these" not in text


def test_interval_including_zero_is_not_called_real(tmp_path):
    run = make_run(tmp_path)
    s = json.loads((run / "metrics.json").read_text())
    d = s["difference"]["ndcg@10"]
    d["low"], d["high"], d["p_value"] = -0.01, d["mean_diff"] + 0.03, 0.21
    (run / "metrics.json").write_text(json.dumps(s))
    page = render_report(read_run(run))
    assert "includes 0: not distinguishable from no change" in _text(page)
    assert 'badge neutral">includes 0' in page


def test_missing_optional_parts_are_noted_not_invented(tmp_path):
    run = make_run(tmp_path, sts=False, interpolation=False, mining=False, test=False, config=False)
    page = write_report(run).read_text(encoding="utf-8")
    c = _parse(page)
    text = _text(page)
    assert "No STS evaluation in this run" in text and "Spearman" not in text
    assert "No weight interpolation in this run" in text and "interpolation a =" not in text
    assert "No hard-negative mining in this run" in text
    assert "No before / after evaluation on a test split" in text and "No test-split evaluation" in text
    assert "No per_query.json" in text
    assert "No config.yaml" in text
    # what the run has is still there: the dev / loss curves and the time per phase
    assert len(c.imgs) == 2 and "0.6702" in text and "131.5 s" in text


def test_unfinished_run_uses_the_records(tmp_path):
    run = make_run(tmp_path, per_query=False)
    (run / "metrics.json").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "phase": "train", "st')          # stopped while writing
    text = _text(write_report(run).read_text(encoding="utf-8"))
    assert "metrics.json is missing" in text and "incomplete last record" in text
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[:-1]
             if '"after"' in x][0]
    assert f"{after['ndcg@10']:.4f}" in text
    assert "no interval was computed" in text
    assert "The chosen a was not recorded" in text
    assert "encode_corpus 131.5 s" in text


def test_inconsistent_numbers_are_warned(tmp_path):
    run = make_run(tmp_path)
    s = json.loads((run / "metrics.json").read_text())
    s["difference"]["ndcg@10"]["mean_diff"] += 0.01
    s["after"]["mrr@10"] += 0.0      # unchanged
    s["before"]["ndcg@10"] += 0.002  # no longer the mean of per_query before
    (run / "metrics.json").write_text(json.dumps(s))
    text = _text(render_report(read_run(run)))
    assert "Check these" in text
    assert "difference.ndcg@10.mean_diff" in text and "per_query.json: the mean of before" in text


def test_the_runs_own_warnings_are_shown(tmp_path):
    run = make_run(tmp_path)
    s = json.loads((run / "metrics.json").read_text())
    s["warnings"] = ["fine-tuning did not improve the dev score (...): the saved model is the base model"]
    (run / "metrics.json").write_text(json.dumps(s))
    page = render_report(read_run(run))
    assert 'id="warnings"' in page and "the saved model is the base model" in _text(page)


def test_text_is_escaped(tmp_path):
    evil = '<script>alert("x")</script><img src="http://example.com/t.png">'
    run = make_run(tmp_path, model=evil, config_text=f"model: '{evil}'\n")
    pq = json.loads((run / "per_query.json").read_text())
    pq["query_ids"][int(np.argmax(np.array(pq["after"]) - np.array(pq["before"])))] = evil
    (run / "per_query.json").write_text(json.dumps(pq))
    page = write_report(run).read_text(encoding="utf-8")
    c = _parse(page)
    assert "<script" not in page and "http://example.com" not in " ".join(c.refs)
    assert c.scripts == 0 and all(r.startswith(("#", "data:")) for r in c.refs)
    assert evil in _text(page)        # shown, as text


def test_bad_files_name_file_line_and_field(tmp_path):
    run = make_run(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        write_report(run)
    lines[2] = '{"step": 3}\n'
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: .*string \"phase\""):
        write_report(run)
    lines.pop(2)
    (run / "metrics.jsonl").write_text("".join(lines))
    s = json.loads((run / "metrics.json").read_text())
    s["after"]["ndcg@10"] = "0.7"
    (run / "metrics.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match=r"after\.ndcg@10 must be a number"):
        write_report(run)
    s["after"]["ndcg@10"] = 0.7
    s["sts"]["after"] = {"pearson": 0.8}
    (run / "metrics.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match=r"sts\.after\.spearman must be a number"):
        write_report(run)
    pq = json.loads((run / "per_query.json").read_text())
    pq["after"] = pq["after"][:-1]
    (run / "per_query.json").write_text(json.dumps(pq))
    with pytest.raises(ValueError, match=r"per_query\.json: field 'after' has 299 entries for 300"):
        read_run(run)
    (run / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metrics\.json: expected a JSON object"):
        read_run(run)
    with pytest.raises(ValueError, match="neither metrics.json nor metrics.jsonl"):
        write_report(tmp_path / "run" / "..")
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_cli_regenerates_the_report(tmp_path, capsys):
    from contrastkit.cli import main

    run = make_run(tmp_path)
    (run / "report.html").write_text("old")
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert str(run / "report.html") in capsys.readouterr().out
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "--output", str(other)]) == 0 and other.is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium): the headless render check needs it")
def test_renders_in_a_headless_browser(full_run, tmp_path):
    from PIL import Image

    _, page = full_run
    shot = tmp_path / "out.png"
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,3000", "--hide-scrollbars", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 0, proc.stderr[-2000:]
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=np.int16)
    assert img.shape[:2] == (3000, 1200)
    not_white = (img < 245).any(axis=2)
    assert not_white.mean() > 0.02                                   # text, tables and figures were drawn
    assert not_white[:600].mean() > 0.01 and not_white[2000:].mean() > 0.005   # top and far down the page
    green = (img[..., 1] > img[..., 0] + 40) & (img[..., 1] > img[..., 2] + 20)
    assert green.sum() > 100                                         # the improvement is drawn in green


def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "report.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/report.md", "exec"), {"__name__": "__docs__"})


def test_partial_sts_select_metric_from_config_and_missing_losses(tmp_path):
    run = make_run(tmp_path, interpolation=False,
                   config_text="evaluation:\n  select_metric: mrr@10\n  bootstrap_resamples: 2000\n")
    s = json.loads((run / "metrics.json").read_text())
    del s["sts"]["after"]
    s["train"]["loss_first"] = s["train"]["loss_last"] = None
    s["notes"] = ["mining skipped (the training pairs have no ids) <random negatives>"]
    (run / "metrics.json").write_text(json.dumps(s))
    page = render_report(read_run(run))
    text = _text(page)
    assert "before: 82.03" in text and "No STS evaluation after training" in text
    assert "Notes from the run mining skipped (the training pairs have no ids) <random negatives>" in text
    assert "first logged loss —" in text and "steps per epoch 11" in text
    # the dev table and curve follow the selected metric (config.yaml's evaluation.select_metric)
    assert "(2,000 resamples)" in text
    assert "best checkpoint (step 100)" in text
    assert "Dev metric: MRR@10" in text
    (run / "config.yaml").write_text("evaluation: [unclosed\n")
    assert "config.yaml is not valid YAML" in _text(render_report(read_run(run)))


def test_simcse_run_without_retrieval_metrics(tmp_path):
    """The SimCSE recipe's folder: before / after are STS-B test correlations, the dev metric is Spearman."""
    run = tmp_path / "simcse"
    run.mkdir()
    before, after = {"spearman": 0.7612, "pearson": 0.7533, "n": 1379}, {"spearman": 0.8021, "pearson": 0.7950, "n": 1379}
    summary = {"recipe": "simcse", "mode": "unsupervised", "model": "tiny", "device": "cpu", "precision": "fp32",
               "task": "unsupervised: 5749 STS-B train sentences", "notes": [],
               "before": before, "after": after, "sts": {"split": "test", "before": before, "after": after},
               "dev": {"split": "sts-b dev", "metric": "spearman", "pairs": 1500,
                       "before": {"spearman": 0.7801, "pearson": 0.7702, "n": 1500}, "best_step": 20,
                       "best": {"spearman": 0.8203, "pearson": 0.8100, "n": 1500},
                       "interpolation": {"alphas": [0.5, 1.0], "scores": [0.8105, 0.8203], "metric": "spearman",
                                         "chosen_alpha": 1.0}},
               "phases": {"before": 12.0, "train": 80.0}, "wall_seconds": 95.0, "test_split": "STS-B test"}
    records = [{"time": 0, "phase": "dev", "step": 0, "epoch": 0, "spearman": 0.7801, "pearson": 0.7702},
               {"time": 1, "phase": "train", "step": 1, "loss": 2.1, "lr": 1e-5},
               {"time": 2, "phase": "dev", "step": 20, "epoch": 1, "spearman": 0.8203, "pearson": 0.81}]
    (run / "metrics.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = _text(write_report(run).read_text(encoding="utf-8"))
    assert "This run (recipe simcse) measured no retrieval metric" in text
    assert "76.12 → 80.21 (+4.09 points)" in text
    assert "Spearman 0.7801 0.8203 +0.0402" in text              # the dev table: base vs best checkpoint
    assert "Dev metric: Spearman" in text and "dev Spearman" in text
    assert "Check these" not in text
