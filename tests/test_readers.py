"""Example readers (jsonl / csv / tsv / parquet), corpus-only files, dev split, crops."""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import pytest

import contrastkit as ck
from contrastkit.data import (BadRecords, Example, independent_crops, load_corpus, load_corpus_texts,
                              negative_column_names, read_examples, split_dev)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_pairs_triplets_ntuples(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"query": "q1", "positive": "p1"},
        {"query": "q2", "positive": "p2", "negative": "n2"},
        "",
        {"query": "q3", "positive": "p3", "negative_2": "b", "negative_10": "c", "negative_1": "a",
         "negative_ids": ["i1", 2, "i10"], "query_id": 3, "positive_id": "d3"},
        {"query": "q4", "positive": "p4", "negatives": ["x", "y"]},
    ])
    out = list(read_examples(path))
    assert [e.negatives for e in out] == [(), ("n2",), ("a", "b", "c"), ("x", "y")]
    assert out[2].negative_ids == ("i1", "2", "i10") and out[2].query_id == "3" and out[2].positive_id == "d3"
    assert out[0].query_id is None and out[0].negative_ids == ()
    assert [e.source for e in out] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:5"]
    assert out[3].texts() == ("q4", "p4", "x", "y")


def test_negative_column_names():
    cols = ["query", "positive", "negative_10", "neg", "negative_2", "negative_ids", "neg_1_id", "other",
            "negative_scores", "neg_2_score"]
    assert negative_column_names(cols) == ["neg", "negative_2", "negative_10"]


def test_explicit_columns_and_streaming(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"anchor": f"q{i}", "pos": f"p{i}", "hard": f"h{i}", "negative": "ignored"}
                                             for i in range(5)])
    it = read_examples(path, query_column="anchor", positive_column="pos", negative_columns=["hard"])
    assert iter(it) is it  # a generator, not a list
    first = next(it)
    assert first == Example("q0", "p0", ("h0",), source=f"{path}:1")
    assert len(list(it)) == 4
    # records are parsed as they are reached: a bad line later in the file does not stop the first ones
    with open(path, "a") as f:
        f.write("{broken\n")
    lazy = read_examples(path, query_column="anchor", positive_column="pos", negative_columns=["hard"])
    assert [next(lazy).query for _ in range(5)] == [f"q{i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"a\.jsonl:6: not valid JSON"):
        next(lazy)


def test_csv_tsv_and_gzip(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('\ufeffquery,positive,negative_1,negative_2,negative_ids\n'
                        'q1,"p, with comma",n1,n2,"[""a"", ""b""]"\n'
                        '\n'
                        'q2,"multi\nline",m1,m2,\n', encoding="utf-8")
    out = list(read_examples(csv_path))
    assert out[0] == Example("q1", "p, with comma", ("n1", "n2"), negative_ids=("a", "b"), source=f"{csv_path}:2")
    assert out[1].positive == "multi\nline" and out[1].source == f"{csv_path}:4" and out[1].negative_ids == ()
    tsv = tmp_path / "t.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.write("query\tpositive\nq\tp\nq2\tp2\n")
    assert [e.query for e in read_examples(tsv)] == ["q", "q2"]
    assert list(read_examples(tsv))[1].source == f"{tsv}:3"


def test_parquet_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 50
    table = pa.table({"query": [f"q{i}" for i in range(n)], "positive": [f"p{i}" for i in range(n)],
                      "negatives": [[f"a{i}", f"b{i}"] for i in range(n)], "query_id": list(range(n))})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=7)
    out = list(read_examples(path, parquet_batch_rows=5))
    assert len(out) == n and out[13] == Example("q13", "p13", ("a13", "b13"), query_id="13", source=f"{path}:row 14")
    bad = pa.table({"query": ["q", "", "q3"], "positive": ["p", "p2", None]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet:row 2: column 'query' is empty"):
        list(read_examples(tmp_path / "bad.parquet"))
    stats = BadRecords()
    assert len(list(read_examples(tmp_path / "bad.parquet", skip_bad_records=True, stats=stats))) == 1
    assert stats.count == 2 and "row 3" in stats.reasons[1]
    with pytest.raises(ValueError, match="no column 'anchor'"):
        read_examples(path, query_column="anchor")


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"positive": "p"}', "record has no 'query' column"),
    ('{"query": "q", "positive": "   "}', "column 'positive' is empty"),
    ('{"query": 5, "positive": "p"}', "column 'query' must be a string, got int"),
    ('{"query": "q", "positive": null}', "column 'positive' is missing or null"),
    ('{"query": "q", "positive": "p", "negative": ""}', "column 'negative' is empty"),
    ('{"query": "q", "positive": "p", "negatives": []}', "column 'negatives' is an empty list"),
    ('{"query": "q", "positive": "p", "negatives": ["a", 3]}', r"column 'negatives\[1\]' must be a string"),
    ('{"query": "q", "positive": "p", "negative": "n", "negative_ids": ["a", "b"]}', "column 'negative_ids' has 2 ids for 1 negatives"),
    ('{"query": "q", "positive": "p", "query_id": [1]}', "column 'query_id' must be a string or an integer"),
])
def test_jsonl_malformed_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "ok", "positive": "ok"}, line, {"query": "q", "positive": "p"}])
    before = path.read_bytes()
    mode = os.stat(path).st_mode
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {message}"):
        list(read_examples(path))
    stats = BadRecords()
    out = list(read_examples(path, skip_bad_records=True, stats=stats))
    assert [e.query for e in out] == ["ok", "q"]
    assert stats.count == 1 and stats.reasons[0].startswith(f"{path}:2: ") and "1 bad record skipped" in str(stats)
    assert path.read_bytes() == before and os.stat(path).st_mode == mode  # nothing the user wrote is modified


