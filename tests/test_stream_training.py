"""data.stream end to end: `contrastkit train` on a pairs file read lazily (tiny model),
its report, exact resume, and the settings it cannot honour refused by name."""

import json
import random

import pytest
import torch

from contrastkit.cli import main
from main_job_fixtures import TOPICS, make_tiny_model, run_killed_after_checkpoint


def _write_pairs(path, n_queries=80, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_queries):
            a, b = rng.sample(TOPICS, 2)
            for k in range(1 + (i % 3 == 0)):        # every third query has two positives
                rec = {"query": f"what about {a} {i}?", "positive": f"we measured {a} and {b} in patients {i}.{k}"}
                if i % 2:
                    rec["negative"] = f"an unrelated note about {b} number {i}"
                f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return _write_pairs(root / "pairs.jsonl"), make_tiny_model(root / "model", dropout=False)


def _args(data, model, out, *extra, stream=True):
    streamed = ["--set", "data.stream=true", "--set", "data.shuffle_buffer=16", "--set", "data.stream_eval_queries=6",
                "--set", "data.stream_distractors=40"] if stream else []
    return ["train", "--data", str(data), "--model", str(model), "--output", str(out), "--batch-size", "8",
            "--chunk-size", "4", "--lr", "1e-3", "--precision", "fp32", "--no-interpolation", *streamed,
            "--set", "data.sts=false",
            "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
            "--set", "train.dev_corpus_size=30", "--set", "train.eval_every=3",
            "--set", "evaluation.bootstrap_resamples=100", *extra]


def test_streamed_run_reports_before_and_after_on_the_held_out_queries(tiny, tmp_path, capsys):
    data, model = tiny
    assert main(_args(data, model, tmp_path / "run", "--max-steps", "6")) == 0
    out = capsys.readouterr().out
    assert "(streamed)" in out and "no mining" in out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_split"] == "held-out share"
    assert set(m["before"]) >= {"ndcg@10", "mrr@10"} and set(m["after"]) >= {"ndcg@10", "mrr@10"}
    assert m["train"]["steps"] == 6 and m["train"]["examples"] > 0
    assert "mining" not in m
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "dev"] == [0, 3, 6]


