"""The shared training loop: config validation, run folder rules, atomic checkpoints, exact resume."""

import random

import numpy as np
import pytest
import torch

from contrastkit.training import (ConfigError, RunFolder, RunFolderError, Trainer, build_schedule, load_checkpoint,
                                  load_config, save_checkpoint)
from contrastkit.training.config import describe_fields, dump_config


class ListBatches:
    """A resumable, seeded batch source over a fixed dataset (shuffled per epoch)."""

    def __init__(self, data, batch_size, seed=0):
        self.data, self.bs, self.seed = data, batch_size, seed
        self.epoch, self.pos = 0, 0

    def set_epoch(self, e):  # restarts the epoch, as the library's samplers do
        self.epoch, self.pos = e, 0

    def __len__(self):
        return len(self.data) // self.bs

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data), generator=g)
        while self.pos < len(self):
            idx = order[self.pos * self.bs:(self.pos + 1) * self.bs]
            self.pos += 1
            yield self.data[idx]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = int(s["pos"])


def _make(tmp, total_steps, *, eval_every=2, checkpoint_every=None, resume=False, overwrite=False, crash_at=None,
          ema_decay=None, seen=None, counted=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1)).double()
    data = torch.randn(40, 5, dtype=torch.float64)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    sched = build_schedule(opt, kind="linear", total_steps=total_steps, warmup_steps=2)

    calls = []

    def step_fn(batch):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise KeyboardInterrupt("killed")
        loss = (net(batch) - batch.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        return loss.detach()

    def evaluate(step):
        if seen is not None:  # the weights dev sees
            seen.append((step, [p.detach().clone() for p in net.parameters()]))
        with torch.no_grad():
            net.eval()
            return {"ndcg@10": float(-(net(data) - data.sum(1, keepdim=True)).pow(2).mean())}

    if counted:  # a step_fn that counts an event of its batches (rows with a positive first entry)
        plain = step_fn

        class CountingStep:
            pending = 0

            def __call__(self, batch):
                self.pending += int((batch[:, 0] > 0).sum())
                return plain(batch)

            def pop_stats(self):
                out, self.pending = {"positive_rows": self.pending}, 0
                return out

        step_fn = CountingStep()
    run = RunFolder.create(tmp, resume=resume, overwrite=overwrite)
    tr = Trainer(modules={"model": net}, step_fn=step_fn, batches=ListBatches(data, 8), optimizer=opt,
                 scheduler=sched, total_steps=total_steps, evaluate=evaluate, eval_every=eval_every,
                 checkpoint_every=checkpoint_every, run=run, progress=False, examples_per_step=8,
                 save_best=lambda folder: folder.mkdir(exist_ok=True), ema_decay=ema_decay)
    return tr, net


def test_resume_gives_the_same_final_weights(tmp_path):
    full, net_full = _make(tmp_path / "full", 13)
    full.fit()
    # killed during step 10 (the last checkpoint is step 7's: checkpoint_every=7), then resumed
    part, _ = _make(tmp_path / "part", 13, checkpoint_every=7, crash_at=10)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed, net_resumed = _make(tmp_path / "part", 13, resume=True)
    result = resumed.fit(resume=True)
    assert result.steps == 13
    for a, b in zip(net_full.parameters(), net_resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert resumed.best_step == full.best_step


def _train_records(run_dir):
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("phase") == "train"]


def test_step_stats_are_summed_per_record_and_over_a_resumed_run(tmp_path):
    full, _ = _make(tmp_path / "full", 13, counted=True)
    result = full.fit()
    # every batch the run drew, counted by hand (the data as _make draws it)
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    data = torch.randn(40, 5, dtype=torch.float64)
    batches, per_step = ListBatches(data, 8), []
    for epoch in range(3):
        batches.set_epoch(epoch)
        per_step += [int((b[:, 0] > 0).sum()) for b in batches]
    per_step = per_step[:13]
    assert result.stats == {"positive_rows": sum(per_step)} and sum(per_step) > 0
    records = _train_records(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 10]
    assert records[0]["positive_rows"] == per_step[0]
    assert records[1]["positive_rows"] == sum(per_step[1:10])   # since the previous record
    # killed during step 10 after a checkpoint at step 7, resumed: the same totals and records
    part, _ = _make(tmp_path / "part", 13, checkpoint_every=7, crash_at=10, counted=True)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed, _ = _make(tmp_path / "part", 13, resume=True, counted=True)
    assert resumed.fit(resume=True).stats == result.stats
    last = {k: v for k, v in _train_records(tmp_path / "part")[-1].items() if k != "time"}
    assert last == {k: v for k, v in records[-1].items() if k != "time"}


def test_run_folder_is_never_overwritten_unasked(tmp_path):
    run = RunFolder.create(tmp_path / "r")
    run.log({"phase": "x"})
    with pytest.raises(RunFolderError, match="--overwrite"):
        RunFolder.create(tmp_path / "r")
    with pytest.raises(RunFolderError, match="no checkpoint"):
        RunFolder.create(tmp_path / "r", resume=True)
    assert run.records()[0]["phase"] == "x"
    RunFolder.create(tmp_path / "r", overwrite=True)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_checkpoint_roundtrip_restores_rng_and_rejects_mismatch(tmp_path):
    net = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "c", modules={"model": net}, state={"step": 3})
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    state = load_checkpoint(tmp_path / "c", modules={"model": net})
    assert state["step"] == 3
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path / "c", modules={"model": torch.nn.Linear(3, 3, bias=False)})
    # an interrupted write leaves the previous checkpoint intact
    def boom(_):
        raise RuntimeError("disk full")
    from contrastkit.training.run_folder import atomic_replace_dir
    with pytest.raises(RuntimeError):
        atomic_replace_dir(boom, tmp_path / "c")
    assert load_checkpoint(tmp_path / "c", modules={"model": net})["step"] == 3


