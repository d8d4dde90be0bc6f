"""data.stream: the bounded hold-out pass (exact against a sort of all hashes, by query,
bounded memory) and the streamed retrieval task (the same records, ids and prefixes as
the in-memory reader, held-out queries never trained on)."""

import dataclasses
import json
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastkit.data import Example
from contrastkit.data.stream import hold_out, key_hash, query_key
from contrastkit.recipes.retrieval_task import build_retrieval_task
from contrastkit.training.config import ConfigError, load_config


def _records(n, n_queries, seed=0, negatives=0):
    rng = random.Random(seed)
    for i in range(n):
        q = rng.randrange(n_queries)
        yield Example(f"query {q}", f"doc {rng.randrange(3 * n_queries)}",
                      negatives=tuple(f"doc {rng.randrange(3 * n_queries)}" for _ in range(negatives)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), n_queries=st.integers(1, 40), num_dev=st.integers(0, 6), num_test=st.integers(0, 6),
       fraction=st.floats(0.01, 0.5), seed=st.integers(0, 5))
def test_hold_out_takes_the_smallest_hashes_by_query(n, n_queries, num_dev, num_test, fraction, seed):
    rng = random.Random(seed)
    records = [dataclasses.replace(e, negatives=tuple(f"doc n{k}" for k in range(rng.randrange(4))))
               for e in _records(n, n_queries, seed)]
    split = hold_out(lambda: iter(records), seed=seed, num_dev=num_dev, num_test=num_test, fraction=fraction,
                     num_distractors=5, document_id=lambda t: t)
    keys = sorted({query_key(e) for e in records}, key=lambda k: key_hash(k, seed))   # the naive split
    share = max(1, int(fraction * n))
    n_test, n_dev = min(num_test, share, len(keys)), min(num_dev, share, max(0, len(keys) - min(num_test, share)))
    assert split.test_keys == set(keys[:n_test])
    assert split.dev_keys == set(keys[n_test:n_test + n_dev])
    # every record of a held-out query is held out with it, in its split; the rest are counted for training
    assert sorted(map(repr, split.test)) == sorted(repr(e) for e in records if query_key(e) in split.test_keys)
    assert sorted(map(repr, split.dev)) == sorted(repr(e) for e in records if query_key(e) in split.dev_keys)
    assert split.train_records == sum(1 for e in records if not split.is_held_out(e))
    assert split.train_min_negatives == min((len(e.negatives) for e in records if not split.is_held_out(e)),
                                            default=None)
    assert split.records == n
    docs = {t for e in records for t in (e.positive, *e.negatives)}
    assert len(split.distractors) == min(5, len(docs)) and set(split.distractors) <= docs


def test_hold_out_is_seeded_and_its_reservoir_samples_the_whole_file():
    records = list(_records(3000, 500, seed=1))
    a = hold_out(lambda: iter(records), seed=3, num_dev=10, num_test=10, fraction=0.1, num_distractors=50,
                 document_id=lambda t: t)
    b = hold_out(lambda: iter(records), seed=3, num_dev=10, num_test=10, fraction=0.1, num_distractors=50,
                 document_id=lambda t: t)
    c = hold_out(lambda: iter(records), seed=4, num_dev=10, num_test=10, fraction=0.1, num_distractors=50,
                 document_id=lambda t: t)
    assert (a.test_keys, a.dev_keys, a.distractors) == (b.test_keys, b.dev_keys, b.distractors)
    assert a.test_keys != c.test_keys and a.distractors != c.distractors
    # documents first seen late in the file are sampled too (not only the first 50)
    first_seen = {}
    for i, e in enumerate(records):
        first_seen.setdefault(e.positive, i)
    assert max(first_seen[d] for d in a.distractors) > 1000


