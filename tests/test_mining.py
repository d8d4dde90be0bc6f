"""Hard-negative mining: hand-made cases, a naive reference, filters, seeds, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastkit.data import Example
from contrastkit.negatives import MinedNegatives, known_positives, mine_hard_negatives


def naive_mine(q, c, positives, num_negatives, window, relative_margin, absolute_margin):
    """Full score matrix, stable sort, positives removed, window, filters, top survivors."""
    s = (q.double() @ c.double().T).numpy()
    out = []
    for i, pos in enumerate(positives):
        order = [j for j in np.argsort(-s[i], kind="stable") if j not in set(pos)]
        cand = order[window[0]:window[1]]
        sp = s[i, pos[0]]
        keep = [j for j in cand if not (relative_margin is not None and s[i, j] > sp - (1 - relative_margin) * abs(sp))
                and not (absolute_margin is not None and s[i, j] > sp - absolute_margin)]
        out.append([int(j) for j in keep[:num_negatives]])
    return out


def test_hand_made_ranking_window_and_margins():
    c = torch.eye(8)
    # query 0 scores document j by w[j]; its positive is document 0 (score 1.0)
    w = torch.tensor([[1.0, 0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    m = mine_hard_negatives(w, c, [[0]], num_negatives=3, rank_window=(0, 8), relative_margin=None)
    assert m.indices == [[1, 2, 3]] and m.scores[0] == pytest.approx([0.99, 0.9, 0.8])
    assert m.positive_scores == [pytest.approx(1.0)]
    # skip the first two ranks (after removing the positive)
    m = mine_hard_negatives(w, c, [[0]], num_negatives=3, rank_window=(2, 8), relative_margin=None)
    assert m.indices == [[3, 4, 5]]
    # NV-Retriever 95%: 0.99 > 0.95 * 1.0 is dropped
    m = mine_hard_negatives(w, c, [[0]], num_negatives=3, rank_window=(0, 8), relative_margin=0.95)
    assert m.indices == [[2, 3, 4]] and m.stats["filtered"] == 1 and m.stats["candidates"] == 7
    # absolute margin 0.15: drop scores above 0.85
    m = mine_hard_negatives(w, c, [[0]], num_negatives=3, rank_window=(0, 8), relative_margin=None,
                            absolute_margin=0.15)
    assert m.indices == [[3, 4, 5]] and m.stats["filtered"] == 2
    # both filters: the stricter wins per candidate
    m = mine_hard_negatives(w, c, [[0]], num_negatives=2, rank_window=(0, 8), relative_margin=0.95,
                            absolute_margin=0.15)
    assert m.indices == [[3, 4]]
    # other known positives (doc 1 here) never come back as negatives
    m = mine_hard_negatives(w, c, [[0, 1]], num_negatives=2, rank_window=(0, 8), relative_margin=None)
    assert m.indices == [[2, 3]]
    # the margin refers to the row's own (first) positive, not the best-scoring one
    m = mine_hard_negatives(w, c, [[3, 0]], num_negatives=2, rank_window=(0, 8), relative_margin=0.95)
    assert m.indices == [[4, 5]]  # 0.99, 0.9 > 0.95 * 0.8 = 0.76 dropped, and 0.7 <= 0.76 kept


def test_short_window_counted():
    c = torch.eye(5)
    q = torch.tensor([[1.0, 0.5, 0.4, 0.0, 0.0], [0.0, 1.0, 0.98, 0.97, 0.5]])
    m = mine_hard_negatives(q, c, [[0], [1]], num_negatives=3, rank_window=(0, 3), relative_margin=0.95)
    assert m.indices[0] == [1, 2, 3]
    assert m.indices[1] == [4]  # 0.98 and 0.97 filtered, window (0, 3) ends before more
    assert m.stats["short_queries"] == 1 and m.stats["no_negative_queries"] == 0
    m = mine_hard_negatives(q, c, [[0], [1]], num_negatives=2, rank_window=(10, 20))
    assert m.indices == [[], []] and m.stats["no_negative_queries"] == 2
    text = m.summary()
    assert "queries short of negatives: 2" in text and "negative score: none" in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(37, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(300, 16, generator=g), dim=1)
    pos = [[int(j) for j in torch.randperm(300, generator=g)[: 1 + i % 3]] for i in range(37)]
    for window, rm, am in [((0, 30), 0.95, None), ((3, 50), None, 0.05), ((5, 12), 0.9, 0.1), ((0, 300), None, None)]:
        m = mine_hard_negatives(q, c, pos, num_negatives=4, rank_window=window, relative_margin=rm, absolute_margin=am,
                                method="exact")
        assert m.indices == naive_mine(q, c, pos, 4, window, rm, am)
        for i, row in enumerate(m.indices):
            assert m.scores[i] == pytest.approx([float(q[i] @ c[j]) for j in row], abs=1e-5)
            assert not set(row) & set(pos[i])
    f = mine_hard_negatives(q, c, pos, num_negatives=4, rank_window=(0, 30), method="faiss-flat", query_block_size=5)
    assert f.indices == naive_mine(q, c, pos, 4, (0, 30), 0.95, None)
    hnsw = mine_hard_negatives(q, c, pos, num_negatives=4, rank_window=(0, 30), method="faiss-hnsw")
    overlap = sum(len(set(a) & set(b)) for a, b in zip(hnsw.indices, f.indices)) / sum(map(len, f.indices))
    assert overlap > 0.9  # approximate search, nearly the same negatives


def test_random_sampling_seeded_within_window():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    c = F.normalize(torch.randn(200, 8, generator=g), dim=1)
    c[:20] = F.normalize(q + 0.2 * torch.randn(20, 8, generator=g), dim=1)  # positives close to their queries
    pos = [[i] for i in range(20)]
    a = mine_hard_negatives(q, c, pos, num_negatives=3, rank_window=(2, 20), sampling="random", seed=5)
    b = mine_hard_negatives(q, c, pos, num_negatives=3, rank_window=(2, 20), sampling="random", seed=5)
    other = mine_hard_negatives(q, c, pos, num_negatives=3, rank_window=(2, 20), sampling="random", seed=6)
    assert a.indices == b.indices and a.indices != other.indices
    blocked = mine_hard_negatives(q, c, pos, num_negatives=3, rank_window=(2, 20), sampling="random", seed=5,
                                  query_block_size=3)
    assert blocked.indices == a.indices and blocked.stats["filtered"] == a.stats["filtered"]  # blocking-independent
    allowed = mine_hard_negatives(q, c, pos, num_negatives=18, rank_window=(2, 20), relative_margin=0.95)
    for i in range(20):
        assert len(a.indices[i]) == 3 and set(a.indices[i]) <= set(allowed.indices[i])
        ranks = [allowed.indices[i].index(j) for j in a.indices[i]]
        assert ranks == sorted(ranks)  # returned in rank order
    # spread: the draw reaches beyond the top three
    assert any(set(a.indices[i]) != set(allowed.indices[i][:3]) for i in range(20))


def test_stats_and_to_examples():
    c = torch.eye(6)
    q = torch.tensor([[1.0, 0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.2, 1.0, 0.4, 0.0, 0.0]])
    m = mine_hard_negatives(q, c, [[0], [2]], num_negatives=1, rank_window=(0, 5))
    assert m.stats["positive_score"]["mean"] == pytest.approx(1.0)
    assert m.stats["negative_score"]["mean"] == pytest.approx(0.45)
    assert m.stats["gap"]["mean"] == pytest.approx(0.55)
    texts = [f"doc{j}" for j in range(6)]
    ex = [Example("q0", "doc0", negatives=("old",)), Example("q1", "doc2")]
    out = m.to_examples(ex, texts, [f"id{j}" for j in range(6)])
    assert out[0].negatives == ("doc1",) and out[0].negative_ids == ("id1",) and out[1].negatives == ("doc3",)
    assert out[0].query == "q0" and ex[0].negatives == ("old",)
    short = mine_hard_negatives(q, c, [[0], [2]], num_negatives=5, rank_window=(0, 2))
    assert len(short.to_examples(ex, texts, drop_short=True)) == 0
    with pytest.raises(ValueError, match="2 examples for 1 mined rows"):
        MinedNegatives([[1]], [[0.5]], [1.0]).to_examples(ex, texts)


def test_known_positives():
    ex = [Example("q", "A", query_id="1", positive_id="d0"), Example("q", "C", query_id="1", positive_id="d2"),
          Example("r", "B", query_id="2", positive_id="d1"), Example("s", "C")]
    ids, texts = ["d0", "d1", "d2"], ["A", "B", "C"]
    assert known_positives(ex, corpus_ids=ids, corpus_texts=texts) == [[0, 2], [2, 0], [1], [2]]
    assert known_positives(ex, corpus_texts=texts) == [[0, 2], [2, 0], [1], [2]]
    with pytest.raises(ValueError, match="f.jsonl:3: the positive_id 'd9' is not in the corpus"):
        known_positives([Example("q", "A", positive_id="d9", source="f.jsonl:3")], corpus_ids=ids)
    with pytest.raises(ValueError, match="example 0: the positive text"):
        known_positives([Example("q", "Z")], corpus_texts=texts)


def test_scifact_positives_round_trip():
    import contrastkit as ck

    ds = ck.data.load_beir()
    ex = ds.examples("train")
    ids, texts = ds.corpus_texts()
    pos = known_positives(ex, corpus_ids=ids)
    assert all(ids[p[0]] == e.positive_id and texts[p[0]] == e.positive for p, e in zip(pos, ex))
    multi = [p for p in pos if len(p) > 1]
    assert multi and all(len(set(p)) == len(p) for p in pos)


@pytest.mark.parametrize("kwargs, message", [
    (dict(positives=[[0], [9]]), r"positives\[1\] holds corpus index 9, outside \[0, 6\)"),
    (dict(positives=[[0], []]), r"positives\[1\] is empty"),
    (dict(positives=[[0]]), "1 rows for 2 query rows"),
    (dict(rank_window=(5, 5)), "is empty: need start < stop"),
    (dict(rank_window=(-1, 5)), "rank_window start must be an int >= 0"),
    (dict(rank_window=5), r"rank_window must be \(start, stop\)"),
    (dict(num_negatives=0), "num_negatives must be an int >= 1"),
    (dict(sampling="hard"), "sampling must be one of"),
    (dict(relative_margin=1.5), r"relative_margin must be None or in \(0, 1\]"),
    (dict(absolute_margin=float("nan")), "absolute_margin must be None or a finite number"),
    (dict(query_embeddings=torch.randn(2, 3)), "dimension"),
    (dict(corpus_embeddings=torch.randn(6)), r"corpus_embeddings \(C, d\)"),
    (dict(method="annoy"), "method must be one of"),
])
def test_bad_input(kwargs, message):
    args = dict(query_embeddings=torch.randn(2, 4), corpus_embeddings=torch.randn(6, 4), positives=[[0], [1]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(args.pop("query_embeddings"), args.pop("corpus_embeddings"), args.pop("positives"), **args)


def test_non_finite_row_named_in_the_whole_input_and_checked_once(monkeypatch):
    """Mining searches query block by query block; the NaN / inf scan of the inputs runs once
    for the whole call (not once per block), and names the bad row's index in the whole input."""
    import contrastkit.search.exact as exact

    calls = []
    real = exact.check_search_inputs
    monkeypatch.setattr(exact, "check_search_inputs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    q, c = F.normalize(torch.randn(7, 4), dim=-1), F.normalize(torch.randn(20, 4), dim=-1)
    m = mine_hard_negatives(q, c, [[i] for i in range(7)], num_negatives=2, rank_window=(0, 5), query_block_size=2,
                            relative_margin=None)
    assert len(calls) == 1 and m.indices == naive_mine(q, c, [[i] for i in range(7)], 2, (0, 5), None, None)
    q[5, 1] = float("nan")
    with pytest.raises(ValueError, match="queries row 5 has a non-finite value"):
        mine_hard_negatives(q, c, [[i] for i in range(7)], query_block_size=2)
    c[13, 0] = float("inf")
    q[5, 1] = 0.0
    with pytest.raises(ValueError, match="corpus row 13 has a non-finite value"):
        mine_hard_negatives(q, c, [[i] for i in range(7)], query_block_size=2)


# ---------------------------------------------------------------- contrastkit mine (tiny model, tiny corpus)

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from contrastkit.models import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), local_files_only=True)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