def test_csv_malformed(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("query,positive,negative\nq,p,n\nq2,p2\nq3,,n3\nq4,p4,n4\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: expected 3 fields"):
        list(read_examples(path))
    stats = BadRecords(max_reasons=1)
    assert [e.query for e in read_examples(path, skip_bad_records=True, stats=stats)] == ["q", "q4"]
    assert stats.count == 2 and len(stats.reasons) == 1 and "and 1 more" in str(stats)
    with pytest.raises(ValueError, match=r"bad\.csv:1: no column 'hard'"):
        read_examples(path, negative_columns=["hard"], skip_bad_records=True)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_examples(tmp_path / "empty.csv")


def test_format_errors(tmp_path):
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_examples(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="format must be one of"):
        read_examples(tmp_path / "x.txt", format="xml")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "missing.jsonl")
    arr = tmp_path / "arr.json"
    arr.write_text('[{"query": "q",\n "positive": "p"}]\n')
    with pytest.raises(ValueError, match=r"arr\.json:1: .*JSON lines"):
        list(read_examples(arr))
    assert list(read_examples(arr, format="jsonl", skip_bad_records=True)) == []


def test_load_corpus(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\n\n  second doc  \n")
    assert load_corpus(txt) == (["1", "3"], ["first doc", "  second doc  "])
    js = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "title": "T", "text": "x"}, {"id": 7, "text": "y"},
                                            json.dumps("just a string"), {"text": "z"}])
    assert load_corpus(js) == (["a", "7", "3", "4"], ["T x", "y", "just a string", "z"])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}, {"_id": "c"},
                                             {"_id": "d", "text": ""}, {"_id": "e", "text": "ok"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: duplicate id 'a'"):
        load_corpus(bad)
    stats = BadRecords()
    assert load_corpus(bad, skip_bad_records=True, stats=stats) == (["a", "e"], ["x", "ok"])
    assert stats.count == 3 and "b.jsonl:3: record has no 'text' field" in stats.reasons[1]
    texts = load_corpus_texts(ck.data.data_dir() / "scifact")
    ds = ck.data.load_beir()
    assert len(texts) == 5183 and texts[0] == ds.document(next(iter(ds.corpus)))


def test_split_dev_by_query():
    ex = [Example(f"text{i % 7}", f"d{i}", query_id=f"q{i % 7}") for i in range(30)]
    train, dev = split_dev(ex, fraction=0.3, seed=3)
    tq, dq = {e.query_id for e in train}, {e.query_id for e in dev}
    assert not tq & dq and len(dq) == 2 and len(train) + len(dev) == 30  # round(0.3 * 7) = 2 queries
    assert train == [e for e in ex if e.query_id in tq]  # input order kept
    # the same queries in another order give the same split; another seed another one
    again_train, again_dev = split_dev(list(reversed(ex)), fraction=0.3, seed=3)
    assert {e.query_id for e in again_dev} == dq
    assert any({e.query_id for e in split_dev(ex, fraction=0.3, seed=s)[1]} != dq for s in range(4, 10))
    # no query id: the query text is the key
    no_id = [Example(f"t{i % 3}", f"d{i}") for i in range(9)]
    tr, dv = split_dev(no_id, fraction=0.34, seed=0)
    assert len({e.query for e in dv}) == 1 and not {e.query for e in tr} & {e.query for e in dv}
    ids_train, ids_dev = split_dev(["a", "b", "c", "d", "a"], fraction=0.5, seed=0)
    assert len(set(ids_dev)) == 2 and not set(ids_train) & set(ids_dev)
    with pytest.raises(ValueError, match="fraction"):
        split_dev(ex, fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 distinct queries"):
        split_dev(["a", "a"])
    with pytest.raises(ValueError, match="Examples or query ids"):
        split_dev([1.5, 2.5])


def test_independent_crops():
    docs = [" ".join(f"w{d}_{i}" for i in range(40)) for d in range(5)] + ["short", ""]
    a = independent_crops(docs, min_ratio=0.1, max_ratio=0.5, seed=1)
    assert a == independent_crops(docs, min_ratio=0.1, max_ratio=0.5, seed=1)
    assert a != independent_crops(docs, min_ratio=0.1, max_ratio=0.5, seed=2)
    assert len(a) == 5  # "short" (1 word < min_words) and "" are skipped
    for ex in a:
        d = int(ex.query_id)
        words = docs[d].split()
        for span in (ex.query, ex.positive):
            w = span.split()
            assert 4 <= len(w) <= 20  # round(0.1 * 40) .. round(0.5 * 40)
            start = words.index(w[0])
            assert words[start:start + len(w)] == w  # a contiguous span of the document
        assert ex.positive_id == ex.query_id and ex.source == f"document {d}"
    many = independent_crops(docs[:1] * 200, seed=0, min_ratio=0.2, max_ratio=0.2)
    assert len({e.query for e in many}) > 20  # starts vary
    assert all(len(e.query.split()) == 8 for e in many)
    ided = independent_crops(docs[:2], ids=["x", "y"], pairs_per_document=3, seed=0)
    assert [e.query_id for e in ided] == ["x"] * 3 + ["y"] * 3
    with pytest.raises(ValueError, match="min_ratio"):
        independent_crops(docs, min_ratio=0.6, max_ratio=0.5)
    with pytest.raises(ValueError, match="ids has 1 entries"):
        independent_crops(docs, ids=["a"])
    with pytest.raises(ValueError, match="single str"):
        independent_crops("abc def")
    with pytest.raises(ValueError, match=r"documents\[0\] is int"):
        independent_crops([3])
