"""The training loop every recipe shares: steps, schedule, dev evaluation, best model,
atomic checkpoints and exact resume.

The loop knows nothing about text or images. A recipe gives it

- ``step_fn(batch) -> loss``: one forward/backward on a batch (e.g. a gradient-cached
  step of a tiled objective); gradients are left in ``.grad``;
- ``batches``: a batch sampler with ``set_epoch(epoch)`` (which restarts that epoch), ``state_dict()`` /
  ``load_state_dict()`` (the position inside the epoch) and ``len()``;
- ``evaluate(step) -> metrics`` (optional): the dev evaluation, whose ``select_metric``
  picks the best model, saved by ``save_best(folder)``.
- ``step_fn`` may carry state across steps (a cross-batch memory): if it has
  ``state_dict()`` / ``load_state_dict()``, that state is checkpointed and restored too.
- ``step_fn`` may count events of its steps: if it has ``pop_stats() -> {name: count}``
  (the counts since the previous call), the loop sums them; each ``train`` record of
  ``metrics.jsonl`` carries the sums since the previous record, and ``TrainResult.stats``
  the run's totals (a resumed run included; counted on the main process).

Per step: ``step_fn``, gradient all-reduce when several processes run, clipping,
``optimizer.step()``, ``scheduler.step()``. A checkpoint (weights, optimizer, scheduler,
sampler position, RNG states) is written atomically after every dev evaluation and every
``checkpoint_every`` steps; :meth:`Trainer.fit` with ``resume=True`` continues from it
and ends with the same weights as an uninterrupted run.

Example::

    import torch
    from contrastkit.training.loop import Trainer, linear_warmup_schedule
    net = torch.nn.Linear(4, 1)
    data = [torch.randn(8, 4) for _ in range(3)]

    class Batches:                      # a minimal resumable batch source
        def __init__(self): self.epoch, self.pos = 0, 0
        def set_epoch(self, e): self.epoch = e
        def __len__(self): return len(data)
        def __iter__(self):
            while self.pos < len(data):
                self.pos += 1; yield data[self.pos - 1]
            self.pos = 0
        def state_dict(self): return {"pos": self.pos}
        def load_state_dict(self, s): self.pos = s["pos"]

    def step_fn(batch):
        loss = net(batch).pow(2).mean(); loss.backward(); return loss.detach()

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = Trainer(modules={"model": net}, step_fn=step_fn, batches=Batches(), optimizer=opt,
                      scheduler=linear_warmup_schedule(opt, total_steps=6, warmup_steps=1), total_steps=6)
    result = trainer.fit()
    assert result.steps == 6
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .run_folder import RunFolder

__all__ = ["Trainer", "TrainResult", "linear_warmup_schedule", "build_schedule", "distributed_info"]


def distributed_info() -> tuple:
    """(rank, world_size): (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_schedule(optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then ``linear`` decay to 0, ``cosine`` decay to
    0, or ``constant`` over the remaining steps."""
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule must be one of ('linear', 'cosine', 'constant'), got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def linear_warmup_schedule(optimizer, *, total_steps: int, warmup_steps: int):
    """:func:`build_schedule` with linear decay (the usual fine-tuning schedule)."""
    return build_schedule(optimizer, kind="linear", total_steps=total_steps, warmup_steps=warmup_steps)


@dataclass
class TrainResult:
    steps: int
    best_step: Optional[int] = None
    best_score: Optional[float] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    stats: Dict[str, int] = field(default_factory=dict)


class Trainer:
    """The shared loop (see the module doc).

    Args:
        modules: the trainable modules by name (saved in checkpoints, e.g. ``{"model": enc}``;
            two towers: ``{"query": q, "document": d}``); a learnable temperature lives in
            the objective, pass it here too.
        step_fn: ``step_fn(batch) -> loss`` (forward and backward).
        batches: the resumable batch sampler.
        optimizer, scheduler: torch optimizer and per-step LR scheduler.
        total_steps: steps to run (epochs follow from ``len(batches)``).
        evaluate: ``evaluate(step) -> {metric: value}`` on dev, or None.
        select_metric: the dev metric (higher is better) that picks the best model.
        save_best: ``save_best(folder)`` writes the best model (called when dev improves).
        eval_every: dev evaluation every n steps (None: at the end of each epoch); the last
            step is always evaluated.
        checkpoint_every: also checkpoint every n steps.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        run: the run folder (metrics.jsonl, checkpoint/); None: nothing written.
        progress: show a tqdm bar (loss, examples/s, ETA) on the main process.
        examples_per_step: for the examples/s figure.
        ema_decay: keep an exponential moving average of the trainable parameters
            (Polyak averaging; Tarvainen & Valpola 2017, Izmailov et al. 2018) with decay
            ``d_t = min(ema_decay, (1 + t) / (10 + t))`` after optimizer step t (the warm
            start of TensorFlow's ExponentialMovingAverage): ``avg <- d_t avg + (1 - d_t)
            param``. Dev evaluations and ``save_best`` then see the averaged weights (the
            model a run keeps is the average); training continues from the raw weights. The
            average is checkpointed, so a resumed run ends with the same one. None: off.
    """

    def __init__(self, *, modules: Mapping[str, nn.Module], step_fn: Callable[[Any], torch.Tensor], batches: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, total_steps: int,
                 evaluate: Optional[Callable[[int], Dict[str, float]]] = None, select_metric: str = "ndcg@10",
                 save_best: Optional[Callable[[Path], None]] = None, eval_every: Optional[int] = None,
                 checkpoint_every: Optional[int] = None, max_grad_norm: Optional[float] = 1.0,
                 run: Optional[RunFolder] = None, progress: bool = True, examples_per_step: int = 0,
                 ema_decay: Optional[float] = None) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if ema_decay is not None and not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {ema_decay!r}")
        self.modules = dict(modules)
        self.step_fn, self.batches = step_fn, batches
        self.optimizer, self.scheduler = optimizer, scheduler
        self.total_steps = int(total_steps)
        self.evaluate, self.select_metric, self.save_best = evaluate, select_metric, save_best
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.max_grad_norm = max_grad_norm
        self.run, self.progress = run, progress
        self.examples_per_step = int(examples_per_step)
        self.rank, self.world = distributed_info()
        self.step, self.epoch = 0, 0
        self.best_score: Optional[float] = None
        self.best_step: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self.stats_total: Dict[str, int] = {}   # step_fn.pop_stats() summed over the run
        self.stats_since: Dict[str, int] = {}   # ... since the last train record of metrics.jsonl
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.ema: Optional[List[torch.Tensor]] = (
            [p.detach().clone() for p in self._params()] if self.ema_decay is not None else None)

    # -- state -------------------------------------------------------------------------
    def _peak_lr(self) -> float:
        """The largest learning rate of the optimizer's groups (the top layers' under
        layer-wise decay), as the progress bar and metrics.jsonl report it."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _params(self) -> List[nn.Parameter]:
        seen, out = set(), []
        for m in self.modules.values():
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def state(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "batches": self.batches.state_dict(), "best_score": self.best_score, "best_step": self.best_step,
                "history": [dict(h) for h in self.history],
                "stats": {"total": dict(self.stats_total), "since": dict(self.stats_since)},
                "step_fn": self.step_fn.state_dict() if hasattr(self.step_fn, "state_dict") else None,
                "ema": None if self.ema is None else [t.detach().cpu() for t in self.ema]}

    def save(self) -> None:
        """Checkpoint into ``run/checkpoint`` (main process only)."""
        if self.run is not None and self.rank == 0:
            save_checkpoint(self.run.file("checkpoint"), modules=self.modules, state=self.state())

    def restore(self) -> None:
        if self.run is None:
            raise ValueError("resume needs a run folder")
        state = load_checkpoint(self.run.file("checkpoint"), modules=self.modules)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.batches.set_epoch(self.epoch)
        self.batches.load_state_dict(state["batches"])
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
        self.history = list(state.get("history") or [])
        stats = state.get("stats") or {}
        self.stats_total, self.stats_since = dict(stats.get("total", {})), dict(stats.get("since", {}))
        if state.get("step_fn") is not None and hasattr(self.step_fn, "load_state_dict"):
            self.step_fn.load_state_dict(state["step_fn"])
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None or len(saved) != len(self.ema):
                raise ValueError("the checkpoint has no weight average matching optim.ema_decay's parameters "
                                 "(it was written with another ema_decay setting): resume with the run's own config")
            for t, v in zip(self.ema, saved):
                t.copy_(v)

    # -- the weight average ------------------------------------------------------------
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = min(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            for avg, p in zip(self.ema, self._params()):
                avg.lerp_(p.detach(), 1.0 - d)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the trainable parameters hold the weight average (unchanged
        when ``ema_decay`` is None); the raw weights come back after it."""
        if self.ema is None:
            yield
            return
        params = self._params()
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            for p, avg in zip(params, self.ema):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

    # -- the loop ----------------------------------------------------------------------
    def _count(self) -> None:
        pop = getattr(self.step_fn, "pop_stats", None)
        for name, value in (pop() if pop is not None else {}).items():
            self.stats_total[name] = self.stats_total.get(name, 0) + int(value)
            self.stats_since[name] = self.stats_since.get(name, 0) + int(value)

    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in self._params():
            if p.grad is None:  # unused by the objective on every process alike (e.g. a BERT pooler)
                continue
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def _dev(self) -> None:
        if self.evaluate is None:
            return
        t0 = time.perf_counter()
        with self.averaged_weights():  # the model a run keeps is what dev scores
            metrics = self.evaluate(self.step)
            record = {"phase": "dev", "step": self.step, "epoch": self.epoch, **metrics,
                      "seconds": round(time.perf_counter() - t0, 2)}
            self.history.append(record)
            if self.run is not None:
                self.run.log(record)
            score = metrics.get(self.select_metric)
            if score is None:
                raise KeyError(f"the dev evaluation returned no {self.select_metric!r} (it gave {sorted(metrics)})")
            if self.best_score is None or score > self.best_score:
                self.best_score, self.best_step = float(score), self.step
                if self.save_best is not None and self.run is not None and self.rank == 0:
                    self.save_best(self.run.file("best"))

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Run until ``total_steps`` (from the checkpoint when ``resume``)."""
        t_start = time.perf_counter()
        restored = False
        if resume:
            self.restore()
            restored = True  # the sampler stands mid-epoch: do not restart the epoch below
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_loss = float("nan")
        t_last, n_since = time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                if not restored:
                    self.batches.set_epoch(self.epoch)
                whole_epoch, restored, stepped = not restored, False, self.step
                for batch in self.batches:
                    for m in self.modules.values():
                        m.train()
                    loss = self.step_fn(batch)
                    self._count()
                    self._all_reduce_grads()
                    if self.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm)
                    self.optimizer.step()
                    self.step += 1
                    self._update_ema()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    n_since += 1
                    last_loss = float(loss)
                    if not math.isfinite(last_loss):
                        raise FloatingPointError(f"the loss is {last_loss} at step {self.step}; lower optim.lr or "
                                                 "raise objective.temperature")
                    if bar is not None:
                        now = time.perf_counter()
                        rate = self.examples_per_step * n_since / max(now - t_last, 1e-9)
                        bar.set_postfix(loss=f"{last_loss:.4f}", ex_s=f"{rate:.1f}",
                                        lr=f"{self._peak_lr():.2e}")
                        bar.update(1)
                        t_last, n_since = now, 0
                    if self.run is not None and (self.step % 10 == 0 or self.step == 1):
                        self.run.log({"phase": "train", "step": self.step, "loss": last_loss,
                                      "lr": self._peak_lr(), **self.stats_since})
                        self.stats_since = {k: 0 for k in self.stats_since}
                    due_eval = (self.eval_every is not None and self.step % self.eval_every == 0) \
                        or self.step == self.total_steps
                    if due_eval:
                        self._dev()
                    if due_eval or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                        self.save()
                    if self.step >= self.total_steps:
                        break
                else:
                    # the epoch ended without reaching total_steps
                    if whole_epoch and self.step == stepped:
                        raise ValueError(
                            f"epoch {self.epoch} gave no batch: the batch sampler formed no full batch "
                            f"from the training examples (with batching.sampler=no_duplicates, examples whose "
                            f"texts repeat across examples cannot share a batch, and incomplete batches are "
                            f"dropped); lower batching.batch_size or use batching.sampler=random")
                    self.epoch += 1
                    if self.eval_every is None and self.step < self.total_steps:
                        self._dev()
                        self.save()
                    continue
                break
        finally:
            if bar is not None:
                bar.close()
        return TrainResult(steps=self.step, best_step=self.best_step, best_score=self.best_score,
                           history=self.history, wall_seconds=time.perf_counter() - t_start,
                           stats=dict(self.stats_total))