WORDS = ("protein cell gene tumor virus brain heart blood drug dose trial mouse human risk age sleep diet bone "
         "lung liver kidney skin immune vaccine infection insulin").split()


def tiny_beir(root, n_docs=30, n_queries=6):
    import json as _json
    import random as _random

    rng = _random.Random(0)
    folder = root / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {f"d{j}": " ".join(rng.choice(WORDS) for _ in range(12)) for j in range(n_docs)}
    (folder / "corpus.jsonl").write_text("".join(_json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                                 for k, v in docs.items()))
    (folder / "queries.jsonl").write_text("".join(_json.dumps({"_id": f"q{i}", "text": " ".join(rng.choice(WORDS) for _ in range(5))}) + "\n"
                                                  for i in range(n_queries)))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n_queries)) + "q0\td7\t1\n"
    (folder / "qrels" / "train.tsv").write_text(qrels)
    return folder


def test_cli_mine_beir_round_trip(tmp_path, tiny_model, capsys):
    from contrastkit.cli import main
    from contrastkit.data import load_beir, read_examples
    from contrastkit.models import TextEncoder

    folder = tiny_beir(tmp_path)
    out = tmp_path / "mined.jsonl"
    argv = ["mine", "--model", tiny_model, "--data", str(folder), "--output", str(out), "--num-negatives", "2",
            "--rank-window", "0", "10", "--relative-margin", "none", "--precision", "fp32", "--max-length", "32",
            "--stats-json", str(tmp_path / "stats.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "positive score: mean" in printed and "wrote 7 examples" in printed
    mined = list(read_examples(out))
    ds = load_beir(folder)
    ids, texts = ds.corpus_texts()
    assert len(mined) == 7 and all(len(e.negatives) == 2 for e in mined)
    # the negatives are the naive ranking's top 2 after removing the query's positives
    enc = TextEncoder(tiny_model, normalize=True, max_length=32)
    qe = enc.encode([e.query for e in mined], precision="fp32")
    ce = enc.encode(texts, precision="fp32")
    s = (qe @ ce.T).double()
    for i, e in enumerate(mined):
        known = {d for q, d in ((x.query_id, x.positive_id) for x in ds.examples("train")) if q == e.query_id}
        order = [ids[j] for j in torch.argsort(-s[i], stable=True).tolist() if ids[j] not in known]
        assert list(e.negative_ids) == order[:2]
        assert e.negatives == tuple(texts[ids.index(d)] for d in e.negative_ids)
        assert e.query_id is not None and e.positive_id in known
    assert json.loads((tmp_path / "stats.json").read_text())["written"] == 7
    # an existing output is not replaced without --overwrite
    before = out.read_bytes()
    assert main(argv) == 2 and out.read_bytes() == before
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--num-negatives", "1"]) == 0
    assert all(len(e.negatives) == 1 for e in read_examples(out))


def test_cli_mine_pairs_with_and_without_corpus(tmp_path, tiny_model, capsys):
    from contrastkit.cli import main
    from contrastkit.data import read_examples

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"{w} question", "positive": f"{w} answer about {w}"}) + "\n"
                             for w in WORDS[:12]))
    out = tmp_path / "out.jsonl"
    common = ["--model", tiny_model, "--num-negatives", "3", "--rank-window", "0", "8", "--relative-margin", "none",
              "--precision", "fp32"]
    assert main(["mine", "--pairs", str(pairs), "--output", str(out)] + common) == 0
    got = list(read_examples(out))
    assert len(got) == 12
    for e in got:
        assert e.positive not in e.negatives and len(set(e.negatives)) == 3
        assert set(e.negatives) <= {f"{w} answer about {w}" for w in WORDS[:12]}  # corpus = the positives
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{w} {w} notes\n" for w in WORDS) + f"{WORDS[0]} answer about {WORDS[0]}\n")
    out2 = tmp_path / "out2.jsonl"
    assert main(["mine", "--pairs", str(pairs), "--corpus", str(corpus), "--output", str(out2), "--keep-short"]
                + common) == 0
    assert "11 positives were not in" in capsys.readouterr().out
    assert len(list(read_examples(out2))) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs.read_text() + '{"query": "q"}\n')
    assert main(["mine", "--pairs", str(bad), "--output", str(tmp_path / "o3.jsonl")] + common) == 2
    assert "bad.jsonl:13: record has no 'positive' column" in capsys.readouterr().err
    assert main(["mine", "--pairs", str(bad), "--output", str(tmp_path / "o3.jsonl"), "--skip-bad-records"] + common) == 0
    assert "1 bad record skipped" in capsys.readouterr().out


