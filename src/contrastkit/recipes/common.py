"""What every recipe shares: processes, seeds, the objective and optimizer from the
config, example batches over a resumable sampler, saving / loading the towers, versions.

Example::

    from contrastkit.recipes.common import seed_everything
    seed_everything(0)
"""

from __future__ import annotations

import inspect
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import losses as losses_module
from ..models import TextEncoder
from ..objectives.columns import ColumnObjective, column_layout, takes_column_masks
from ..training.config import ConfigError, RunConfig

__all__ = ["refuse_unread_fields", "init_distributed", "broadcast", "seed_everything", "build_objective", "check_objective_fits", "column_loss",
           "build_optimizer", "layer_depths",
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


def _loss_classes() -> Dict[str, type]:
    """The module classes of ``contrastkit.losses`` by name (what ``objective.name`` takes)."""
    names = getattr(losses_module, "__all__", dir(losses_module))
    return {n: getattr(losses_module, n) for n in names
            if isinstance(getattr(losses_module, n, None), type) and issubclass(getattr(losses_module, n), nn.Module)}


def build_objective(cfg: RunConfig) -> nn.Module:
    """The ``objective`` section as a ``contrastkit.losses`` module (name, temperature,
    learn_temperature, options); unknown names list the available ones. ``temperature`` is
    not passed to an objective without one (Alignment, Uniformity, AlignUniform)."""
    name = cfg.objective.name
    classes = _loss_classes()
    cls = classes.get(name)
    if cls is None:
        raise ConfigError(f"objective.name: {name!r} is not a loss of contrastkit.losses; allowed values: "
                          + ", ".join(sorted(classes)))
    kwargs = dict(cfg.objective.options)
    takes = inspect.signature(cls.__init__).parameters
    if "temperature" in takes:  # alignment / uniformity have none
        kwargs["temperature"] = cfg.objective.temperature
    if cfg.objective.learn_temperature:
        if "learn_temperature" not in takes:
            raise ConfigError(f"objective.learn_temperature: {name} has no temperature to learn; set it to false")
        kwargs["learn_temperature"] = True
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"objective.options: {name} does not take these arguments ({err})") from None


def check_objective_fits(cfg: RunConfig, objective: nn.Module, *, num_negatives: int, masks_possible: bool) -> str:
    """The objective's column layout (:func:`~contrastkit.objectives.columns.column_layout`)
    for (anchor, positive, ``num_negatives`` hard negatives) batches, or a ConfigError
    naming the field that does not fit: an objective on (features, labels), hard negatives
    for an objective that takes none, the cross-batch memory for one other than MNRL,
    false-negative masks for one that takes no masks.
    Checked before anything is encoded."""
    name = cfg.objective.name
    try:
        layout = column_layout(objective)
    except ValueError:
        fits = []
        for n, cls in _loss_classes().items():
            try:
                if n != "Objective":
                    column_layout(cls)
                    fits.append(n)
            except ValueError:
                pass
        raise ConfigError(f"objective.name: {name} does not take (query, positive, negatives) batches (it takes "
                          f"views or (features, labels)); allowed values: {', '.join(sorted(fits))}") from None
    if layout == "pairs" and num_negatives > 0:
        raise ConfigError(f"negatives.num_negatives: {name} takes (query, positive) pairs and no hard negatives; "
                          f"set negatives.num_negatives=0 or choose an objective that takes them "
                          f"(MultipleNegativesRanking, InfoNCE, DCL, DebiasedContrastive, SigLIP, ...)")
    if cfg.negatives.memory_steps and not isinstance(objective, losses_module.MultipleNegativesRanking):
        raise ConfigError(f"negatives.memory_steps: the memory is an extra candidate block, which only "
                          f"objective.name=MultipleNegativesRanking takes (got {name})")
    if masks_possible and not takes_column_masks(objective):
        fields = [f for f in ("negatives.mask_duplicates", "negatives.guide_mask") if getattr(
            cfg.negatives, f.split(".")[1])]
        raise ConfigError(f"{fields[0]}: {name} takes no false-negative masks over (query x documents); set "
                          + " and ".join(f"{f}=false" for f in fields))
    return layout


def column_loss(objective: nn.Module, world: int = 1) -> nn.Module:
    """The loss module a :class:`~contrastkit.recipes.text_steps.RetrievalStep` calls as
    ``loss(anchors, positives, *negatives, masks=)``: MultipleNegativesRanking as it is,
    any other column objective through :class:`~contrastkit.objectives.columns.ColumnObjective`;
    under many processes inside :class:`~contrastkit.scale.DistributedLoss` (MNRL computes
    each process's rows locally, the others run on the gathered batch)."""
    loss: nn.Module = objective if isinstance(objective, losses_module.MultipleNegativesRanking) \
        else ColumnObjective(objective)
    if world > 1:
        from ..scale import DistributedLoss

        loss = DistributedLoss(loss)
    return loss


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or name.endswith("norm.weight")


