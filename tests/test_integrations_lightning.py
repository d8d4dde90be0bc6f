"""contrastkit.integrations.lightning.ContrastiveModule: a real lightning.Trainer drives the
GradCache hook mode. Two SGD steps on a tiny BERT (built here, float64, no dropout) end at
the weights of a plain, uncached loop on the same batches, the learnable temperature
included."""

from __future__ import annotations

import copy

import pytest
import torch

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")

import contrastkit as ck
from contrastkit.integrations.lightning import ContrastiveModule
from contrastkit.models import TextEncoder

from conftest import assert_rel_close


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_encoder() -> TextEncoder:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return TextEncoder(model=transformers.BertModel(cfg, add_pooling_layer=False).double(), pooling="mean")


def token_batch(n: int, seed: int, max_len: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(1, 60, (n, max_len), generator=g) * mask, "attention_mask": mask}


class SGDModule(ContrastiveModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lightning_trainer_equals_plain_loop(tmp_path):
    batches = [tuple(token_batch(7, seed=10 * b + g) for g in range(3)) for b in range(2)]
    encoder = tiny_encoder()
    objective = ck.losses.InfoNCE(temperature=0.1, learn_temperature=True).double()
    ref_encoder, ref_objective = copy.deepcopy(encoder), copy.deepcopy(objective)

    module = SGDModule(encoder, objective, chunk_size=3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2

    params = list(ref_encoder.parameters()) + list(ref_objective.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    for q, d, n in batches:  # plain: whole batch with autograd, negatives as extra candidate columns
        a, p, h = ref_encoder(**q), ref_encoder(**d), ref_encoder(**n)
        loss = ref_objective(a, torch.cat([p, h]), positives=torch.arange(7))
        loss.backward()
        opt.step()
        opt.zero_grad()
    named = list(module.named_parameters())
    assert len(named) == len(params) and named[-1][0].startswith("objective.")
    for (name, x), y in zip(named, params):
        assert_rel_close(x.detach(), y.detach(), rtol=1e-10, atol=1e-13, what=name)
    moved = 0.0
    for x, x0 in zip(module.encoder.parameters(), tiny_encoder().parameters()):
        moved = max(moved, float((x - x0).detach().abs().max()))
    assert moved > 1e-4, "the weights must move for the comparison to mean anything"
    assert float(objective.temperature().detach()) != pytest.approx(0.1, abs=1e-9)


def test_bad_batch():
    module = ContrastiveModule(tiny_encoder())
    with pytest.raises(ValueError, match="at least 2 input groups"):
        module.loss(token_batch(4, seed=1))
    with pytest.raises(ValueError, match="lr must be positive"):
        ContrastiveModule(tiny_encoder(), lr=0.0)
