"""Fine-tune a text embedding model on a corpus and report before / after (the main job).

With no arguments: all-MiniLM-L6-v2 on the bundled SciFact (train qrels, dev carved from
train, test only for the final numbers), hard negatives mined from the corpus, gradient-
cached MNRL with false negatives masked, WiSE-FT interpolation chosen on dev, STS-B as
forgetting guard; everything written to a fresh folder under runs/.

    contrastkit train
    contrastkit train --config run.yaml --output runs/mine
    contrastkit train --data pairs.jsonl --model BAAI/bge-small-en-v1.5 --epochs 2 --batch-size 128
    contrastkit train --set negatives.num_negatives=3 --set optim.lr=2e-5
    contrastkit train --output runs/mine --resume
    torchrun --nproc-per-node 2 -m contrastkit train ...

Every config field is documented in docs/main-job.md; --set takes any of them.
--resume without --config continues the run as its saved config.yaml says; any other
setting that differs from it is an error. --overwrite replaces only a run folder.
A bad input ends with a one-line error (exit status 2); set CONTRASTKIT_DEBUG=1 for the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

# flag -> config field (the flags are shortcuts for --set field=value)
SHORTCUTS = {
    "recipe": "recipe",
    "data": "data.source",
    "format": "data.format",
    "model": "model.name",
    "objective": "objective.name",
    "temperature": "objective.temperature",
    "epochs": "optim.epochs",
    "max_steps": "optim.max_steps",
    "lr": "optim.lr",
    "batch_size": "batching.batch_size",
    "chunk_size": "batching.chunk_size",
    "num_negatives": "negatives.num_negatives",
    "seed": "train.seed",
    "precision": "train.precision",
    "device": "train.device",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML run configuration (fields as in docs/main-job.md)")
    p.add_argument("--output", help="run folder (default: a fresh folder under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (only a folder made "
                   "by a run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint, as its "
                   "config.yaml says (other settings must match it)")
    p.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed records")
    p.add_argument("--no-interpolation", action="store_true", help="keep the fine-tuned weights as they are")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any config field, e.g. --set optim.lr=2e-5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, field in SHORTCUTS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=f"sets {field}")


def resolve(args: argparse.Namespace):
    """The run's config: the defaults (or, with --resume and no --config, the run folder's
    saved config.yaml), then --config, the flags and --set. A resumed run's config must
    equal the saved one except for :data:`~contrastkit.training.config.RESUME_MAY_DIFFER`;
    otherwise a ConfigError names every differing field."""
    from ..training.config import RESUME_MAY_DIFFER, ConfigError, config_differences, load_config, resume_mismatch

    overrides: List[str] = []
    for flag, field in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{field}={value}")
    if args.skip_bad_records:
        overrides.append("data.skip_bad_records=true")
    if args.no_interpolation:
        overrides.append("interpolation.enabled=false")
    if args.output:
        overrides.append(f"output.dir={args.output}")
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.resume:
        if not args.overwrite:  # a saved or given config may say overwrite: true (the first run's flag)
            overrides.append("output.overwrite=false")
        overrides.append("output.resume=true")
    overrides += list(args.overrides)
    base = args.config
    if args.resume and args.config is None:
        folder = _output_dir(args)
        if folder and (Path(folder) / "config.yaml").is_file():
            base = Path(folder) / "config.yaml"
    try:
        cfg = load_config(base, overrides=overrides)
    except ConfigError as err:
        if base is not None and base != args.config:
            raise ConfigError(f"{err} (the base config is the resumed run's {base})") from None
        raise
    if cfg.output.resume:
        folder = cfg.output.dir or os.environ.get("CONTRASTKIT_RUN_DIR")
        if not folder:
            raise ConfigError("output.resume: --resume needs --output, the run folder to continue")
        saved_path = Path(folder) / "config.yaml"
        if not saved_path.is_file():
            if (Path(folder) / "checkpoint").is_dir():
                raise ConfigError(f"cannot resume {folder}: it has checkpoint/ but no config.yaml, so the settings "
                                  "cannot be checked against the run's")
            return cfg  # nothing to continue: the run folder says so (no checkpoint/)
        try:
            saved = load_config(saved_path)
        except ConfigError as err:
            raise ConfigError(f"cannot resume {folder}: its config.yaml cannot be read ({err})") from None
        diffs = config_differences(saved, cfg, ignore=RESUME_MAY_DIFFER)
        if diffs:
            raise resume_mismatch(folder, diffs)
    return cfg


def _output_dir(args: argparse.Namespace) -> Optional[str]:
    """The run folder that --output and --set output.dir=... name (None when neither does)."""
    from ..training.config import load_config

    given = [f"output.dir={args.output}"] if args.output else []
    given += [o for o in args.overrides if o.split("=", 1)[0].strip() == "output.dir"]
    return load_config(overrides=given).output.dir if given else os.environ.get("CONTRASTKIT_RUN_DIR")


def _device_problem(device: str) -> Optional[str]:
    """Why ``train.device`` cannot run on this machine (None when it can)."""
    if device in ("auto", "cpu"):
        return None
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"train.device: {device!r}, but no CUDA GPU is visible here; use auto or cpu"
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            return f"train.device: {device!r}, but {count} CUDA GPU(s) are visible here (cuda:0 to cuda:{count - 1})"
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "train.device: 'mps', but MPS is not available here; use auto or cpu"
    return None


def _expected_error(err: BaseException) -> Optional[str]:
    """The one-line message of a bad-input error (None for anything else: a bug, an interrupt)."""
    from ..training.config import ConfigError

    if isinstance(err, ConfigError):
        return f"config error: {err}"
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return ("error: out of GPU memory; lower batching.chunk_size (it does not change the result), "
                    "train.encode_batch_size or the model.*_max_length fields")
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    if isinstance(err, (ValueError, OSError)):  # bad input: the message names the file / line / field
        return f"error: {err}"
    return None


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..recipes import get_recipe
    from ..training.config import ConfigError, config_to_dict
    from ..training.run_folder import RunFolder, RunFolderError, default_run_dir

    debug = os.environ.get("CONTRASTKIT_DEBUG", "") not in ("", "0")
    try:
        cfg = resolve(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"contrastkit train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    problem = _device_problem(cfg.train.device)
    if problem:
        print(f"contrastkit train: config error: {problem}", file=sys.stderr)
        return 2

    rank = int(os.environ.get("RANK", "0"))
    folder = cfg.output.dir or os.environ.get("CONTRASTKIT_RUN_DIR") or str(default_run_dir())
    if cfg.output.dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("contrastkit train: with several processes pass --output (every process must use the same folder)",
              file=sys.stderr)
        return 2
    cfg.output.dir = folder
    try:
        run_folder = RunFolder.create(folder, overwrite=cfg.output.overwrite, resume=cfg.output.resume,
                                      is_main=rank == 0,
                                      protect={"data.source": cfg.data.source, "model.name": cfg.model.name})
    except (RunFolderError, OSError) as err:  # OSError: e.g. no permission to make the folder
        if debug:
            raise
        print(f"contrastkit train: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"run folder: {run_folder.path}")
    try:
        summary = get_recipe(cfg.recipe)(cfg, run_folder)
    except BaseException as err:
        # a run that stopped before its first checkpoint leaves nothing behind (the same
        # command can be run again); a folder with a checkpoint or a model stays as it is
        try:
            discarded = run_folder.discard_if_unstarted()
        except OSError:  # never hide the run's own error behind the clean-up's
            discarded = False
        if discarded:
            print(f"contrastkit train: the run stopped before its first checkpoint; removed what it wrote "
                  f"in {run_folder.path}", file=sys.stderr)
        message = _expected_error(err)
        if message is None or debug:
            raise
        print(f"contrastkit train: {message}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    if cfg.output.report:
        try:
            from ..diagnostics.report import write_report

            path = write_report(run_folder.path)
            print(f"report: {path}")
        except ImportError:
            pass
    _print_summary(summary)
    print(f"results in {run_folder.path}: metrics.json, metrics.jsonl, config.yaml, model/")
    return 0


def _print_summary(s) -> None:
    rows = []
    if "before" in s and "after" in s:
        for m in ("ndcg@10", "mrr@10", "recall@100"):
            if m not in s["before"] or m not in s["after"]:  # e.g. simcse: before / after are STS-B numbers
                continue
            d = s.get("difference", {}).get(m, {})
            ci = f"[{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
            rows.append(f"  {m:<11} {s['before'][m]:.4f} -> {s['after'][m]:.4f}  ({s['after'][m] - s['before'][m]:+.4f}, "
                        f"95% CI {ci})")
    if s.get("sts", {}).get("after"):
        b, a = s["sts"]["before"]["spearman"], s["sts"]["after"]["spearman"]
        rows.append(f"  STS-B spearman {b:.4f} -> {a:.4f} ({100 * (a - b):+.2f} points)")
    interp = s.get("dev", {}).get("interpolation")
    if interp:
        rows.append(f"  interpolation a = {interp['chosen_alpha']} (chosen on dev)")
    for w in s.get("warnings", []):
        rows.append(f"  WARNING: {w}")
    rows.append(f"  wall time {s.get('wall_seconds', 0):.0f} s: " + ", ".join(
        f"{k} {v:.0f}s" for k, v in s.get("phases", {}).items()))
    print("summary (test split: " + str(s.get("test_split")) + ")\n" + "\n".join(rows))