# A numbered transformer block in a parameter name: BERT / RoBERTa "encoder.layer.3.",
# Llama / Qwen / Mistral "layers.3.", GPT-2 "h.3.", T5 / ViT "block.3." / "blocks.3.".
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|shared|patch_embed|pos_embed)(?:\.|$)")


def layer_depths(module: nn.Module) -> Tuple[Dict[str, int], int]:
    """Depth of every parameter of ``module`` for layer-wise learning-rate decay: 0 for the
    embeddings, ``l + 1`` for numbered block ``l``, ``L + 1`` (the top) for the rest
    (pooler, final norm, a learned temperature), where ``L`` is the number of blocks.
    Returns ``(depth by parameter name, L)``; ``L = 0`` when no numbered block is found."""
    names = [n for n, _ in module.named_parameters()]
    blocks = [int(m.group(1)) for m in map(_LAYER.search, names) if m]
    n_layers = max(blocks) + 1 if blocks else 0
    depths = {}
    for n in names:
        m = _LAYER.search(n)
        depths[n] = int(m.group(1)) + 1 if m else (0 if _EMBEDDING.search(n) else n_layers + 1)
    return depths, n_layers


def build_optimizer(modules: Dict[str, nn.Module], cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights. With
    ``optim.layer_decay`` = d < 1, a parameter at depth l of an encoder with L blocks
    (:func:`layer_depths`) learns at ``lr * d ** (L + 1 - l)`` (layer-wise learning-rate
    decay, Clark et al. 2020, ELECTRA, appendix A): the lower layers move less. Modules
    without numbered blocks (a learned temperature) learn at ``lr``."""
    decay_rate = cfg.optim.layer_decay
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen, any_layers = set(), False
    for mname, module in modules.items():
        depths, n_layers = layer_depths(module)
        any_layers = any_layers or n_layers > 0
        for pname, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            scale = decay_rate ** (n_layers + 1 - depths[pname]) if n_layers else 1.0
            wd = 0.0 if _no_decay(pname) else cfg.optim.weight_decay
            groups.setdefault((wd, scale), []).append(p)
    if decay_rate < 1.0 and not any_layers:
        raise ConfigError(f"optim.layer_decay: {decay_rate} needs numbered layers (layer.N / layers.N / h.N / "
                          f"block.N in parameter names); none found in {sorted(modules)}: set it to 1.0")
    # The order is fixed (weight decay, then depth) so that a resumed run's optimizer state
    # lines up with its parameter groups.
    param_groups = [{"params": ps, "weight_decay": wd, "lr": cfg.optim.lr * scale}
                    for (wd, scale), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]
    return torch.optim.AdamW(param_groups, lr=cfg.optim.lr)


class ExampleBatches:
    """A batch sampler of example indices presented as batches of examples (the loop's
    resumable batch source). With ``num_negatives``, each example is presented in epoch e
    as :meth:`Example.negative_set` ``(num_negatives, e)`` (a pool of negative sets, one per
    epoch in turn; the set depends on the epoch only, so a resumed run sees what an
    uninterrupted one does)."""

    def __init__(self, sampler, examples, *, num_negatives: Optional[int] = None):
        self.sampler, self.examples = sampler, examples
        self.num_negatives = None if num_negatives is None else int(num_negatives)
        self.epoch = 0
        if self.num_negatives:
            for e in examples:
                e.negative_set(self.num_negatives, 0)  # raises, naming the record, on an uneven pool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        h = self.num_negatives
        for idx in self.sampler:
            yield [self.examples[i].negative_set(h, self.epoch) if h else self.examples[i] for i in idx]

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def refuse_unread_fields(cfg: RunConfig, reads, recipe: str, reasons: Optional[Dict[str, str]] = None) -> None:
    """Refuse every config field ``recipe`` does not read (``reads``: ``"section.name"``
    strings) that is set away from its default: a ConfigError naming the field, its value
    and default, and why (``reasons[field]`` where given). The ``output`` section (read by
    the command line) is not checked. What a recipe declares it reads is tested against what
    it does read (tests/test_simcse.py records the reads of a run)."""
    from ..training.config import config_differences

    reads = set(reads)
    for name, default, value in config_differences(RunConfig(), cfg):
        if "." in name and not name.startswith("output.") and name not in reads:
            why = (reasons or {}).get(name, f"the {recipe} recipe does not read it")
            raise ConfigError(f"{name}: {why}; leave it at its default {default!r} (got {value!r})")


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
                          evaluate: Callable[[], Dict[str, float]], separate: bool = False, stop_early: bool = True,
                          say: Callable[[str], None] = print) -> Optional[str]:
    """Load the best checkpoint by the dev metric (``run/best``), then, when ``base_states``
    is given, WiSE-FT: score ``(1 - a) base + a best`` on dev for each ``a`` and keep the
    smallest ``a`` within ``tolerance`` of the best dev score
    (:func:`contrastkit.training.interpolation.choose_alpha`); ``a = 0`` is the base model.

    The weights are walked from the tuned model (``a = 1``) toward the base. ``a = 1`` and
    ``a = 0`` cost nothing (the best checkpoint's and the base model's dev scores are
    known). With ``stop_early`` the other weights stop being evaluated once one scores
    more than ``tolerance`` below the best so far: along the interpolation path the dev
    score is unimodal in practice (WiSE-FT, Wortsman et al. 2022, Fig. 1), so no smaller
    ``a`` could be chosen. Records ``best_step``, ``best`` and ``interpolation`` (the
    evaluated ``alphas`` and ``scores`` in ascending ``a``, ``skipped``, ``chosen_alpha``)
    in ``dev``, logs each ``a`` to metrics.jsonl, and returns a warning (also printed)
    when dev shows no gain over the base model, else None."""
    from ..training.interpolation import choose_alpha, interpolate_into, snapshot

    if result.best_step is not None and run.file("best").is_dir():
        load_towers(towers, run.file("best"), separate)
        dev["best_step"] = result.best_step
        dev["best"] = next((h for h in result.history if h["step"] == result.best_step), {})
    base_score = dev.get("before", {}).get(select)
    tuned_score = dev.get("best", {}).get(select)
    if base_states is None:
        return _no_gain_warning(base_score, tuned_score, None, select, say)
    tuned = {k: snapshot(t.model) for k, t in towers.items()}
    scored: Dict[float, float] = {}
    skipped: List[float] = []
    stopped = False
    for a in sorted({float(x) for x in alphas}, reverse=True):
        if a == 1.0 and tuned_score is not None:
            s = tuned_score
        elif a == 0.0 and base_score is not None:
            s = base_score
        elif stopped:
            skipped.append(a)
            continue
        else:
            for k, t in towers.items():
                interpolate_into(t.model, base_states[k], tuned[k], a)
            s = evaluate()[select]
        s = float(s)
        if stop_early and scored and s < max(scored.values()) - tolerance:
            stopped = True
        scored[a] = s
        run.log({"phase": "interpolation", "alpha": a, select: s})
        say(f"interpolation a={a:.2f}: dev {select} {s:.4f}")
    if skipped:
        say(f"interpolation: a = {', '.join(f'{a:g}' for a in sorted(skipped))} not evaluated (the dev score "
            f"had fallen more than {tolerance:g} below the best toward the base)")
    evaluated = sorted(scored)
    scores = [scored[a] for a in evaluated]
    chosen = evaluated[choose_alpha(evaluated, scores, tolerance=tolerance)]
    for k, t in towers.items():
        interpolate_into(t.model, base_states[k], tuned[k], chosen)
    dev["interpolation"] = {"alphas": evaluated, "scores": scores, "skipped": sorted(skipped), "metric": select,
                            "chosen_alpha": chosen, "tolerance": tolerance}
    say(f"chosen a={chosen:g} on dev")
    return _no_gain_warning(base_score, tuned_score, chosen, select, say)


def _no_gain_warning(base: Optional[float], tuned: Optional[float], chosen: Optional[float], select: str,
                     say: Callable[[str], None]) -> Optional[str]:
    """The warning of a run whose fine-tuning did not help on dev (None when it did)."""
    if base is None or tuned is None:
        return None
    if chosen == 0.0:
        msg = (f"fine-tuning did not improve the dev score (best checkpoint {select} {tuned:.4f}, base model "
               f"{base:.4f}): the saved model is the base model (a = 0 chosen on dev)")
    elif tuned <= base:
        msg = (f"fine-tuning did not improve the dev score (best checkpoint {select} {tuned:.4f}, base model "
               f"{base:.4f}) and the saved model is fine-tuned; keep the base model, or put 0.0 in "
               "interpolation.alphas to let dev choose it")
    else:
        return None
    say("warning: " + msg)
    return msg


def start_run(cfg: RunConfig, echo: Callable[[str], None] = print):
    """What every recipe does first: processes (torchrun), the device (``train.device``),
    seeds, and the resolved precision. Returns ``(rank, world, device, say, precision)``,
    ``say`` printing on the main process only."""
    from ..models.precision import resolve_precision
    from ..training.allocator import tune_malloc_for

    rank, world, device = init_distributed()
    if cfg.train.device != "auto":
        device = torch.device(cfg.train.device)
    say = echo if rank == 0 else (lambda *_: None)
    tune_malloc_for(device, cfg.train.tune_malloc, say=say)
    seed_everything(cfg.train.seed)
    return rank, world, device, say, resolve_precision(cfg.train.precision, device)