@pytest.mark.parametrize("override, message", [
    ("optim.schedule=foo", "optim.schedule: 'foo' is not allowed; allowed values: linear, cosine, constant"),
    ("batching.batch_size=1", "batching.batch_size: 1 must be >= 2"),
    ("nope.x=1", "unknown field nope"),
    ("optim.nope=1", "unknown field optim.nope"),
    ("optim.lr=abc", "optim.lr: expected a number"),
    ("negatives.rank_window=[5,2]", "negatives.rank_window"),
    ("train.precision=fp16", "allowed values: auto, bf16, fp32"),
    ("interpolation.alphas=[1.5]", "interpolation.alphas"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(overrides=[override])


def test_config_yaml_roundtrip_and_file_line_errors(tmp_path):
    cfg = load_config(overrides=["optim.epochs=3", "negatives.rank_window=[2, 9]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.negatives.rank_window == (2, 9)
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 1e-5\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml:"):
        load_config(tmp_path / "bad.yaml")
    assert any(row[0] == "optim.lr" for row in describe_fields())


def test_choose_alpha_prefers_the_base_within_tolerance():
    from contrastkit.training.interpolation import choose_alpha, interpolate_into, snapshot

    assert choose_alpha([0.5, 0.85, 1.0], [0.74, 0.7698, 0.7699], tolerance=0.002) == 1
    assert choose_alpha([0.5, 0.85, 1.0], [0.74, 0.7698, 0.7699], tolerance=0.0) == 2
    assert choose_alpha([1.0, 0.5], [0.7, 0.7]) == 1
    with pytest.raises(ValueError, match="one score per alpha"):
        choose_alpha([0.5], [0.1, 0.2])
    base, tuned, model = (torch.nn.Linear(3, 2).double() for _ in range(3))
    interpolate_into(model, snapshot(base), snapshot(tuned), 0.25)
    torch.testing.assert_close(model.weight, 0.75 * base.weight + 0.25 * tuned.weight)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_into(model, snapshot(base), snapshot(tuned), 1.5)


class _Run:
    """The run-folder surface best_then_interpolate uses: log records, no best/ folder."""

    def __init__(self, tmp_path):
        self.records, self.root = [], tmp_path

    def log(self, record):
        self.records.append(record)

    def file(self, name):
        return self.root / name


def _walk(tmp_path, curve, alphas, *, before, best, stop_early=True, tolerance=0.002):
    """best_then_interpolate on a one-weight 'tower' whose dev score is curve(a), a read
    back from the interpolated weight (base 0, tuned 1); returns (dev, evaluated a's, warning)."""
    from types import SimpleNamespace

    from contrastkit.recipes.common import best_then_interpolate
    from contrastkit.training.interpolation import snapshot

    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    base = snapshot(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    towers = {"query": SimpleNamespace(model=model)}
    evaluated = []

    def evaluate():
        a = float(model.weight.item())
        evaluated.append(round(a, 6))
        return {"ndcg@10": curve(a)}

    dev = {"before": {"ndcg@10": before}, "best": {"ndcg@10": best}}
    result = SimpleNamespace(best_step=None, history=[])
    warning = best_then_interpolate(towers=towers, base_states={"query": base}, result=result, run=_Run(tmp_path),
                                    dev=dev, select="ndcg@10", alphas=alphas, tolerance=tolerance,
                                    evaluate=evaluate, stop_early=stop_early, say=lambda *_: None)
    return dev, evaluated, warning, float(model.weight.item())


def test_interpolation_walk_stops_early_and_reuses_known_scores(tmp_path):
    # a rising curve: 0.85 is already more than the tolerance below a = 1, so 0.7 is skipped;
    # a = 1 and a = 0 are the known best-checkpoint and base scores (never re-evaluated)
    curve = lambda a: 0.70 + 0.1 * a  # noqa: E731
    dev, evaluated, warning, weight = _walk(tmp_path, curve, [0.0, 0.7, 0.85, 1.0], before=0.70, best=0.80)
    assert evaluated == [0.85]
    interp = dev["interpolation"]
    assert interp["alphas"] == [0.0, 0.85, 1.0] and interp["skipped"] == [0.7]
    assert interp["scores"] == [0.70, pytest.approx(0.785), 0.80]
    assert interp["chosen_alpha"] == 1.0 and weight == 1.0 and warning is None
    # without stopping early every weight is evaluated, and the choice is the same
    dev2, evaluated2, _, _ = _walk(tmp_path, curve, [0.0, 0.7, 0.85, 1.0], before=0.70, best=0.80, stop_early=False)
    assert evaluated2 == [0.85, 0.7] and dev2["interpolation"]["chosen_alpha"] == 1.0


def test_interpolation_walk_finds_an_interior_peak(tmp_path):
    # a peak at 0.7: walking down from 1, scores rise, so the walk goes on and picks 0.7
    curve = lambda a: 0.80 - (a - 0.7) ** 2  # noqa: E731
    dev, evaluated, warning, weight = _walk(tmp_path, curve, [0.0, 0.5, 0.7, 0.85, 1.0], before=curve(0.0),
                                            best=curve(1.0), tolerance=0.0)
    assert evaluated == [0.85, 0.7, 0.5]          # 0.5 is below 0.7's score: the walk stops there
    assert dev["interpolation"]["chosen_alpha"] == 0.7 and weight == pytest.approx(0.7)
    assert warning is None


def test_interpolation_keeps_the_base_and_warns_when_tuning_did_not_help(tmp_path):
    curve = lambda a: 0.7225 - 0.002 * a  # noqa: E731
    dev, _, warning, weight = _walk(tmp_path, curve, [0.0, 0.7, 0.85, 1.0], before=0.7225, best=0.7218)
    assert dev["interpolation"]["chosen_alpha"] == 0.0 and weight == 0.0
    assert "did not improve the dev score" in warning and "base model (a = 0" in warning
    # a grid without 0: the tuned model is kept, and the warning says how to keep the base
    _, _, warning, weight = _walk(tmp_path, curve, [0.85, 1.0], before=0.7225, best=0.7218)
    assert weight > 0 and "put 0.0 in interpolation.alphas" in warning


# -- layer-wise learning-rate decay (optim.layer_decay) ------------------------------------

class _NamedBlocks(torch.nn.Module):
    """Parameter names of a decoder-style model: embed_tokens, layers.N, a final norm."""

    def __init__(self, n_layers=3):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 4)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n_layers))
        self.norm = torch.nn.LayerNorm(4)


def test_layer_depths_read_block_numbers_across_architectures():
    from contrastkit.recipes.common import layer_depths

    depths, n_layers = layer_depths(_NamedBlocks(3))
    assert n_layers == 3
    assert depths["embed_tokens.weight"] == 0
    assert [depths[f"layers.{i}.weight"] for i in range(3)] == [1, 2, 3]
    assert depths["norm.weight"] == depths["norm.bias"] == 4  # the top
    depths, n_layers = layer_depths(torch.nn.Linear(3, 3))
    assert n_layers == 0 and set(depths.values()) == {1}


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_layer_decay_sets_each_parameter_lr_by_depth_and_keeps_ratios_through_the_schedule(tmp_path, decay):
    from contrastkit.models import TextEncoder
    from contrastkit.recipes.common import _no_decay, build_optimizer, layer_depths
    from main_job_fixtures import make_tiny_model

    enc = TextEncoder(str(make_tiny_model(tmp_path / "m")))
    temperature = torch.nn.Parameter(torch.zeros(()))  # a module with no numbered blocks
    extra = torch.nn.Module()
    extra.log_temperature = temperature
    cfg = load_config(overrides=[f"optim.layer_decay={decay}", "optim.lr=0.01", "optim.weight_decay=0.1"])
    opt = build_optimizer({"query": enc, "objective": extra}, cfg)
    depths, n_layers = layer_depths(enc)
    assert n_layers == 2
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(enc.named_parameters())
    assert len(where) == sum(p.requires_grad for p in params.values()) + 1  # each parameter in one group
    for name, p in params.items():
        g = where[id(p)]
        assert g["lr"] == pytest.approx(0.01 * decay ** (n_layers + 1 - depths[name])), name
        assert g["weight_decay"] == (0.0 if _no_decay(name) else 0.1), name
    assert where[id(temperature)]["lr"] == pytest.approx(0.01)
    emb = where[id(params["model.embeddings.word_embeddings.weight"])]
    assert emb["lr"] == pytest.approx(0.01 * decay ** 3)
    if decay == 1.0:  # off: the two groups of before (decay, no decay), so old checkpoints resume
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    sched = build_schedule(opt, kind="linear", total_steps=10, warmup_steps=2)
    for _ in range(4):
        opt.step()
        sched.step()
    top = max(g["lr"] for g in opt.param_groups)
    assert emb["lr"] / top == pytest.approx(decay ** 3)


def test_layer_decay_without_numbered_layers_is_a_config_error():
    from contrastkit.recipes.common import build_optimizer

    cfg = load_config(overrides=["optim.layer_decay=0.8"])
    with pytest.raises(ConfigError, match="optim.layer_decay: 0.8 needs numbered layers"):
        build_optimizer({"query": torch.nn.Linear(3, 3)}, cfg)
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(overrides=["optim.layer_decay=0"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(overrides=["optim.layer_decay=1.5"])


# -- the weight average (optim.ema_decay) --------------------------------------------------

def test_ema_matches_a_float64_reference_and_dev_sees_the_average(tmp_path):
    seen = []
    tr, net = _make(tmp_path / "r", 9, ema_decay=0.7, seen=seen)
    after_steps = []
    tr.optimizer.register_step_post_hook(
        lambda *_: after_steps.append([p.detach().clone() for p in net.parameters()]))
    reference = [p.detach().clone() for p in net.parameters()]
    averages = {}
    tr.fit()
    for t, params in enumerate(after_steps, start=1):
        d = min(0.7, (1 + t) / (10 + t))
        reference = [d * a + (1 - d) * p for a, p in zip(reference, params)]
        averages[t] = reference
    assert len(after_steps) == 9
    for a, r in zip(tr.ema, averages[9]):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    # dev scored the average at each evaluation; training continued from the raw weights
    assert [s for s, _ in seen] == [2, 4, 6, 8, 9]
    for s, params in seen:
        for p, r in zip(params, averages[s]):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
    for p, raw in zip(net.parameters(), after_steps[-1]):
        torch.testing.assert_close(p.detach(), raw, rtol=0, atol=0)
    assert not torch.allclose(next(net.parameters()), tr.ema[0])


def test_ema_resumes_exactly_and_refuses_a_checkpoint_without_it(tmp_path):
    full, net_full = _make(tmp_path / "full", 13, ema_decay=0.8)
    full.fit()
    part, _ = _make(tmp_path / "part", 13, checkpoint_every=7, crash_at=10, ema_decay=0.8)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed, net_resumed = _make(tmp_path / "part", 13, resume=True, ema_decay=0.8)
    resumed.fit(resume=True)
    for a, b in zip(full.ema, resumed.ema):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(net_full.parameters(), net_resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain, _ = _make(tmp_path / "plain", 4)
    plain.fit()
    other, _ = _make(tmp_path / "plain", 4, resume=True, ema_decay=0.8)
    with pytest.raises(ValueError, match="no weight average"):
        other.fit(resume=True)


def test_ema_decay_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim.ema_decay: 1.0 must be < 1.0"):
        load_config(overrides=["optim.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config(overrides=["optim.ema_decay=0"])
    assert load_config(overrides=["optim.ema_decay=0.9"]).optim.ema_decay == 0.9
