"""The run configuration: one validated tree of dataclasses, read from YAML and flags.

Every field has a default (the bundled default run), a type, and where it matters a set
of allowed values or a range. :func:`load_config` merges, in order, the defaults, a YAML
file and ``section.field=value`` overrides, and raises :class:`ConfigError` naming the
field, what it got and what is allowed. The resolved tree is written to the run folder
as ``config.yaml`` (:func:`dump_config`), so a run can be repeated exactly.

The tree is recipe-neutral: ``recipe`` picks the wiring (``text_retrieval``, ``simcse``),
while ``model``, ``objective``, ``batching``, ``optim``, ``train`` and ``output`` mean
the same for every recipe (image recipes and diagnostics add sections, not new meanings).

Example::

    from contrastkit.training.config import load_config
    cfg = load_config(overrides=["optim.epochs=1", "batching.batch_size=32"])
    assert cfg.optim.epochs == 1 and cfg.model.name == "all-MiniLM-L6-v2"
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "NegativesConfig",
    "BatchingConfig",
    "OptimConfig",
    "TrainLoopConfig",
    "InterpolationConfig",
    "EvaluationConfig",
    "OutputConfig",
    "RunConfig",
    "load_config",
    "dump_config",
    "config_to_dict",
    "config_differences",
    "resume_mismatch",
    "objective_names",
    "RESUME_MAY_DIFFER",
    "RECIPES",
    "RECIPE_DEFAULTS",
]

RECIPES = ("text_retrieval", "simcse")

# Where a recipe's own default differs from the dataclass default (the bundled main job's),
# applied under whatever the user wrote; config.yaml records the resolved value.
RECIPE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # SimCSE's paper learning rate for BERT-base-sized encoders (Gao et al. 2021, appendix A)
    "simcse": {"optim": {"lr": 3e-5}},
}


class ConfigError(ValueError):
    """A configuration field with a value it cannot take (the message names the field)."""


def _choice(*values: Any) -> Dict[str, Any]:
    return {"choices": values}


def _range(lo: Optional[float] = None, hi: Optional[float] = None, *, open_lo: bool = False,
           open_hi: bool = False) -> Dict[str, Any]:
    return {"range": (lo, hi, open_lo, open_hi)}


@dataclass
class DataConfig:
    """Where the training pairs and the evaluation sets come from."""

    source: str = field(default="scifact", metadata={"help": "a BEIR folder or bundled BEIR name (scifact); a pairs / "
                        "triplets / n-tuples file (.jsonl .csv .tsv .parquet); or a corpus file for `format: corpus`"})
    format: str = field(default="auto", metadata={**_choice("auto", "beir", "pairs", "corpus"),
                        "help": "auto: a folder is BEIR, a file is pairs"})
    train_split: str = field(default="train", metadata={"help": "BEIR qrels split trained on"})
    train_file: Optional[str] = field(default=None, metadata={"help": "with a BEIR source: train on the records "
                                      "of this pairs / n-tuple file (e.g. written by `contrastkit mine`; query_id, "
                                      "positive_id, negative_ids columns naming the folder's queries and documents) "
                                      "instead of the train qrels; dev and test as for the folder"})
    test_split: Optional[str] = field(default="test", metadata={"help": "BEIR qrels split for the final before/after "
                                      "numbers only (never trained, mined, tuned or selected on); null: none"})
    dev_fraction: float = field(default=0.1, metadata={**_range(0.0, 0.5, open_lo=True),
                                "help": "share of the training queries held out as dev (seeded, by query)"})
    query_column: str = field(default="query", metadata={"help": "column of the query text in a pairs file"})
    positive_column: str = field(default="positive", metadata={"help": "column of the positive document text"})
    negative_columns: Optional[List[str]] = field(default=None, metadata={"help": "null: every negative*/neg* column"})
    query_prefix: str = field(default="", metadata={"help": "prepended to every query (e5 'query: ', bge instructions)"})
    document_prefix: str = field(default="", metadata={"help": "prepended to every document ('passage: ')"})
    skip_bad_records: bool = field(default=False, metadata={"help": "count and skip malformed records instead of "
                                   "stopping at the first (file:line in the error)"})
    max_train_examples: Optional[int] = field(default=None, metadata={**_range(1), "help": "use only the first n training examples"})
    sts: bool = field(default=True, metadata={"help": "forgetting guard: STS-B test Spearman before and after"})
    stream: bool = field(default=False, metadata={"help": "read a pairs file (or, with format corpus, a corpus "
                         "alone) lazily, for files larger than memory: one bounded pass holds out dev and test queries "
                         "(seeded hash) and counts the records, then each epoch reads the file again through a shuffle "
                         "buffer; a record short of negatives gets mined ones beside a BEIR folder (data.train_file), "
                         "else random ones from the sampled documents"})
    shuffle_buffer: int = field(default=10000, metadata={**_range(1), "help": "with stream: records held to shuffle "
                                "the file's order (a local shuffle, like tf.data's)"})
    stream_eval_queries: int = field(default=500, metadata={**_range(1), "help": "with stream: the most queries held "
                                     "out as dev and as many as test (each also at most dev_fraction of the records)"})
    stream_distractors: int = field(default=5000, metadata={**_range(0), "help": "with stream: documents of the file "
                                    "sampled (reservoir) into the dev / test corpus beside the held-out queries' own"})


@dataclass
class ModelConfig:
    name: str = field(default="all-MiniLM-L6-v2", metadata={"help": "a Hugging Face or sentence-transformers folder, "
                      "a bundled name, or a hub name"})
    pooling: Optional[str] = field(default=None, metadata={**_choice(None, "mean", "cls", "last"),
                                   "help": "null: what a sentence-transformers folder says, else mean"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise embeddings (cosine similarity)"})
    query_max_length: int = field(default=64, metadata={**_range(1), "help": "query truncation in tokens"})
    document_max_length: int = field(default=256, metadata={**_range(1), "help": "evaluation and mining length"})
    train_document_max_length: Optional[int] = field(default=128, metadata={**_range(1), "help": "document length "
                                                     "in training steps (null: document_max_length)"})
    separate_towers: bool = field(default=False, metadata={"help": "a second copy of the model encodes documents"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run a hub model's own code (off unless you trust it)"})


@dataclass
class ObjectiveConfig:
    name: str = field(default="MultipleNegativesRanking", metadata={"help": "a loss class of contrastkit.losses "
                      "(checked when the config is read; the error lists them)"})
    temperature: float = field(default=0.05, metadata={**_range(0.0, None, open_lo=True), "help": "softmax temperature (MNRL scale = 1 / temperature)"})
    learn_temperature: bool = field(default=False, metadata={"help": "learn the temperature with the model"})
    options: Dict[str, Any] = field(default_factory=dict, metadata={"help": "further keyword arguments of the loss"})


@dataclass
class NegativesConfig:
    mine: bool = field(default=True, metadata={"help": "mine hard negatives from the corpus with the base model"})
    num_negatives: int = field(default=1, metadata={**_range(0), "help": "hard negatives per (query, positive), extra candidate columns"})
    rank_window: Tuple[int, int] = field(default=(0, 30), metadata={"help": "0-based ranks [start, stop) sampled, "
                                         "after removing known positives"})
    sampling: str = field(default="top", metadata=_choice("top", "random"))
    pool_size: int = field(default=1, metadata={**_range(1), "help": (
        "sets of num_negatives mined per example; epoch e trains on set e mod pool_size, so each "
        "epoch sees fresh negatives (1: the same negatives every epoch)")})
    relative_margin: Optional[float] = field(default=None, metadata={**_range(0.0, 1.0, open_lo=True),
                                             "help": "drop candidates scoring above margin x the positive's score"})
    absolute_margin: Optional[float] = field(default=None, metadata={**_range(0.0), "help": "drop candidates scoring above positive - margin"})
    mask_duplicates: bool = field(default=True, metadata={"help": "mask in-batch candidates that are another "
                                  "known positive of the anchor"})
    guide_mask: bool = field(default=False, metadata={"help": "GISTEmbed: mask candidates the frozen base model "
                             "scores above the positive minus guide_margin"})
    guide_margin: float = field(default=0.0, metadata={**_range(0.0), "help": "GISTEmbed margin of the guide mask"})
    memory_steps: int = field(default=0, metadata={**_range(0), "help": (
        "cross-batch memory (XBM): the detached document embeddings of the last memory_steps steps join "
        "every anchor's candidates, known positives masked (0: off; objective MultipleNegativesRanking "
        "only; measured to lose on SciFact dev, docs/benchmarks.md)")})


@dataclass
class BatchingConfig:
    batch_size: int = field(default=32, metadata={**_range(2), "help": "global (query, positive) pairs per step"})
    sampler: str = field(default="no_duplicates", metadata=_choice("no_duplicates", "random", "b3"))
    chunk_size: int = field(default=32, metadata={**_range(1), "help": "rows per gradient-cached encoder pass"})
    chunk_memory_gb: Optional[float] = field(default=None, metadata={**_range(0.0, None, open_lo=True), "help":
                                             "instead of chunk_size: the saved activations of one step's encoder "
                                             "passes stay within this many GB; chunks are sized by padded tokens "
                                             "from the measured bytes per token (contrastkit.scale.memory)"})
    sort_by_length: bool = field(default=True, metadata={"help": "chunk rows of similar length together (less padding)"})


@dataclass
class OptimConfig:
    epochs: float = field(default=2.0, metadata={**_range(0.0, None, open_lo=True), "help": "passes over the training examples (fractions allowed)"})
    max_steps: Optional[int] = field(default=None, metadata={**_range(1), "help": "stop after this many steps"})
    lr: float = field(default=1.2e-4, metadata={**_range(0.0, None, open_lo=True), "help": (
        "AdamW peak learning rate (recipe simcse: 3e-05 unless set); 1.2e-4 chosen on SciFact dev "
        "(contrastkit bench dev), see docs/main-job.md")})
    weight_decay: float = field(default=0.01, metadata={**_range(0.0), "help": "AdamW weight decay (not on biases / norms)"})
    layer_decay: float = field(default=1.0, metadata={**_range(0.0, 1.0, open_lo=True), "help": (
        "layer-wise learning-rate decay (Clark et al. 2020): a parameter of layer l of L gets "
        "lr x layer_decay^(L + 1 - l), embeddings l = 0, the pooler / objective top; 1.0: off")})
    warmup_ratio: float = field(default=0.1, metadata={**_range(0.0, 1.0), "help": "share of the steps with linear warm-up"})
    schedule: str = field(default="linear", metadata=_choice("linear", "cosine", "constant"))
    ema_decay: Optional[float] = field(default=None, metadata={**_range(0.0, 1.0, open_lo=True, open_hi=True), "help": (
        "keep an exponential moving average of the weights (decay min(ema_decay, (1+t)/(10+t)) at step t); "
        "dev evaluations, the best checkpoint and the kept model use the average (null: off)")})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={**_range(0.0, None, open_lo=True), "help": "clip the gradient norm (null: no clipping)"})


@dataclass
class TrainLoopConfig:
    seed: int = field(default=0, metadata={"help": "seeds the dev split, mining, batches and dropout"})
    precision: str = field(default="auto", metadata=_choice("auto", "bf16", "fp32"))
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N "
                        "or mps"})
    eval_every: Optional[int] = field(default=None, metadata={**_range(1), "help": "dev evaluation every n steps "
                                      "(null: once per epoch and at the end)"})
    dev_document_max_length: Optional[int] = field(default=None, metadata={**_range(1), "help": "document length "
                                                   "in dev evaluations (null: the training document length, "
                                                   "model.train_document_max_length; half the cost of 256)"})
    dev_corpus_size: int = field(default=500, metadata={**_range(1), "help": "documents the dev evaluation ranks: "
                                 "the dev positives plus the base model's top candidates"})
    checkpoint_every: Optional[int] = field(default=None, metadata={**_range(1), "help": "also checkpoint every n "
                                            "steps (a checkpoint is always written at each dev evaluation)"})
    encode_batch_size: int = field(default=64, metadata={**_range(1), "help": "texts per pass when encoding for evaluation / mining"})
    tune_malloc: bool = field(default=True, metadata={"help": "on CPU runs under Linux / glibc, keep freed host "
                              "memory in the process instead of unmapping every large tensor (mallopt; the first corpus "
                              "encode 9% faster here, docs/benchmarks.md; memory stays at its peak until the run "
                              "ends; contrastkit.training.allocator)"})


@dataclass
class InterpolationConfig:
    enabled: bool = field(default=True, metadata={"help": "WiSE-FT: (1-a) base + a tuned, a chosen on dev"})
    alphas: List[float] = field(default_factory=lambda: [0.0, 0.7, 0.85, 1.0], metadata={"help": "candidate weights of "
                                "the tuned model; 1.0 = no interpolation, 0.0 = the base model (kept when tuning "
                                "buys nothing on dev)"})
    tolerance: float = field(default=0.002, metadata={**_range(0.0), "help": "the smallest alpha whose dev score is "
                             "within this of the best is chosen (less forgetting when the rest buys nothing on dev)"})
    stop_early: bool = field(default=True, metadata={"help": "walking from 1.0 toward the base, stop evaluating "
                             "weights once one scores more than tolerance below the best (saves dev evaluations)"})


@dataclass
class EvaluationConfig:
    ks: List[int] = field(default_factory=lambda: [1, 10, 100], metadata={"help": "cut-offs of nDCG / MRR / Recall / MAP / precision"})
    bootstrap_resamples: int = field(default=10000, metadata={**_range(100), "help": "resamples of the paired bootstrap interval"})
    select_metric: str = field(default="ndcg@10", metadata={"help": "dev metric for checkpoints and interpolation "
                               "(ndcg@k, mrr@k, recall@k, map@k; spearman / pearson for simcse)"})


@dataclass
class OutputConfig:
    dir: Optional[str] = field(default=None, metadata={"help": "run folder (null: a fresh folder under runs/)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder (only a contrastkit "
                            "run folder or an empty one; never one holding data.source or model.name)"})
    resume: bool = field(default=False, metadata={"help": "continue the run folder's checkpoint; its config.yaml is "
                         "the base config and every other field must match it"})
    report: bool = field(default=True, metadata={"help": "write report.html"})


@dataclass
class RunConfig:
    recipe: str = field(default="text_retrieval", metadata=_choice(*RECIPES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# -- conversion and validation -----------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (Optional / List / Tuple / Dict / scalars), or ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of fields {[f.name for f in dataclasses.fields(tp)]}, "
                              f"got {value!r}")
        return _build(tp, value, path)
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
        if origin in (tuple, Tuple):
            if args and args[-1] is not Ellipsis and len(items) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(items)} ({value!r})")
            return tuple(items)
        return items
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _check_metadata(path: str, value: Any, meta: Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join("null" if c is None else str(c) for c in meta["choices"])
        raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {allowed}")
    if "range" in meta and value is not None:
        lo, hi, open_lo, open_hi = meta["range"]
        if lo is not None and (value < lo or (open_lo and value == lo)):
            raise ConfigError(f"{path}: {value!r} must be {'>' if open_lo else '>='} {lo}")
        if hi is not None and (value > hi or (open_hi and value == hi)):
            raise ConfigError(f"{path}: {value!r} must be {'<' if open_hi else '<='} {hi}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown field {where}{unknown[0]}; the fields of {prefix or 'the config'} are: "
                          + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in values:
            v = _coerce(path, values[name], hints[name])
            _check_metadata(path, v, f.metadata)
            kwargs[name] = v
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """The config tree as plain dicts / lists (tuples become lists), for YAML and JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _field_type(keys: Sequence[str]) -> Any:
    """The declared type of the field at ``keys`` (``["data", "query_prefix"]``), or None
    when the path names no field (the merge then reports it)."""
    tp: Any = RunConfig
    for k in keys:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if k not in hints:
            return None
        tp = hints[k]
    return tp


