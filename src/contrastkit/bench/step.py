"""End-to-end training steps of all-MiniLM-L6-v2 on SciFact pairs, ours vs sentence-transformers.

One training step = tokenized (query, abstract) batch -> encoder -> MNRL loss ->
backward -> AdamW step, at several effective batch sizes. Methods:

    ck-plain      contrastkit MNRL on one forward of the whole batch (where it fits)
    ck-cached     contrastkit GradCache (chunks of --mini-batch rows, sorted by length,
                  padding trimmed) + MNRL on the tiled engine
    ck-cached-tok the same, chunks by a token budget (mini-batch x max length)
    st-mnrl       sentence-transformers MultipleNegativesRankingLoss (where it fits)
    st-cached     sentence-transformers CachedMultipleNegativesRankingLoss, same mini-batch

Each configuration runs in a fresh subprocess so that peak resident memory (ru_maxrss)
does not mix. ``--bf16`` runs every method under bfloat16 autocast (like with like).
Under ``torchrun --nproc-per-node 2`` (gloo) it runs ck-cached with the batch split
over the ranks (DistributedLoss gathers the cached embeddings) and rank 0 reports.

    contrastkit bench step --quick
    contrastkit bench step --batch-sizes 32,256,1024,4096 --json
    torchrun --nproc-per-node 2 -m contrastkit.cli bench step --batch-sizes 64,256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional

from .measure import peak_rss_bytes, run_json_subprocess

METHODS = ("ck-plain", "ck-cached", "ck-cached-tok", "st-mnrl", "st-cached")
DEFAULT_METHODS = ("ck-plain", "ck-cached", "st-mnrl", "st-cached")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="32,256,1024",
                   help="effective batch sizes, comma-separated (default 32,256,1024; add 4096 for the full set, "
                        "about 10 more minutes per cached method in fp32 on 2 cores)")
    p.add_argument("--mini-batch", type=int, default=32, help="rows per chunk for the cached methods (default 32)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--plain-max", type=int, default=256,
                   help="largest batch for the non-cached methods (ck-plain, st-mnrl); default 256")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per configuration (default: enough for ~256 sequences, at least 1)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per text (default 128)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for every method")
    p.add_argument("--ring", action="store_true", help="under torchrun: ring exchange instead of all_gather")
    p.add_argument("--quick", action="store_true", help="batch 32 and 64, mini-batch 16, 1 timed step, 64 tokens")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON line instead of a table")
    p.add_argument("--table-from", default=None, metavar="FILE",
                   help="print the table of a saved --json output (no new measurements)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# -- data -------------------------------------------------------------------------
def _batch_pairs(batch: int, seed: int = 0):
    from ..data import scifact_pairs

    pairs = scifact_pairs("train")
    rng = random.Random(seed)
    out: List = []
    while len(out) < batch:  # SciFact train has 919 pairs: larger batches cycle through reshuffled copies
        block = list(pairs)
        rng.shuffle(block)
        out.extend(block)
    out = out[:batch]
    return [q for q, _ in out], [d for _, d in out]


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2.0 ** 20


# -- one configuration (in its own process) --------------------------------------------
def _run_config(cfg: Dict) -> Dict:
    import torch

    method, batch, mini = cfg["method"], cfg["batch"], cfg["mini"]
    max_length, steps, bf16 = cfg["max_length"], cfg["steps"], cfg["bf16"]
    from .. import losses
    from ..scale import DistributedLoss, GradCache, average_gradients, rank_and_world
    from ..models import resolve_model_path

    torch.manual_seed(0)
    rank, world = rank_and_world()
    queries, docs = _batch_pairs(batch * world if cfg.get("distributed") else batch)
    if cfg.get("distributed"):
        queries, docs = queries[rank * batch:(rank + 1) * batch], docs[rank * batch:(rank + 1) * batch]
    path = resolve_model_path("all-MiniLM-L6-v2")
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    import contextlib

    ctx = amp or contextlib.nullcontext
    if method.startswith("ck"):
        from ..models import TextEncoder

        enc = TextEncoder(path, pooling="mean", normalize=True, max_length=max_length)
        enc.train()
        params = list(enc.parameters())
        fq, fd = enc.tokenize(queries), enc.tokenize(docs)
        loss_fn = losses.MultipleNegativesRanking(scale=20.0)
        if cfg.get("distributed"):
            loss_fn = DistributedLoss(loss_fn, mode="ring" if cfg.get("ring") else "gather")
        if method == "ck-plain":
            def step():
                with ctx():
                    a, b = enc(**fq), enc(**fd)
                loss = loss_fn(a.float(), b.float())
                loss.backward()
                return loss
        else:
            tok = method == "ck-cached-tok"
            gc = GradCache(enc, loss_fn, chunk_size=None if tok else mini,
                           chunk_tokens=mini * max_length if tok else None, sort_by_length=True,
                           autocast_dtype=torch.bfloat16 if bf16 else None)

            def step():
                return gc.step(fq, fd)
    else:
        import logging

        logging.disable(logging.WARNING)
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer import losses as st_losses

        model = SentenceTransformer(path, device="cpu")
        model.max_seq_length = max_length
        model.train()
        params = list(model.parameters())
        fq, fd = model.tokenize(queries), model.tokenize(docs)
        if method == "st-mnrl":
            st_loss = st_losses.MultipleNegativesRankingLoss(model, scale=20.0)
        else:
            st_loss = st_losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini)

        def step():
            # backward inside autocast too: CachedMNRL re-encodes in a backward hook, which must
            # run in bfloat16 like its first pass (otherwise its second pass would be float32)
            with ctx():
                loss = st_loss([dict(fq), dict(fd)], None)
                loss.backward()
            return loss
    opt = torch.optim.AdamW(params, lr=2e-5)
    loaded = _peak_rss_mb()

    def full_step():
        loss = step()
        if cfg.get("distributed"):
            average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # warm-up (kernels, optimiser state): a full step for small batches, else one chunk-sized step
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    if batch <= 256:
        full_step()
    warm_s = time.perf_counter() - t0
    times, losses_seen = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses_seen.append(full_step())
        times.append(time.perf_counter() - t)
    step_s = min(times)
    return {
        "method": method, "batch": batch * (world if cfg.get("distributed") else 1), "mini": mini,
        "world": world if cfg.get("distributed") else 1, "bf16": bf16, "max_length": max_length,
        "steps": steps, "step_s": step_s, "step_s_all": times, "warmup_s": warm_s,
        "seq_per_s": batch * (world if cfg.get("distributed") else 1) / step_s,
        "peak_rss_mb": _peak_rss_mb(), "rss_after_load_mb": loaded, "loss": losses_seen[-1],
        "threads": torch.get_num_threads(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
    }


def _subprocess(cfg: Dict) -> Dict:
    """One configuration in a fresh interpreter (:func:`~contrastkit.bench.measure.run_json_subprocess`)."""
    env = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    out = run_json_subprocess(["contrastkit.bench.step", "--worker", json.dumps(cfg)], env=env)
    if "status" in out and "step_s" not in out:
        return {"method": cfg["method"], "batch": cfg["batch"], "mini": cfg["mini"], "error": out["error"]}
    return out


# -- the command ----------------------------------------------------------------------
def _fmt_table(rows: List[Dict], bf16: bool) -> str:
    by = {(r["method"], r["batch"]): r for r in rows if "error" not in r}
    base = by.get(("ck-plain", min((b for m, b in by if m == "ck-plain"), default=-1)))
    lines = [f"contrastkit bench step: all-MiniLM-L6-v2, SciFact train pairs, MNRL scale 20, "
             f"{'bfloat16 autocast' if bf16 else 'float32'}, AdamW step included"]
    head = f"{'batch':>6} {'method':<14} {'mini':>5} {'seq/s':>8} {'step s':>8} {'peak MB':>8} " \
           f"{'x st-cached':>11} {'mem/plain@'+str(base['batch']) if base else 'mem':>13} {'x ck-plain':>10}"
    lines += [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['batch']:>6} {r['method']:<14} {r['mini']:>5}  failed: {r['error'][:80]}")
            continue
        stc = by.get(("st-cached", r["batch"]))
        plain = by.get(("ck-plain", r["batch"]))
        vs_st = f"{r['seq_per_s'] / stc['seq_per_s']:.2f}" if stc and r["method"] != "st-cached" else ""
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else ""
        vs_plain = f"{r['step_s'] / plain['step_s']:.2f}" if plain and r["method"].startswith("ck-cached") else ""
        lines.append(f"{r['batch']:>6} {r['method']:<14} {r['mini']:>5} {r['seq_per_s']:>8.1f} {r['step_s']:>8.2f} "
                     f"{r['peak_rss_mb']:>8.0f} {vs_st:>11} {mem:>13} {vs_plain:>10}")
    lines.append("x st-cached: throughput / CachedMNRL's at the same batch and mini-batch; mem/plain: peak RSS / "
                 "ck-plain's at the smallest batch; x ck-plain: cached step time / plain step time")
    return "\n".join(lines)


def _configs(args) -> List[Dict]:
    sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    out = []
    for b in sizes:
        for m in methods:
            if m in ("ck-plain", "st-mnrl") and b > args.plain_max:
                continue
            steps = args.steps or max(1, math.ceil(256 / b))
            out.append({"method": m, "batch": b, "mini": min(args.mini_batch, b), "max_length": args.max_length,
                        "steps": steps, "bf16": bool(args.bf16)})
    return out


def _run_distributed(args) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for cfg in _configs(args):
        if cfg["method"] != "ck-cached":
            continue
        if cfg["batch"] % world:
            continue
        cfg = dict(cfg, batch=cfg["batch"] // world, mini=min(cfg["mini"], cfg["batch"] // world),
                   distributed=True, ring=bool(args.ring))
        r = _run_config(cfg)
        import torch

        peak = torch.tensor([r["peak_rss_mb"]])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        r["peak_rss_mb_max_rank"] = float(peak)
        r["mode"] = "ring" if args.ring else "gather"
        rows.append(r)
    if rank == 0:
        if args.json:
            print(json.dumps({"benchmark": "step", "distributed": True, "world": world, "results": rows}))
        else:
            print(f"torchrun x{world} (gloo), ck-cached, DistributedLoss({'ring' if args.ring else 'gather'}); "
                  "peak RSS per rank (configs share a process)")
            for r in rows:
                print(f"  batch {r['batch']:>5} ({r['batch'] // world}/rank) mini {r['mini']:>3}: "
                      f"{r['seq_per_s']:.1f} seq/s, step {r['step_s']:.2f} s, peak {r['peak_rss_mb_max_rank']:.0f} MB")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run(args) -> int:
    if args.worker is not None:
        print(json.dumps(_run_config(json.loads(args.worker))), flush=True)
        return 0
    if args.table_from:
        with open(args.table_from) as f:
            saved = json.loads(f.read().strip().splitlines()[-1])
        print(_fmt_table(saved["results"], bool(saved.get("bf16"))))
        return 0
    if args.quick:
        args.batch_sizes, args.mini_batch, args.steps, args.max_length = "32,64", 16, 1, 64
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_distributed(args)
    rows = []
    t0 = time.perf_counter()
    for cfg in _configs(args):
        r = _subprocess(cfg)
        rows.append(r)
        # progress on stderr (stdout keeps the table or the one JSON line)
        msg = r.get("error") or f"{r['seq_per_s']:.1f} seq/s, peak {r['peak_rss_mb']:.0f} MB"
        print(f"  [{time.perf_counter() - t0:6.0f} s] batch {cfg['batch']:>5} {cfg['method']:<13} {msg}",
              file=sys.stderr, flush=True)
    if args.json:
        import torch

        print(json.dumps({"benchmark": "step", "bf16": bool(args.bf16), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "results": rows}))
    else:
        print(_fmt_table(rows, bool(args.bf16)))
    return 0 if all("error" not in r for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="contrastkit bench step", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
