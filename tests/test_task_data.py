"""The main job's data: bad records in BEIR folders (file:line, or counted and skipped with
data.skip_bad_records), the notes that report them, and corpus-only crops whose ids
cannot be mistaken for query ids (BEIR folder, bundled SciFact, or a corpus file alone)."""

import json
from pathlib import Path

import pytest
import torch

from contrastkit.data import load_beir
from contrastkit.negatives import DuplicatePositiveMask, mnrl_columns
from contrastkit.recipes.retrieval_task import build_retrieval_task
from contrastkit.recipes.text_steps import fill_negatives
from contrastkit.training.config import ConfigError, DataConfig


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _beir(folder: Path, *, corpus=None, queries=None, train=None, test=None) -> Path:
    """Numeric ids as in SciFact: queries "0".."7", documents "100".."107" (query i -> 100+i)."""
    (folder / "qrels").mkdir(parents=True)
    if corpus is None:
        corpus = [{"_id": str(100 + i), "title": f"title {i}", "text": f"some words about topic {i} and more words"}
                  for i in range(8)]
    if queries is None:
        queries = [{"_id": str(i), "text": f"what about topic {i}?"} for i in range(8)]
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "queries.jsonl", queries)
    if train is None:
        train = [f"{i}\t{100 + i}\t1" for i in range(6)]
    if test is None:
        test = [f"{i}\t{100 + i}\t1" for i in (6, 7)]
    for name, rows in (("train", train), ("test", test)):
        (folder / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in rows))
    return folder


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), dev_fraction=0.25, sts=False, **kw)


# -- 1. skip_bad_records reaches the BEIR reader -----------------------------------------------------------

def test_beir_bad_records_stop_with_file_and_line_or_are_counted_and_skipped(tmp_path):
    corpus = [{"_id": str(100 + i), "text": f"words about topic {i} here"} for i in range(8)]
    corpus.insert(2, "{not json")                                          # corpus.jsonl:3
    queries = [{"_id": str(i), "text": f"topic {i}?"} for i in range(8)] + [{"_id": "8", "text": "  "}]
    train = [f"{i}\t{100 + i}\t1" for i in range(6)] + ["0\t100"]       # train.tsv:8: 2 fields
    data = _beir(tmp_path / "beir_bad", corpus=corpus, queries=queries, train=train)
    with pytest.raises(ValueError, match=r"beir_bad/corpus\.jsonl:3: not valid JSON"):
        build_retrieval_task(_cfg(data))
    task = build_retrieval_task(_cfg(data, skip_bad_records=True))
    assert task.bad_records.count == 3 and len(task.corpus_ids) == 8
    [note] = [n for n in task.notes if "bad record" in n]
    assert note.startswith("skipped 3 bad records (data.skip_bad_records):\n  ") and "skipped:" not in note
    assert "corpus.jsonl:3: not valid JSON" in note
    assert "queries.jsonl:9: field 'text' is empty" in note
    assert "qrels/train.tsv:8: expected 3 tab-separated fields" in note
    assert len(task.train_qrels) + len(task.dev_qrels) == 6


def test_the_pairs_note_reads_skipped_n_bad_records(tmp_path):
    rows = [{"query": f"q {i}", "positive": f"p {i}"} for i in range(10)]
    rows.insert(1, {"query": "q x", "positive": ""})
    _jsonl(tmp_path / "pairs.jsonl", rows)
    task = build_retrieval_task(_cfg(tmp_path / "pairs.jsonl", skip_bad_records=True))
    [note] = [n for n in task.notes if "bad record" in n]
    assert note == f"skipped 1 bad record (data.skip_bad_records):\n  {tmp_path / 'pairs.jsonl'}:2: column " \
                   "'positive' is empty"


def test_an_empty_document_or_query_is_a_bad_record(tmp_path):
    corpus = [{"_id": "100", "title": "", "text": " "}] + [{"_id": str(100 + i), "text": f"doc {i}"} for i in range(1, 8)]
    data = _beir(tmp_path / "b", corpus=corpus, train=[f"{i}\t{100 + i}\t1" for i in range(1, 6)])
    with pytest.raises(ValueError, match=r"b/corpus\.jsonl:1: empty document \(no title or text\)"):
        build_retrieval_task(_cfg(data))
    assert build_retrieval_task(_cfg(data, skip_bad_records=True)).bad_records.count == 1


