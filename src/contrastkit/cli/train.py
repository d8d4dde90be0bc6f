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
"""

from __future__ import annotations

import argparse
import sys
from typing import List

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    p.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed records")
    p.add_argument("--no-interpolation", action="store_true", help="keep the fine-tuned weights as they are")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any config field, e.g. --set optim.lr=2e-5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, field in SHORTCUTS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=f"sets {field}")


def resolve(args: argparse.Namespace):
    from ..training.config import load_config

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
        overrides.append("output.resume=true")
    return load_config(args.config, overrides=overrides + list(args.overrides))


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..recipes import get_recipe
    from ..training.config import ConfigError, config_to_dict
    from ..training.run_folder import RunFolder, RunFolderError, default_run_dir

    try:
        cfg = resolve(args)
    except ConfigError as err:
        print(f"contrastkit train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    import os

    rank = int(os.environ.get("RANK", "0"))
    folder = cfg.output.dir or os.environ.get("CONTRASTKIT_RUN_DIR") or str(default_run_dir())
    if cfg.output.dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("contrastkit train: with several processes pass --output (every process must use the same folder)",
              file=sys.stderr)
        return 2
    cfg.output.dir = folder
    try:
        run_folder = RunFolder.create(folder, overwrite=cfg.output.overwrite, resume=cfg.output.resume,
                                      is_main=rank == 0)
    except RunFolderError as err:
        print(f"contrastkit train: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"run folder: {run_folder.path}")
    try:
        summary = get_recipe(cfg.recipe)(cfg, run_folder)
    except ConfigError as err:
        print(f"contrastkit train: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the file / line / field
        print(f"contrastkit train: error: {err}", file=sys.stderr)
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
