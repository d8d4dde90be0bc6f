"""What every recipe shares: processes, seeds, the objective and optimizer from the
config, example batches over a resumable sampler, saving / loading the towers, versions.

Example::

    from contrastkit.recipes.common import seed_everything
    seed_everything(0)
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import losses as losses_module
from ..models import TextEncoder
from ..training.config import ConfigError, RunConfig

__all__ = ["init_distributed", "broadcast", "seed_everything", "build_objective", "build_optimizer",
           "ExampleBatches", "save_towers", "load_towers", "versions", "best_then_interpolate", "start_run"]


def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world, device): initialise torch.distributed under torchrun (gloo on CPU,
    NCCL on CUDA), else (0, 1, cuda-if-available-else-cpu)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def broadcast(obj: Any, rank: int, world: int) -> Any:
    """rank 0's ``obj`` on every process."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def build_objective(cfg: RunConfig) -> nn.Module:
    """The ``objective`` section as a ``contrastkit.losses`` module (name, temperature,
    learn_temperature, options); unknown names list the available ones."""
    name = cfg.objective.name
    available = sorted(n for n in getattr(losses_module, "__all__", dir(losses_module))
                       if isinstance(getattr(losses_module, n, None), type)
                       and issubclass(getattr(losses_module, n), nn.Module))
    cls = getattr(losses_module, name, None) if name in available else None
    if cls is None:
        raise ConfigError(f"objective.name: {name!r} is not a loss of contrastkit.losses; allowed values: "
                          + ", ".join(available))
    kwargs = dict(cfg.objective.options)
    kwargs["temperature"] = cfg.objective.temperature
    if cfg.objective.learn_temperature:
        kwargs["learn_temperature"] = True
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"objective.options: {name} does not take these arguments ({err})") from None


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or name.endswith("norm.weight")


def build_optimizer(modules: Dict[str, nn.Module], cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights."""
    decay, plain, seen = [], [], set()
    for mname, module in modules.items():
        for pname, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (plain if _no_decay(pname) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr)


class ExampleBatches:
    """A batch sampler of example indices presented as batches of examples (the loop's
    resumable batch source)."""

    def __init__(self, sampler, examples):
        self.sampler, self.examples = sampler, examples

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler:
            yield [self.examples[i] for i in idx]

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def save_towers(towers: Dict[str, TextEncoder], folder: Path, separate: bool) -> None:
    if separate:
        towers["query"].save(str(folder / "query"))
        towers["document"].save(str(folder / "document"))
    else:
        towers["query"].save(str(folder))


def load_towers(towers: Dict[str, TextEncoder], folder: Path, separate: bool) -> None:
    from safetensors.torch import load_file

    for name, tower in towers.items():
        sub = folder / name if separate else folder
        state = load_file(str(sub / "model.safetensors"))
        missing, unexpected = tower.model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith("position_ids")]
        if bad or unexpected:
            raise ValueError(f"{sub} does not match the model: missing {bad[:3]}, unexpected {list(unexpected)[:3]}")
        if not separate:
            break


def versions() -> Dict[str, str]:
    from .. import __version__

    out = {"contrastkit": __version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def best_then_interpolate(*, towers: Dict[str, TextEncoder], base_states: Optional[Dict[str, Dict[str, Any]]],
                          result, run, dev: Dict[str, Any], select: str, alphas: Sequence[float], tolerance: float,
                          evaluate: Callable[[], Dict[str, float]], separate: bool = False,
                          say: Callable[[str], None] = print) -> None:
    """Load the best checkpoint by the dev metric (``run/best``), then, when ``base_states``
    is given, WiSE-FT: evaluate ``(1 - a) base + a best`` on dev for each ``a`` and keep
    the smallest ``a`` within ``tolerance`` of the best dev score
    (:func:`contrastkit.training.interpolation.choose_alpha`). Records ``best_step``,
    ``best`` and ``interpolation`` in ``dev`` and logs each ``a`` to metrics.jsonl."""
    from ..training.interpolation import choose_alpha, interpolate_into, snapshot

    if result.best_step is not None and run.file("best").is_dir():
        load_towers(towers, run.file("best"), separate)
        dev["best_step"] = result.best_step
        dev["best"] = next((h for h in result.history if h["step"] == result.best_step), {})
    if base_states is None:
        return
    tuned = {k: snapshot(t.model) for k, t in towers.items()}
    scores = []
    for a in alphas:
        if a == 1.0 and dev.get("best"):
            s = dev["best"][select]
        elif a == 0.0 and dev.get("before"):
            s = dev["before"][select]
        else:
            for k, t in towers.items():
                interpolate_into(t.model, base_states[k], tuned[k], a)
            s = evaluate()[select]
        scores.append(float(s))
        run.log({"phase": "interpolation", "alpha": a, select: float(s)})
        say(f"interpolation a={a:.2f}: dev {select} {s:.4f}")
    chosen = list(alphas)[choose_alpha(alphas, scores, tolerance=tolerance)]
    for k, t in towers.items():
        interpolate_into(t.model, base_states[k], tuned[k], chosen)
    dev["interpolation"] = {"alphas": list(alphas), "scores": scores, "metric": select, "chosen_alpha": chosen,
                            "tolerance": tolerance}
    say(f"chosen a={chosen} on dev")


def start_run(cfg: RunConfig, echo: Callable[[str], None] = print):
    """What every recipe does first: processes (torchrun), the device (``train.device``),
    seeds, and the resolved precision. Returns ``(rank, world, device, say, precision)``,
    ``say`` printing on the main process only."""
    from ..models.precision import resolve_precision

    rank, world, device = init_distributed()
    if cfg.train.device != "auto":
        device = torch.device(cfg.train.device)
    say = echo if rank == 0 else (lambda *_: None)
    seed_everything(cfg.train.seed)
    return rank, world, device, say, resolve_precision(cfg.train.precision, device)
