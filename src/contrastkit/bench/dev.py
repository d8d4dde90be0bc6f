"""Choose a setting on the dev split: several configurations of ``contrastkit train`` over
seeds, scored on dev only (the test qrels are never loaded).

Each configuration is a name and config overrides (``--config NAME FIELD=VALUE ...``); the
first is the reference. Every (configuration, seed) runs the main job in this process with
``data.test_split=null`` and ``data.sts=false`` (no test numbers exist to peek at), sharing one
encode of the corpus by the base model (:func:`contrastkit.recipes.text_retrieval.run_text_retrieval`'s
``embedding_cache``), so a run costs its training and dev evaluations only. The score of a
run is the dev ``select_metric`` (default nDCG@10) of the model the job keeps: the best
checkpoint, after the WiSE-FT choice when interpolation is on (``dev.chosen``), and of the
best checkpoint before it (``dev.trained``). The forgetting guard is measured on dev too: STS-B
**dev** Spearman of the kept model (``model/`` of the run, with the run's query length and
precision) next to the base model's, so a setting that buys retrieval with general-domain
quality shows it before any test number exists (``--no-sts`` skips it).

Results: ``<results>/<name>/seed<k>.json`` (resumable: an existing file is skipped; the run
folder next to it) and ``summary.md`` / ``summary.png``: per configuration the mean, min..max
and std over seeds and the mean paired difference to the reference over the seeds both ran.
Dev has few queries (SciFact: 81), so read differences against their spread over seeds.

    contrastkit bench dev --config base --config lr5e-5 optim.lr=5e-5 --seeds 0 1 2
    contrastkit bench dev --table-from results/bench_dev --reference base
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .train import seed_stats

__all__ = ["add_arguments", "run", "run_sweep", "summarize", "write_summary"]

DEV_ONLY = ("data.test_split=null", "data.sts=false", "output.report=false")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="configs", action="append", nargs="+", default=[], metavar="NAME [FIELD=VALUE]",
                   help="a configuration: a name, then its config overrides (repeatable; the first is the reference)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--results", default="results/bench_dev", help="results folder (default results/bench_dev)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every configuration (repeatable)")
    p.add_argument("--no-sts", action="store_true", help="skip the STS-B dev Spearman of each kept model")
    p.add_argument("--table-from", default=None, metavar="DIR", help="print the summary of DIR; run nothing")
    p.add_argument("--reference", default=None, metavar="NAME",
                   help="with --table-from: the configuration the differences are to (default: the first by name)")


def _parse_configs(configs: Sequence[Sequence[str]]) -> List[Tuple[str, List[str]]]:
    out: List[Tuple[str, List[str]]] = []
    for c in configs:
        name, overrides = c[0], list(c[1:])
        if "=" in name or "/" in name or not name.strip():
            raise ValueError(f"--config: {name!r} is not a name; write --config NAME FIELD=VALUE ...")
        if name in {n for n, _ in out}:
            raise ValueError(f"--config: the name {name!r} is given twice")
        out.append((name, overrides))
    if not out:
        raise ValueError("--config: give at least one configuration (the first is the reference)")
    return out


def _record(name: str, seed: int, overrides: List[str], summary: Dict[str, Any], select: str) -> Dict[str, Any]:
    dev = summary.get("dev") or {}
    trained = (dev.get("best") or {}).get(select)
    if trained is None:
        raise RuntimeError(f"{name} seed {seed}: the run has no dev score (is the dev split empty?)")
    interp = dev.get("interpolation")
    chosen = interp["scores"][interp["alphas"].index(interp["chosen_alpha"])] if interp else trained
    return {"name": name, "seed": seed, "overrides": overrides, "metric": select,
            "dev": {"base": dev["before"][select], "trained": trained, "chosen": chosen,
                    "best_step": dev.get("best_step"), "chosen_alpha": interp["chosen_alpha"] if interp else None},
            "train_seconds": summary["phases"].get("train"), "steps": summary["train"]["steps"]}


def sts_dev_spearman(model: str, cfg) -> float:
    """STS-B dev Spearman of the model in folder (or name) ``model`` as the run encodes
    queries (``model.query_max_length``, the run's precision and device)."""
    from ..data import load_sts
    from ..evaluation import evaluate_sts
    from ..models import TextEncoder
    from ..models.precision import resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    enc = TextEncoder(model, pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                      max_length=cfg.model.query_max_length, trust_remote_code=cfg.model.trust_remote_code).to(device)
    precision = resolve_precision(cfg.train.precision, device)
    return float(evaluate_sts(lambda t: enc.encode(t, batch_size=cfg.train.encode_batch_size, precision=precision),
                              load_sts("dev"))["spearman"])


def run_sweep(configs: Sequence[Tuple[str, List[str]]], seeds: Sequence[int], results: str,
              common: Sequence[str] = (), echo=print, sts: bool = True) -> Dict[str, List[Dict[str, Any]]]:
    """Run every (configuration, seed) not yet in ``results`` (see the module doc); returns
    the records by configuration name."""
    from ..recipes.text_retrieval import run_text_retrieval
    from ..training.config import load_config
    from ..training.run_folder import RunFolder

    out = Path(results)
    plans = []
    for name, overrides in configs:  # every override is checked before anything runs
        for seed in seeds:
            ov = [*common, *overrides, *DEV_ONLY, f"train.seed={seed}"]
            plans.append((name, seed, overrides, load_config(overrides=ov)))
    cache: Dict[tuple, Any] = {}
    base_sts: Dict[str, float] = {}
    t0 = time.perf_counter()
    for name, seed, overrides, cfg in plans:
        done = out / name / f"seed{seed}.json"
        if done.is_file():
            saved = json.loads(done.read_text(encoding="utf-8")).get("overrides")
            if saved != [*common, *overrides]:
                raise ValueError(f"{done} was made with other overrides ({saved}); use another --results folder")
            echo(f"  {name} seed {seed}: done before, skipped")
            continue
        echo(f"  [{time.perf_counter() - t0:6.0f} s] {name} seed {seed}: running")
        run = RunFolder.create(out / name / f"seed{seed}", overwrite=True)
        summary = run_text_retrieval(cfg, run, echo=lambda m: None, embedding_cache=cache)
        rec = _record(name, seed, [*common, *overrides], summary, cfg.evaluation.select_metric)
        if sts:
            if cfg.model.name not in base_sts:
                base_sts[cfg.model.name] = sts_dev_spearman(cfg.model.name, cfg)
            kept = run.file("model") / ("query" if cfg.model.separate_towers else "")
            rec["sts_dev"] = {"base": base_sts[cfg.model.name], "kept": sts_dev_spearman(str(kept), cfg)}
        done.write_text(json.dumps(rec, indent=1), encoding="utf-8")
        echo(f"  [{time.perf_counter() - t0:6.0f} s] {name} seed {seed}: dev {rec['metric']} "
             f"{rec['dev']['chosen']:.4f} (trained {rec['dev']['trained']:.4f}, a={rec['dev']['chosen_alpha']})"
             + (f", STS-B dev {rec['sts_dev']['kept']:.4f} (base {rec['sts_dev']['base']:.4f})" if sts else ""))
    return load_results(results)


def load_results(folder: str) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for f in sorted(Path(folder).glob("*/seed*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        out.setdefault(rec["name"], []).append(rec)
    return out


def summarize(results: Dict[str, List[Dict[str, Any]]], reference: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per configuration: stats of the chosen and trained dev scores over seeds and
    the mean paired difference (chosen) to ``reference`` over the seeds both have."""
    rows = []
    ref = {r["seed"]: r["dev"]["chosen"] for r in results.get(reference, [])} if reference else {}
    for name, recs in results.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        row = {"name": name, "seeds": [r["seed"] for r in recs], "overrides": recs[0]["overrides"],
               "metric": recs[0]["metric"], "chosen": seed_stats([r["dev"]["chosen"] for r in recs]),
               "trained": seed_stats([r["dev"]["trained"] for r in recs]),
               "alphas": [r["dev"]["chosen_alpha"] for r in recs], "points": [r["dev"]["chosen"] for r in recs]}
        sts = [r["sts_dev"]["kept"] - r["sts_dev"]["base"] for r in recs if "sts_dev" in r]
        row["sts_dev_change"] = seed_stats(sts) if sts else None
        paired = [r["dev"]["chosen"] - ref[r["seed"]] for r in recs if r["seed"] in ref]
        row["diff"] = seed_stats(paired) if paired and name != reference else None
        rows.append(row)
    return rows


def write_summary(folder: str, reference: Optional[str] = None) -> str:
    results = load_results(folder)
    if not results:
        return f"no finished result in {folder}\n"
    reference = reference if reference in results else next(iter(results))
    rows = summarize(results, reference)
    metric = rows[0]["metric"]
    lines = ["# contrastkit bench dev", "",
             f"Dev {metric} (dev split carved from the training queries; no test numbers are computed). "
             "chosen: the model the job keeps (best checkpoint, then the WiSE-FT choice); trained: the best "
             f"checkpoint before interpolation; Δ: mean paired difference of chosen to `{reference}` over seeds "
             "(min..max); STS-B dev: mean change of the kept model's Spearman from the base model's (the "
             "forgetting guard, on dev).", "",
             "| configuration | overrides | seeds | chosen mean | min..max | std | trained mean | a chosen | Δ vs ref "
             "| STS-B dev change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, t, d = r["chosen"], r["trained"], r["diff"]
        lines.append(f"| {r['name']} | {' '.join(r['overrides']) or '-'} | {','.join(map(str, r['seeds']))} | "
                     f"{c['mean']:.4f} | {c['min']:.4f}..{c['max']:.4f} | {c['std']:.4f} | {t['mean']:.4f} | "
                     f"{','.join(str(a) for a in r['alphas'])} | "
                     + (f"{d['mean']:+.4f} ({d['min']:+.4f}..{d['max']:+.4f})" if d else "-") + " | "
                     + (f"{r['sts_dev_change']['mean']:+.4f}" if r["sts_dev_change"] else "-") + " |")
    text = "\n".join(lines) + "\n"
    Path(folder, "summary.md").write_text(text, encoding="utf-8")
    _figure(rows, Path(folder, "summary.png"), metric)
    return text


def _figure(rows: List[Dict[str, Any]], path: Path, metric: str) -> None:
    from .plots import seed_scatter

    seed_scatter([r["name"] for r in rows], [r["points"] for r in rows], [r["chosen"]["mean"] for r in rows],
                 ylabel=f"dev {metric}", title="contrastkit bench dev: points = seeds, bar = mean", path=path)


def run(args) -> int:
    """``contrastkit bench dev``; 0 on success, 2 for bad arguments."""
    if args.table_from:
        print(write_summary(args.table_from, args.reference))
        return 0
    from ..training.config import ConfigError

    try:
        configs = _parse_configs(args.configs)
        run_sweep(configs, args.seeds, args.results, args.overrides,
                  echo=lambda m: print(m, file=sys.stderr, flush=True), sts=not args.no_sts)
    except (ValueError, ConfigError) as err:
        print(f"contrastkit bench dev: {err}", file=sys.stderr)
        return 2
    print(write_summary(args.results, configs[0][0]))
    print(f"summary: {Path(args.results) / 'summary.md'}, figure: {Path(args.results) / 'summary.png'}")
    return 0