def test_relative_margin_with_negative_positive_score():
    c = torch.eye(4)
    q = torch.tensor([[-0.5, -0.49, -0.6, -0.52]])  # the positive (doc 0) scores -0.5
    m = mine_hard_negatives(q, c, [[0]], num_negatives=3, rank_window=(0, 4), relative_margin=0.95)
    # threshold -0.5 - 0.05 * 0.5 = -0.525: -0.49 and -0.52 are dropped, -0.6 is kept
    assert m.indices == [[2]] and m.stats["filtered"] == 2


def test_same_negatives_as_sentence_transformers(tiny_model):
    """Where the two definitions coincide (start 0, one positive per query, a long window),
    sentence-transformers' mine_hard_negatives picks the same negatives from the same embeddings."""
    st = pytest.importorskip("sentence_transformers")
    datasets = pytest.importorskip("datasets")
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    tr = Transformer(tiny_model, max_seq_length=32)
    dim = tr.get_embedding_dimension() if hasattr(tr, "get_embedding_dimension") else tr.get_word_embedding_dimension()
    model = st.SentenceTransformer(modules=[tr, Pooling(dim, "mean"), Normalize()], device="cpu")
    import random as _random

    rng = _random.Random(1)
    queries = [" ".join(rng.choice(WORDS) for _ in range(4)) + f" q{i}" for i in range(12)]
    corpus = [" ".join(rng.choice(WORDS) for _ in range(10)) + f" d{j}" for j in range(60)]
    data = datasets.Dataset.from_dict({"query": queries, "positive": corpus[:12]})
    for rel in (None, 0.05):
        out = st_mine(data, model, corpus=corpus, num_negatives=3, range_min=0, range_max=40, relative_margin=rel,
                      sampling_strategy="top", output_format="n-tuple", use_faiss=False, verbose=False, batch_size=16)
        theirs = {r["query"]: [r[f"negative_{h}"] for h in (1, 2, 3)] for r in out}
        qe = model.encode(queries, convert_to_tensor=True)
        ce = model.encode(corpus, convert_to_tensor=True)
        ours = mine_hard_negatives(qe, ce, [[i] for i in range(12)], num_negatives=3, rank_window=(0, 40),
                                   relative_margin=None if rel is None else 1 - rel)
        assert theirs, "sentence-transformers mined nothing"
        for i, qtext in enumerate(queries):
            if qtext in theirs:
                assert [corpus[j] for j in ours.indices[i]] == theirs[qtext]
        full = [i for i in range(12) if len(ours.indices[i]) == 3]
        assert set(theirs) == {queries[i] for i in full}