# -- 2. unknown ids in the qrels: file:line -------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("5\tdXX\t1", r"beir_unk/qrels/train\.tsv:8: corpus-id 'dXX' \(query '5'\) is not in the corpus"),
    ("q77\t105\t1", r"beir_unk/qrels/train\.tsv:8: query-id 'q77' is not in the queries file"),
    ("5\tdXX\t0", r"beir_unk/qrels/train\.tsv:8: corpus-id 'dXX'"),      # score 0 is checked too
])
def test_unknown_qrels_ids_name_the_line_and_are_skipped_with_the_flag(tmp_path, line, message):
    train = [f"{i}\t{100 + i}\t1" for i in range(6)] + [line]           # header = line 1, so line 8
    data = _beir(tmp_path / "beir_unk", train=train)
    with pytest.raises(ValueError, match=message):
        build_retrieval_task(_cfg(data))
    task = build_retrieval_task(_cfg(data, skip_bad_records=True))
    assert task.bad_records.count == 1 and any("train.tsv:8" in n for n in task.notes)
    every = {**task.train_qrels, **task.dev_qrels}
    assert every == {str(i): {str(100 + i): 1} for i in range(6)}      # the bad line left no trace


def test_unknown_document_in_the_test_qrels(tmp_path):
    data = _beir(tmp_path / "b", test=["6\t106\t1", "7\tnope\t1"])
    with pytest.raises(ValueError, match=r"qrels/test\.tsv:3: corpus-id 'nope' \(query '7'\)"):
        build_retrieval_task(_cfg(data))
    task = build_retrieval_task(_cfg(data, skip_bad_records=True))
    assert task.test_qrels == {"6": {"106": 1}}


def test_a_missing_qrels_split_is_a_config_error(tmp_path):
    data = _beir(tmp_path / "b")
    (data / "qrels" / "test.tsv").unlink()
    with pytest.raises(ConfigError, match=r"data\.test_split: no qrels for split 'test'.*null: no test split"):
        build_retrieval_task(_cfg(data))
    assert build_retrieval_task(_cfg(data, test_split=None)).test_qrels == {}


def test_beir_training_examples_carry_their_qrels_line(tmp_path):
    task = build_retrieval_task(_cfg(_beir(tmp_path / "b")))
    for e in task.train_examples:
        assert e.source.endswith(f"qrels/train.tsv:{int(e.query_id) + 2}")


# -- 3. corpus-only crops -------------------------------------------------------------------------------

def _known_ids(task):
    """What the main job hands the duplicate mask and fill_negatives (text_retrieval.py)."""
    return {q: {d for d, s in docs.items() if s > 0} for q, docs in {**task.train_qrels, **task.dev_qrels}.items()}


def test_crops_have_ids_that_are_not_query_ids_and_name_their_document(tmp_path):
    data = _beir(tmp_path / "b")
    task = build_retrieval_task(_cfg(data, format="corpus"))
    assert task.unsupervised and len(task.train_examples) == 8
    known = _known_ids(task)
    texts = dict(zip(task.corpus_ids, task.corpus_texts))
    for e in task.train_examples:
        assert e.query_id == f"crop:{e.positive_id}" and e.positive_id in texts
        assert e.query_id not in task.queries and e.query_id not in known
        assert set(e.query.split()) <= set(texts[e.positive_id].split())
        assert set(e.positive.split()) <= set(texts[e.positive_id].split())
    # the crops' "known positives" are empty: no query's qrels leak onto a crop
    assert not set(task.known_positive_indices()) & {e.query_id for e in task.train_examples}
    # dev and test still come from the folder's qrels
    assert set(task.dev_qrels) | set(task.train_qrels) == {str(i) for i in range(6)} and len(task.test_qrels) == 2