def test_streamed_run_resumes_to_the_same_weights(tiny, tmp_path):
    from safetensors.torch import load_file

    data, model = tiny
    # 32 records: at most 4 batches an epoch, so the kill at step 5 lands inside epoch 1
    common = ["--max-steps", "7", "--set", "train.checkpoint_every=1", "--set", "data.max_train_examples=32"]
    assert main(_args(data, model, tmp_path / "full", *common)) == 0
    # past an epoch boundary: the shuffle buffer replays epoch 1 to its position
    run_killed_after_checkpoint(_args(data, model, tmp_path / "part", *common), step=5)
    state = torch.load(tmp_path / "part" / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["epoch"] == 1 and state["batches"]["position"] >= 1       # inside epoch 1
    assert main(_args(data, model, tmp_path / "part", *common, "--resume")) == 0
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("setting, message", [
    ("batching.sampler=b3", "batching.sampler: b3"),
    ("negatives.guide_mask=true", "negatives.guide_mask"),
])
def test_streamed_run_refuses_what_needs_the_whole_file(tiny, tmp_path, capsys, setting, message):
    data, model = tiny
    assert main(_args(data, model, tmp_path / "run", "--max-steps", "2", "--set", setting)) == 2
    err = capsys.readouterr().err
    assert message in err and "data.stream" in err and "Traceback" not in err


def test_streamed_corpus_alone_trains_on_crops_without_encoding_the_corpus(tmp_path, capsys):
    from test_stream_data import _write_corpus

    model = make_tiny_model(tmp_path / "model")
    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    assert main(["train", "--data", str(corpus), "--format", "corpus", "--model", str(model), "--output",
                 str(tmp_path / "run"), "--batch-size", "8", "--chunk-size", "4", "--precision", "fp32",
                 "--max-steps", "3", "--set", "data.stream=true", "--set", "data.shuffle_buffer=20",
                 "--set", "data.sts=false", "--set", "model.query_max_length=16",
                 "--set", "model.document_max_length=32"]) == 0
    out = capsys.readouterr().out
    assert "(streamed): 60 independent-crop pairs" in out and "corpus not encoded" in out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train"]["steps"] == 3 and m["train"]["examples"] == 60 and "before" not in m
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_no_distractors_is_refused_only_when_a_record_is_short_of_negatives(tiny, tmp_path, capsys):
    # with data.stream_distractors=0 the random negatives of a short record come from the
    # held-out queries' negatives; where they bring none, nothing is left to draw from. That
    # is refused only when some training record is short (before: whenever nothing was left)
    from contrastkit.recipes.retrieval_task import build_retrieval_task
    from contrastkit.training.config import load_config

    data, model = tiny
    plain = [json.loads(line) for line in data.read_text().splitlines()]
    for r in plain:
        r.pop("negative", None)
    (tmp_path / "none.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    sets = ["data.stream=true", "data.stream_eval_queries=6", "data.stream_distractors=0"]
    task = build_retrieval_task(load_config(overrides=[f"data.source={tmp_path / 'none.jsonl'}", *sets]).data)
    held = {task.queries[q] for q in (*task.dev_qrels, *task.test_qrels)}
    assert held
    with open(tmp_path / "train_only.jsonl", "w") as f:   # every training record brings a negative
        for r in plain:
            neg = {} if r["query"] in held else {"negative": "a note about nothing " + r["query"]}
            f.write(json.dumps({**r, **neg}) + "\n")
    for name, code in (("none", 2), ("train_only", 0)):
        assert main(_args(tmp_path / f"{name}.jsonl", model, tmp_path / name, "--max-steps", "2",
                          "--set", "data.stream_distractors=0")) == code
        err = capsys.readouterr().err
        assert ("some records bring fewer than 1 negatives" in err and "data.stream_distractors is 0" in err) == (
            code == 2)


@pytest.mark.parametrize("stream", [False, True])
def test_no_hard_negatives_means_the_files_negatives_are_left_out(tiny, tmp_path, capsys, stream):
    # half the records bring a negative: with num_negatives 0 none is used (before, the
    # in-memory path trained on them and failed on a batch mixing 0 and 1 negatives)
    data, model = tiny
    assert main(_args(data, model, tmp_path / "run", "--max-steps", "2", "--set", "negatives.num_negatives=0",
                      stream=stream)) == 0
    out = capsys.readouterr().out
    assert ("training examples bring are not used" in out) != stream


def test_streamed_train_file_beside_a_beir_folder(tmp_path, capsys):
    """data.train_file + data.stream: the mined records are read lazily (the same records as
    the in-memory reader keeps), dev and test come from the folder, the guide mask works (the
    train queries are the folder's, encoded), and a bad record is named in the first pass."""
    from contrastkit.recipes.retrieval_task import build_retrieval_task
    from contrastkit.training.config import load_config
    from main_job_fixtures import make_beir

    data, model = make_beir(tmp_path / "beir"), make_tiny_model(tmp_path / "model")
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--data", str(data), "--model", str(model), "--output", str(mined), "--num-negatives", "2",
                 "--rank-window", "0", "10", "--relative-margin", "none"]) == 0
    sets = [f"data.source={data}", f"data.train_file={mined}", "data.dev_fraction=0.25"]
    held = build_retrieval_task(load_config(overrides=sets).data, seed=0)
    streamed = build_retrieval_task(load_config(overrides=sets + ["data.stream=true"]).data, seed=0)
    assert streamed.train_examples == [] and list(streamed.train_stream()) == held.train_examples
    assert (streamed.dev_qrels, streamed.test_qrels) == (held.dev_qrels, held.test_qrels)
    args = ["train", "--data", str(data), "--model", str(model), "--output", str(tmp_path / "run"), "--batch-size", "8",
            "--chunk-size", "4", "--precision", "fp32", "--max-steps", "3", "--no-interpolation",
            "--set", f"data.train_file={mined}", "--set", "data.stream=true", "--set", "data.dev_fraction=0.25",
            "--set", "negatives.num_negatives=2", "--set", "negatives.guide_mask=true", "--set", "data.sts=false",
            "--set", "batching.sampler=random",   # the tiny model mines a few hub documents for every query
            "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
            "--set", "train.dev_corpus_size=20"]
    assert main(args) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_split"] == "test" and m["train"]["examples"] == len(held.train_examples)
    lines = mined.read_text().splitlines()
    rec = json.loads(lines[4])
    rec["positive_id"] = "nope"
    lines[4] = json.dumps(rec)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    bad = [a if not a.startswith("data.train_file=") else f"data.train_file={tmp_path / 'bad.jsonl'}" for a in args]
    assert main(bad[:6] + [str(tmp_path / "bad2")] + bad[7:]) == 2
    assert "bad.jsonl:5: document id 'nope' is not in" in capsys.readouterr().err