def _text_type(tp: Any) -> Optional[bool]:
    """For ``str``: False; for ``Optional[str]``: True; for anything else: None."""
    if tp is str:
        return False
    if typing.get_origin(tp) is Union:
        args = typing.get_args(tp)
        if type(None) in args and [a for a in args if a is not type(None)] == [str]:
            return True
    return None


def _parse_override(text: str) -> Tuple[List[str], Any]:
    """``section.field=value`` as (keys, value). A string field (``str`` or ``Optional[str]``)
    takes the text after ``=`` as it is (``data.query_prefix=query: `` gives ``"query: "``),
    unquoted when the whole text is one YAML-quoted string (``'query: '``); an optional one
    reads ``null`` / ``~`` as null. Every other field reads the text as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    optional = _text_type(_field_type(keys))
    if optional is not None:
        stripped = raw.strip()
        if optional and stripped in _YAML_NULLS:
            return keys, None
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            try:
                unquoted = yaml.safe_load(stripped)
            except yaml.YAMLError:
                unquoted = None
            if isinstance(unquoted, str):
                return keys, unquoted
        return keys, raw
    if not raw.strip():
        return keys, ""
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key.strip()}: {raw!r} is not a valid value ({getattr(err, 'problem', err)}); "
                          f"lists are written [a, b], mappings {{k: v}}") from None


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: Optional[Union[str, Path]] = None, *, overrides: Sequence[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Defaults, then the YAML file ``path``, then ``values`` (a nested mapping, e.g. from
    command-line flags), then ``overrides`` (``"optim.lr=2e-5"``); validated.

    Raises :class:`ConfigError` naming the field and its allowed values, or the YAML
    file and line of a syntax error."""
    import yaml

    tree: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = _merge(tree, loaded)
    if values:
        tree = _merge(tree, values)
    for text in overrides:
        keys, v = _parse_override(text)
        node: Dict[str, Any] = {}
        cur = node
        for k in keys[:-1]:
            cur[k] = {}
            cur = cur[k]
        cur[keys[-1]] = v
        tree = _merge(tree, node)
    recipe = tree.get("recipe", RunConfig.__dataclass_fields__["recipe"].default)
    if isinstance(recipe, str) and recipe in RECIPE_DEFAULTS:
        tree = _merge(copy.deepcopy(RECIPE_DEFAULTS[recipe]), tree)
    cfg = _build(RunConfig, tree)
    _check_cross_fields(cfg)
    return cfg


