"""Loss-engine benchmark: ours vs the naive formula vs the best peer, side by side.

For each batch size, one forward + backward of the objective (symmetric InfoNCE by
default, d = 256, float32) is timed and its peak extra memory measured, each in a
fresh subprocess, for contrastkit's tiled engine, the naive formula on the full
logit matrix (as sentence-transformers / open_clip compute it) and the peer
library where it fits. Our time is also reported as a multiple of the physical
limit of an exact loss: 8 N M d FLOPs at the machine's GEMM rate measured in the
same process.

    contrastkit bench loss                  # 1,024 / 4,096 / 16,384 / 65,536
    contrastkit bench loss --large          # + 262,144
    contrastkit bench loss --objective supcon --sizes 4096 65536
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import psutil
import torch

from .loss_cases import CASES
from .measure import measure_in_subprocess

DEFAULT_SIZES = [1024, 4096, 16384, 65536]
LARGE_SIZE = 262144
PEER_SIZES = [128, 256]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", default="info_nce", choices=sorted(CASES), help="objective to measure")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="batch sizes N (= M)")
    p.add_argument("--large", action="store_true", help=f"also run N = {LARGE_SIZE:,}")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tile", type=int, nargs="+", default=None, help="tile size: one int or rows cols")
    p.add_argument("--peer-sizes", type=int, nargs="*", default=PEER_SIZES,
                   help="extra small sizes where the peer library fits (measured for all three)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive formula")
    p.add_argument("--no-peer", action="store_true", help="skip the peer library")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="address-space limit per measurement (default 90%% of available memory)")
    p.add_argument("--json", dest="json_path", default="results/bench_loss.json", help="where to write the results")


def _fmt_time(r: Dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "?").upper()
    return f"{r['seconds'] * 1e3:,.0f} ms" if r["seconds"] < 10 else f"{r['seconds']:,.1f} s"


def _fmt_mem(r: Dict) -> str:
    if r.get("status") != "ok":
        return "-"
    return f"{r['peak_extra_bytes'] / 2**20:,.0f} MB"


def _ratio(a: Dict, b: Dict, key: str) -> str:
    if a.get("status") != "ok" or b.get("status") != "ok" or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def run(args: argparse.Namespace) -> int:
    case = CASES[args.objective]
    sizes = sorted(set(args.sizes or DEFAULT_SIZES + ([LARGE_SIZE] if args.large else [])))
    peer_sizes = [] if args.no_peer or case.peer is None else sorted(set(args.peer_sizes))
    all_sizes = sorted(set(sizes) | set(peer_sizes))
    tile = None if not args.tile else (args.tile[0] if len(args.tile) == 1 else list(args.tile[:2]))
    limit = int((args.mem_limit_gb * 2**30) if args.mem_limit_gb else psutil.virtual_memory().available * 0.9)
    print(f"contrastkit bench loss: {case.name}, d={args.dim}, float32, device={args.device}, "
          f"{torch.get_num_threads()} threads, memory limit {limit / 2**30:.1f} GB per measurement")
    rows: List[Dict] = []
    for n in all_sizes:
        methods = ["ours"]
        if not args.no_naive:
            methods.append("naive")
        if n in peer_sizes:
            methods.append("peer")
        result = {"n": n}
        for method in methods:
            spec = {"objective": args.objective, "method": method, "n": n, "dim": args.dim,
                    "tile": tile, "device": args.device}
            t0 = time.perf_counter()
            r = measure_in_subprocess(spec, mem_limit_bytes=limit if args.device == "cpu" else None)
            result[method] = r
            print(f"  N={n:>7,} {method:5s} {_fmt_time(r):>10s} {_fmt_mem(r):>10s} "
                  f"({time.perf_counter() - t0:.0f} s wall{', ' + r.get('error', '') if r.get('status') != 'ok' else ''})",
                  flush=True)
        ours = result["ours"]
        if ours.get("status") == "ok":
            limit_s = 8.0 * n * n * args.dim / ours["gemm_flops"]
            ours["gemm_limit_seconds"] = limit_s
            ours["ratio_to_gemm_limit"] = ours["seconds"] / limit_s
        rows.append(result)

    header = (f"{'N':>8} | {'ours':>9} {'mem':>9} {'xGEMM':>6} | {'naive':>9} {'mem':>9} | "
              f"{'time/naive':>10} {'mem/naive':>9} | {'peer':>9} {'mem':>9} {'time/peer':>9}")
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        o, nv, pr = row["ours"], row.get("naive", {}), row.get("peer", {})
        xg = f"{o['ratio_to_gemm_limit']:.2f}" if o.get("status") == "ok" else "-"
        print(f"{row['n']:>8,} | {_fmt_time(o):>9} {_fmt_mem(o):>9} {xg:>6} | "
              f"{_fmt_time(nv) if nv else 'skip':>9} {_fmt_mem(nv) if nv else '-':>9} | "
              f"{_ratio(o, nv, 'seconds'):>10} {_ratio(o, nv, 'peak_extra_bytes'):>9} | "
              f"{_fmt_time(pr) if pr else '-':>9} {_fmt_mem(pr) if pr else '-':>9} {_ratio(o, pr, 'seconds'):>9}")
    print(f"\nxGEMM = our time / (8 N^2 d FLOPs at the GEMM rate measured in the same process); "
          f"peer = {case.peer_name or 'none'}")
    report = {
        "benchmark": "loss",
        "objective": args.objective,
        "dim": args.dim,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
        print(f"results written to {path}")
    return 0