def test_streamed_train_file_short_records_get_the_same_mined_negatives_as_in_memory(tmp_path, monkeypatch):
    """Records of 2 negatives, num_negatives 3: beside a BEIR folder the streamed run mines per
    (query, document) of the train qrels and of each record outside them, and gives each
    record, after its own, the negatives the in-memory run mines for it. Records whose
    document the qrels do not list (one with no negative, one with all three) are mined for
    too, and no record's negatives hold a known positive of its query."""
    from contrastkit.negatives.stream_sampler import ShuffleBufferBatches
    from contrastkit.recipes.common import ExampleBatches
    from main_job_fixtures import make_beir

    data, model = make_beir(tmp_path / "beir"), make_tiny_model(tmp_path / "model")
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--data", str(data), "--model", str(model), "--output", str(mined), "--num-negatives", "2",
                 "--rank-window", "0", "10", "--relative-margin", "none"]) == 0
    lines = mined.read_text().splitlines()
    off = []   # (query, document) pairs of records outside the train qrels
    for n, line in enumerate(lines[:6]):
        r = json.loads(line)
        x = r["positive_id"].replace("d", "x")     # the query's topic's "other" note: not in the qrels
        negs = [] if n % 2 else [d for d in ("d0", "d1", "d2", "d3") if d not in (r["positive_id"], x)][:3]
        record = {"query_id": r["query_id"], "query": r["query"], "positive_id": x, "positive": "from the folder"}
        if negs:
            record.update(negative_ids=negs, negatives=["from the folder"] * len(negs))
        lines.append(json.dumps(record))
        off.append((r["query_id"], x))
    mined.write_text("\n".join(lines) + "\n")
    seen = {"memory": {}, "stream": {}}

    def spy(cls, name):
        original = cls.__iter__

        def it(self):
            for batch in original(self):
                seen[name].update({(e.query_id, e.positive_id): e.negative_ids for e in batch})
                yield batch
        monkeypatch.setattr(cls, "__iter__", it)

    spy(ExampleBatches, "memory")
    spy(ShuffleBufferBatches, "stream")
    for name, extra in (("memory", []), ("stream", ["--set", "data.stream=true"])):
        assert main(["train", "--data", str(data), "--model", str(model), "--output", str(tmp_path / name),
                     "--batch-size", "8", "--chunk-size", "4", "--precision", "fp32", "--max-steps", "6",
                     "--no-interpolation", "--set", f"data.train_file={mined}", "--set", "data.dev_fraction=0.25",
                     "--set", "negatives.num_negatives=3", "--set", "negatives.rank_window=[0, 10]",
                     "--set", "batching.sampler=random", "--set", "data.sts=false",
                     "--set", "model.query_max_length=16", "--set", "model.document_max_length=32",
                     "--set", "train.dev_corpus_size=20", *extra]) == 0
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["mining"]["num_negatives"] == 3
    records = {(r["query_id"], r["positive_id"]): r.get("negative_ids", []) for r in map(json.loads, lines)}
    positives = {}
    for q, d in records:
        positives.setdefault(q, set()).add(d)
    both = set(seen["memory"]) & set(seen["stream"])
    assert len(both) >= 8 and len(both & set(off)) >= 2
    for key in both:
        own = records[key]
        assert len(seen["stream"][key]) == 3 and list(seen["stream"][key][:len(own)]) == own  # its own, then mined
        assert seen["stream"][key] == seen["memory"][key]
        assert not set(seen["stream"][key][len(own):]) & positives[key[0]]   # mined: no known positive