# train.device: what torch.device takes and the recipes run on (checked when the config is
# read; whether this machine has that device is checked by `contrastkit train` before a run)
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:[0-9]+)?)")
DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...: a GPU index), mps"
# contrastkit.losses names that are building blocks, not objectives
_NOT_OBJECTIVES = ("Objective", "Temperature")


def objective_names() -> List[str]:
    """The values ``objective.name`` takes: the loss module classes of ``contrastkit.losses``
    (what :func:`contrastkit.recipes.common.build_objective` builds)."""
    from torch import nn

    from .. import losses

    names = getattr(losses, "__all__", dir(losses))
    return sorted(n for n in names if n not in _NOT_OBJECTIVES and isinstance(getattr(losses, n, None), type)
                  and issubclass(getattr(losses, n), nn.Module))


def _check_cross_fields(cfg: RunConfig) -> None:
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not allowed; allowed values: {DEVICES}")
    allowed = objective_names()
    if cfg.objective.name not in allowed:
        raise ConfigError(f"objective.name: {cfg.objective.name!r} is not a loss of contrastkit.losses; allowed "
                          "values: " + ", ".join(allowed))
    if not cfg.data.stream:
        for name in ("shuffle_buffer", "stream_eval_queries", "stream_distractors"):
            if getattr(cfg.data, name) != getattr(DataConfig(), name):
                raise ConfigError(f"data.{name}: only read with data.stream: true (got {getattr(cfg.data, name)!r} "
                                  "with stream false)")
    start, stop = cfg.negatives.rank_window
    if not 0 <= start < stop:
        raise ConfigError(f"negatives.rank_window: [{start}, {stop}] must satisfy 0 <= start < stop")
    if cfg.batching.chunk_size > cfg.batching.batch_size:
        cfg.batching.chunk_size = cfg.batching.batch_size
    if any(k < 1 for k in cfg.evaluation.ks):
        raise ConfigError(f"evaluation.ks: every k must be >= 1, got {cfg.evaluation.ks}")
    if 10 not in cfg.evaluation.ks:
        cfg.evaluation.ks = sorted(set(cfg.evaluation.ks) | {10})
    bad = [a for a in cfg.interpolation.alphas if not 0.0 <= a <= 1.0]
    if bad or not cfg.interpolation.alphas:
        raise ConfigError(f"interpolation.alphas: each must be in [0, 1] and the list non-empty, got "
                          f"{cfg.interpolation.alphas}")
    metric = cfg.evaluation.select_metric
    name, _, k = metric.partition("@")
    if metric not in ("spearman", "pearson") and (name not in ("ndcg", "mrr", "recall", "map") or not k.isdigit()):
        raise ConfigError(f"evaluation.select_metric: {metric!r}; allowed: ndcg@k, mrr@k, recall@k, map@k (retrieval), "
                          "spearman, pearson (STS recipes)")


