"""The minimal BEIR reader on the bundled SciFact copy and on malformed files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import contrastkit as ck
from contrastkit.data import data_dir, load_beir, scifact_pairs


@pytest.fixture(scope="module")
def scifact():
    return load_beir()


def test_bundled_scifact_counts(scifact):
    assert len(scifact.corpus) == 5183 and len(scifact.queries) == 1109
    train, test = scifact.pairs("train"), scifact.pairs("test")
    assert len(train) == 919 and len(test) == 339  # src/contrastkit/bundled/README.md
    q, d = train[0]
    assert q == "0-dimensional biomaterials lack inductive properties."
    title, text = scifact.corpus["31715818"]
    assert d == f"{title} {text}"
    assert len(scifact.load_qrels("train")) == 809 and len(scifact.load_qrels("test")) == 300


def test_paths_resolve(scifact):
    assert (data_dir() / "scifact").is_dir()
    assert scifact_pairs("test", path=data_dir() / "scifact")[:3] == scifact.pairs("test")[:3]
    assert load_beir("scifact").folder == scifact.folder
    with pytest.raises(FileNotFoundError):
        load_beir("/nonexistent/beir")
    with pytest.raises(FileNotFoundError, match="split 'dev'"):
        scifact.pairs("dev")


def test_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "scifact").mkdir()
    monkeypatch.setenv("CONTRASTKIT_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def make(tmp_path: Path, corpus_lines, query_lines, qrels_text, gz=True) -> Path:
    folder = tmp_path / "ds"
    (folder / "qrels").mkdir(parents=True)
    corpus = "\n".join(corpus_lines) + "\n"
    if gz:
        with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(corpus)
    else:
        (folder / "corpus.jsonl").write_text(corpus)
    (folder / "queries.jsonl").write_text("\n".join(query_lines) + "\n")
    (folder / "qrels" / "train.tsv").write_text(qrels_text)
    return folder


GOOD_C = [json.dumps({"_id": "d1", "title": "T", "text": "x"}), json.dumps({"_id": "d2", "text": "y"})]
GOOD_Q = [json.dumps({"_id": "q1", "text": "what?"})]


def test_small_good_folder(tmp_path):
    folder = make(tmp_path, GOOD_C, GOOD_Q, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n", gz=False)
    assert load_beir(folder).pairs("train") == [("what?", "T x")]


@pytest.mark.parametrize("corpus, queries, qrels, where", [
    (GOOD_C + ["{not json"], GOOD_Q, "q1\td1\t1\n", "corpus.jsonl.gz:3"),
    ([json.dumps({"_id": "d1"})], GOOD_Q, "q1\td1\t1\n", "corpus.jsonl.gz:1"),
    ([json.dumps({"_id": 5, "text": "x"})], GOOD_Q, "q1\td1\t1\n", "corpus.jsonl.gz:1"),
    (GOOD_C + [GOOD_C[0]], GOOD_Q, "q1\td1\t1\n", "corpus.jsonl.gz:3"),
    (GOOD_C, GOOD_Q + ["[1, 2]"], "q1\td1\t1\n", "queries.jsonl:2"),
    (GOOD_C, GOOD_Q, "query-id\tcorpus-id\tscore\nq1\td1\n", "train.tsv:2"),
    (GOOD_C, GOOD_Q, "q1\td1\tone\n", "train.tsv:1"),
    (GOOD_C, GOOD_Q, "q1\td9\t1\n", "train.tsv"),
    (GOOD_C, GOOD_Q, "q7\td1\t1\n", "train.tsv"),
])
def test_malformed_records_name_file_and_line(tmp_path, corpus, queries, qrels, where):
    folder = make(tmp_path, corpus, queries, qrels)
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        load_beir(folder).pairs("train")


def test_exported():
    assert ck.data.scifact_pairs is scifact_pairs


def test_examples_carry_ids_and_source(scifact):
    ex = scifact.examples("train")
    assert len(ex) == 919 and [(e.query, e.positive) for e in ex] == scifact.pairs("train")
    e = ex[0]
    assert (e.query_id, e.positive_id, e.negatives) == ("0", "31715818", ())
    assert e.source.endswith("train.tsv:2")  # line 1 is the header
    ids, texts = scifact.corpus_texts()
    assert len(ids) == 5183 and texts[ids.index("31715818")] == e.positive


def test_unknown_ids_name_line_and_skip(tmp_path):
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq7\td1\t1\nq1\td9\t1\nq1\td2\t1\nq1\tbad\n"
    folder = make(tmp_path, GOOD_C, GOOD_Q, qrels, gz=False)
    with pytest.raises(ValueError, match=r"train\.tsv:6: expected 3"):
        load_beir(folder).examples("train")
    stats = ck.data.BadRecords()
    ds = load_beir(folder)
    ex = ds.examples("train", skip_bad_records=True, stats=stats)
    assert [(e.query_id, e.positive_id) for e in ex] == [("q1", "d1"), ("q1", "d2")]
    assert ex[1].positive == "y" and ex[1].source.endswith("train.tsv:5")
    assert stats.count == 3
    assert "train.tsv:6" in stats.reasons[0]
    assert any("train.tsv:3: query-id 'q7'" in r for r in stats.reasons)
    assert any("train.tsv:4: corpus-id 'd9'" in r for r in stats.reasons)
    # once loaded with the bad line skipped, a strict call still raises at the first bad line
    with pytest.raises(ValueError, match=r"train\.tsv:6: expected 3"):
        ds.examples("train")


def test_load_beir_skip_bad_corpus_lines(tmp_path):
    folder = make(tmp_path, GOOD_C + ["{not json", GOOD_C[0]], GOOD_Q + ["[1]"], "q1\td1\t1\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl\.gz:3"):
        load_beir(folder)
    stats = ck.data.BadRecords()
    ds = load_beir(folder, skip_bad_records=True, stats=stats)
    assert len(ds.corpus) == 2 and len(ds.queries) == 1 and stats.count == 3
    assert "corpus.jsonl.gz:4: duplicate _id 'd1'" in stats.reasons[1]