def test_hold_out_refuses_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        hold_out(lambda: iter([]), seed=0, num_dev=1, num_test=1, fraction=0.0, num_distractors=0,
                 document_id=str)
    with pytest.raises(ValueError, match="num_dev"):
        hold_out(lambda: iter([]), seed=0, num_dev=-1, num_test=1, fraction=0.1, num_distractors=0,
                 document_id=str)


def _peak_bytes(n):
    tracemalloc.start()
    try:
        hold_out(lambda: _records(n, n // 2, negatives=2), seed=0, num_dev=20, num_test=20, fraction=0.1,
                 num_distractors=200, document_id=lambda t: t)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hold_out_memory_does_not_grow_with_the_file():
    small, large = _peak_bytes(5_000), _peak_bytes(40_000)
    # 8x the records (and the distinct queries and documents): the pass holds its caps, not the file
    assert large < 1.5 * small, (small, large)


# -- the streamed retrieval task ------------------------------------------------------------------

def _write_pairs(path, n=120, n_queries=60, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = i % n_queries
            rec = {"query": f"what about topic {q}?", "positive": f"topic {q} is described in note {i}"}
            if i % 3 == 0:
                rec["negative"] = f"unrelated text {rng.randrange(1000)}"
            f.write(json.dumps(rec) + "\n")
    return path


def _cfg(source, *extra):
    return load_config(overrides=[f"data.source={source}", *extra]).data


def test_streamed_task_trains_on_exactly_the_records_not_held_out(tmp_path):
    path = _write_pairs(tmp_path / "pairs.jsonl")
    cfg = _cfg(path, "data.stream=true", "data.stream_eval_queries=5", "data.stream_distractors=30",
               "data.query_prefix=query: ", "data.document_prefix=passage: ")
    task = build_retrieval_task(cfg, seed=0)
    assert task.train_examples == [] and len(task.test_qrels) == 5 and len(task.dev_qrels) == 5
    streamed = list(task.train_stream())
    assert len(streamed) == task.train_count == task.num_train_examples
    assert list(task.train_stream()) == streamed                            # read again, the same
    held = set(task.dev_qrels) | set(task.test_qrels)
    assert not {e.query_id for e in streamed} & held                         # never trained on
    # the same records, ids, prefixes as the in-memory reader gives for those queries
    memory = build_retrieval_task(_cfg(path, "data.query_prefix=query: ", "data.document_prefix=passage: "), seed=0)
    by_query = {}
    for e in memory.train_examples:
        by_query.setdefault(e.query_id, []).append(e)
    assert all(e.query.startswith("query: ") and e.positive.startswith("passage: ") for e in streamed)
    for e in streamed:
        if e.query_id in by_query:
            assert any(m.positive_id == e.positive_id and m.negatives == e.negatives for m in by_query[e.query_id])
    # held-out records: every positive is in the corpus with its qrels; the corpus has distractors too
    assert all(d in task.corpus_ids for docs in task.test_qrels.values() for d in docs)
    assert len(task.corpus_ids) > sum(len(d) for d in task.test_qrels.values()) + 5
    assert task.test_is_held_out_from_train_file and any("data.stream" in n for n in task.notes)


def test_streamed_task_counts_bad_records_once_and_names_them(tmp_path):
    path = _write_pairs(tmp_path / "pairs.jsonl", n=40, n_queries=20)
    with open(path, "a") as f:
        f.write('{"query": "q", "positive": ""}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:41: column 'positive' is empty"):
        build_retrieval_task(_cfg(path, "data.stream=true"), seed=0)
    task = build_retrieval_task(_cfg(path, "data.stream=true", "data.skip_bad_records=true"), seed=0)
    assert task.bad_records.count == 1
    list(task.train_stream())
    assert task.bad_records.count == 1


def test_streamed_task_limits_and_refusals(tmp_path):
    path = _write_pairs(tmp_path / "pairs.jsonl")
    task = build_retrieval_task(_cfg(path, "data.stream=true", "data.max_train_examples=7"), seed=0)
    assert task.train_count == 7 and len(list(task.train_stream())) == 7
    with pytest.raises(ConfigError, match="data.stream: reads a pairs"):
        build_retrieval_task(_cfg("scifact", "data.stream=true"), seed=0)
    with pytest.raises(ConfigError, match="data.shuffle_buffer: only read with data.stream: true"):
        load_config(overrides=["data.shuffle_buffer=5"])
    tiny = _write_pairs(tmp_path / "two.jsonl", n=2, n_queries=2)
    with pytest.raises(ValueError, match="no record is left for training"):
        build_retrieval_task(_cfg(tiny, "data.stream=true", "data.dev_fraction=0.5"), seed=0)


def test_a_file_larger_than_memory_is_refused_unless_streamed(tmp_path, monkeypatch):
    import contrastkit.recipes.retrieval_task as rt

    path = _write_pairs(tmp_path / "pairs.jsonl")
    monkeypatch.setattr(rt, "physical_memory_bytes", lambda: 4 * path.stat().st_size - 4)
    with pytest.raises(ConfigError, match="more than a quarter of this machine's .* set data.stream: true"):
        build_retrieval_task(_cfg(path), seed=0)
    assert build_retrieval_task(_cfg(path, "data.stream=true"), seed=0).train_count > 0
    monkeypatch.setattr(rt, "physical_memory_bytes", lambda: 4 * path.stat().st_size)
    assert build_retrieval_task(_cfg(path), seed=0).train_examples


# -- a corpus alone, streamed ---------------------------------------------------------------------

def _write_corpus(path, n=60):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"doc{i}", "title": f"title {i}",
                                "text": " ".join(f"w{i}_{k}" for k in range(5 + i % 7))}) + "\n")
        f.write(json.dumps({"_id": "short", "text": "one"}) + "\n")     # too short for two crops
    return path