# The fields a resumed run may set differently from the run it continues: the output
# flags, and output.dir (the folder is the same one, the saved text may be relative to
# another working folder). Every other field must equal the saved config.yaml.
RESUME_MAY_DIFFER = ("output.resume", "output.overwrite", "output.dir")


def _fields(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"section.field": value}`` of a config tree (``recipe`` at the top; a mapping field
    such as ``objective.options`` is one value)."""
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{f}": x for f, x in v.items()})
        else:
            out[k] = v
    return out


_UNSET = object()


def config_differences(saved: RunConfig, new: RunConfig, *, ignore: Sequence[str] = ()) -> List[Tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` for every field where the two configs differ,
    ``ignore`` aside, in the order of the config."""
    a, b = _fields(config_to_dict(saved)), _fields(config_to_dict(new))
    out = []
    for name in list(a) + [n for n in b if n not in a]:
        if name in ignore:
            continue
        va, vb = a.get(name, _UNSET), b.get(name, _UNSET)
        if va != vb:
            out.append((name, va, vb))
    return out


def _show(v: Any) -> str:
    return "(unset)" if v is _UNSET else json.dumps(v, default=str)


def resume_mismatch(folder: Union[str, Path], diffs: Sequence[Tuple[str, Any, Any]]) -> ConfigError:
    """The error of a resume whose settings differ from the run's saved config."""
    listed = "; ".join(f"{name}: saved {_show(a)}, given {_show(b)}" for name, a, b in diffs)
    return ConfigError(f"cannot resume {folder} with settings other than its run's (config.yaml): {listed}. "
                       "Resume without them (without --config the saved config.yaml is the base), or start a new "
                       "run (another --output, or --overwrite to replace this one)")