def test_crop_ids_drive_the_masks_and_random_negatives(tmp_path):
    task = build_retrieval_task(_cfg(_beir(tmp_path / "b"), format="corpus"))
    known = _known_ids(task)
    # random negatives never draw a crop's own document
    filled = fill_negatives(task.train_examples, 7, task.corpus_ids, task.corpus_texts, known, seed=0)
    for e in filled:
        assert e.positive_id not in e.negative_ids and len(set(e.negative_ids)) == 7
    # a batch holding two crop pairs of document 100 and one of 101: the duplicate mask (as
    # RetrievalStep.masks builds it) drops the other pair's crop of 100, and nothing else
    a, b = task.train_examples[0], task.train_examples[1]
    assert (a.positive_id, b.positive_id) == ("100", "101")
    batch = [a, b, a]
    cols = mnrl_columns(batch, key="id")
    mask = DuplicatePositiveMask([set(known.get(e.query_id, ())) for e in batch], cols, torch.arange(3))
    assert mask.pairs().tolist() == [[0, 2], [2, 0]]


def test_crop_ids_never_collide_with_a_query_id(tmp_path):
    queries = [{"_id": str(i), "text": f"topic {i}?"} for i in range(8)] + [{"_id": "crop:100", "text": "odd id"}]
    task = build_retrieval_task(_cfg(_beir(tmp_path / "b", queries=queries), format="corpus"))
    ids = {e.query_id for e in task.train_examples}
    assert "_crop:100" in ids and not ids & {"crop:100", *map(str, range(8))}


def test_bundled_scifact_crops_do_not_take_query_ids():
    # SciFact's query ids are small integers, as the row indices the crops once had
    task = build_retrieval_task(DataConfig(source="scifact", format="corpus"))
    ids = [e.query_id for e in task.train_examples]
    assert len(ids) == len(set(ids)) == len(task.train_examples) > 5000
    assert not set(ids) & set(load_beir().queries)
    corpus = set(task.corpus_ids)
    assert all(e.positive_id in corpus and e.query_id == "crop:" + e.positive_id for e in task.train_examples)


@pytest.mark.parametrize("layout", ["jsonl", "folder", "txt"])
def test_a_corpus_alone_trains_on_crops_without_evaluation(tmp_path, layout):
    docs = [{"_id": f"doc{i}", "title": f"t{i}", "text": f"a document about subject {i} with words"} for i in range(6)]
    if layout == "txt":
        source = tmp_path / "docs.txt"
        source.write_text("".join(f"{d['title']} {d['text']}\n" for d in docs))
    else:
        (tmp_path / "c").mkdir()
        _jsonl(tmp_path / "c" / "corpus.jsonl", docs)
        source = tmp_path / "c" / "corpus.jsonl" if layout == "jsonl" else tmp_path / "c"
    task = build_retrieval_task(_cfg(source, format="corpus", document_prefix="passage: "))
    assert task.unsupervised and len(task.train_examples) == 6 == len(task.corpus_ids)
    assert (task.train_qrels, task.dev_qrels, task.test_qrels, task.queries) == ({}, {}, {}, {})
    assert any("no dev evaluation" in n for n in task.notes) and "no dev or test evaluation" in task.description
    e = task.train_examples[0]
    assert e.query_id == f"crop:{e.positive_id}" and e.positive.startswith("passage: ")
    if layout != "txt":
        assert task.corpus_ids == [d["_id"] for d in docs]
        assert task.corpus_texts[0] == "passage: t0 a document about subject 0 with words"


def test_a_corpus_file_with_a_bad_line(tmp_path):
    rows = [{"_id": "a", "text": "one two three four"}, "{oops", {"_id": "b", "text": "five six seven eight"}]
    _jsonl(tmp_path / "corpus.jsonl", rows)
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: not valid JSON"):
        build_retrieval_task(_cfg(tmp_path / "corpus.jsonl", format="corpus"))
    task = build_retrieval_task(_cfg(tmp_path / "corpus.jsonl", format="corpus", skip_bad_records=True))
    assert task.corpus_ids == ["a", "b"] and task.bad_records.count == 1
    assert any(n.startswith("skipped 1 bad record (data.skip_bad_records):\n  ") and "corpus.jsonl:2" in n
               for n in task.notes)


def test_a_folder_with_only_a_corpus_says_to_use_format_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    _jsonl(tmp_path / "c" / "corpus.jsonl", [{"_id": "a", "text": "one two three"}])
    with pytest.raises(ConfigError, match="has no queries.jsonl.*for a corpus alone use data.format: corpus"):
        build_retrieval_task(_cfg(tmp_path / "c"))