def test_streamed_corpus_crops_each_document_the_same_way_every_pass(tmp_path):
    path = _write_corpus(tmp_path / "corpus.jsonl")
    task = build_retrieval_task(_cfg(path, "data.format=corpus", "data.stream=true", "data.stream_distractors=10",
                                     "data.query_prefix=q: ", "data.document_prefix=p: "), seed=3)
    assert task.unsupervised and task.train_examples == [] and not task.test_qrels and not task.dev_qrels
    first = list(task.train_stream())
    assert first == list(task.train_stream()) and len(first) == task.train_count == 60
    assert [e.query_id for e in first] == [f"crop:doc{i}" for i in range(60)]
    for i, e in enumerate(first):
        words = set(f"title {i} " .split()) | {f"w{i}_{k}" for k in range(12)}
        assert e.positive_id == f"doc{i}" and e.query.startswith("q: ") and e.positive.startswith("p: ")
        assert set(e.query[3:].split()) <= words and set(e.positive[3:].split()) <= words
    assert len(task.corpus_ids) == 10 and all(t.startswith("p: ") for t in task.corpus_texts)
    other = build_retrieval_task(_cfg(path, "data.format=corpus", "data.stream=true"), seed=4)
    assert [e.query for e in other.train_stream()] != [e.query[3:] for e in first]
    limited = build_retrieval_task(_cfg(path, "data.format=corpus", "data.stream=true",
                                        "data.max_train_examples=5"), seed=3)
    assert len(list(limited.train_stream())) == limited.train_count == 5


def test_streamed_corpus_memory_does_not_grow_with_the_file(tmp_path):
    def peak(n):
        path = tmp_path / f"c{n}.txt"
        with open(path, "w") as f:
            for i in range(n):
                f.write(f"document {i} about topic {i % 97} with several more words in it\n")
        cfg = _cfg(path, "data.format=corpus", "data.stream=true", "data.stream_distractors=50")
        tracemalloc.start()
        try:
            task = build_retrieval_task(cfg, seed=0)
            for _ in task.train_stream():
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(5_000), peak(40_000)
    assert large < 1.5 * small, (small, large)