def dump_config(cfg: RunConfig, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (atomically: a temporary file, then rename).

    The ``config.yaml`` of a run folder that holds a checkpoint (a resumed run) is never
    rewritten: it is left as it is when ``cfg`` is the same run (:data:`RESUME_MAY_DIFFER`
    aside), and a different ``cfg`` is a :class:`ConfigError` naming every differing field."""
    import yaml

    from .run_folder import atomic_write_text

    path = Path(path)
    if path.name == "config.yaml" and path.is_file() and (path.parent / "checkpoint").is_dir():
        try:
            saved = load_config(path)
        except ConfigError as err:
            raise ConfigError(f"{path} is the config of a run with a checkpoint and is not rewritten, but it "
                              f"cannot be read to compare ({err})") from None
        diffs = config_differences(saved, cfg, ignore=RESUME_MAY_DIFFER)
        if diffs:
            raise resume_mismatch(path.parent, diffs)
        return
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_fields(cls: type = RunConfig, prefix: str = "") -> List[Tuple[str, str, str, str]]:
    """(field, type, default, help) for every leaf field: the docs table and ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, path)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_ = (help_ + "; " if help_ else "") + "one of " + ", ".join(
                "null" if c is None else str(c) for c in f.metadata["choices"])
        rows.append((path, _type_name(tp), repr(config_to_dict(default) if isinstance(default, tuple) else default),
                     help_))
    return rows


def fields_markdown() -> str:
    """The markdown table of every config field (docs/main-job.md holds its output)."""
    out = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, help_ in describe_fields():
        out.append(f"| `{name}` | {tp} | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(out) + "\n"
