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
    contrastkit bench loss --objective all          # every objective at 4,096 and 65,536
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import torch

from .loss_cases import CASES
from .measure import measure_in_subprocess

DEFAULT_SIZES = [1024, 4096, 16384, 65536]
OBJECTIVE_SIZES = [4096, 65536]
LARGE_SIZE = 262144
PEER_SIZES = [128, 256]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", nargs="+", default=["info_nce"], choices=sorted(CASES) + ["all"], metavar="NAME",
                   help=f"objective(s) to measure, of {sorted(CASES)}; 'all' runs every objective next to plain InfoNCE")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help=f"batch sizes N (default {DEFAULT_SIZES} for info_nce, {OBJECTIVE_SIZES} otherwise)")
    p.add_argument("--large", action="store_true", help=f"also run N = {LARGE_SIZE:,}")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tile", type=int, nargs="+", default=None, help="tile size: one int or rows cols")
    p.add_argument("--peer-sizes", type=int, nargs="*", default=PEER_SIZES,
                   help="small sizes where the peer library fits (ours, naive and peer measured there)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive formula")
    p.add_argument("--no-peer", action="store_true", help="skip the peer library")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="address-space limit per measurement (default 90%% of available memory)")
    p.add_argument("--json", dest="json_path", default="results/bench_loss.json", help="where to write the results")


def _ok(r: Optional[Dict]) -> bool:
    return bool(r) and r.get("status") == "ok"


def _fmt_time(r: Optional[Dict]) -> str:
    if not r:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "?").upper()
    return f"{r['seconds'] * 1e3:,.0f} ms" if r["seconds"] < 10 else f"{r['seconds']:,.1f} s"


def _fmt_mem(r: Optional[Dict]) -> str:
    return f"{r['peak_extra_bytes'] / 2**20:,.0f} MB" if _ok(r) else "-"


def _ratio(a: Optional[Dict], b: Optional[Dict], key: str) -> str:
    if not (_ok(a) and _ok(b)) or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def _value_diff(a: Optional[Dict], b: Optional[Dict]) -> str:
    if not (_ok(a) and _ok(b)):
        return "-"
    return f"{abs(a['loss'] - b['loss']) / max(abs(b['loss']), 1e-12):.0e}"


class _Runner:
    def __init__(self, args, limit):
        self.args, self.limit = args, limit

    def measure(self, objective: str, method: str, n: int) -> Dict:
        args = self.args
        tile = None if not args.tile else (args.tile[0] if len(args.tile) == 1 else list(args.tile[:2]))
        spec = {"objective": objective, "method": method, "n": n, "dim": args.dim, "tile": tile,
                "device": args.device}
        t0 = time.perf_counter()
        r = measure_in_subprocess(spec, mem_limit_bytes=self.limit if args.device == "cpu" else None)
        note = f", {r.get('error', '')}" if r.get("status") != "ok" else ""
        print(f"  {objective:>13s} N={n:>7,} {method:5s} {_fmt_time(r):>10s} {_fmt_mem(r):>10s} "
              f"({time.perf_counter() - t0:.0f} s wall{note})", flush=True)
        return r


def _bench_objective(runner: _Runner, objective: str, sizes: List[int]) -> Dict:
    args = runner.args
    case = CASES[objective]
    rows = []
    for n in sizes:
        row = {"n": n, "ours": runner.measure(objective, "ours", n)}
        if not args.no_naive:
            row["naive"] = runner.measure(objective, "naive", n)
        ours = row["ours"]
        if _ok(ours):
            limit_s = 8.0 * n * n * args.dim / ours["gemm_flops"]
            ours["gemm_limit_seconds"] = limit_s
            ours["ratio_to_gemm_limit"] = ours["seconds"] / limit_s
        rows.append(row)
    peer_rows = []
    peer_obj = case.peer_case or (objective if case.peer is not None else None)
    if peer_obj and not args.no_peer:
        for n in sorted(set(args.peer_sizes)):
            peer_rows.append({"n": n, "objective": peer_obj, "ours": runner.measure(peer_obj, "ours", n),
                              "naive": None if args.no_naive else runner.measure(peer_obj, "naive", n),
                              "peer": runner.measure(peer_obj, "peer", n)})
    return {"objective": objective, "name": case.name, "rows": rows, "peer_rows": peer_rows,
            "peer_name": CASES[peer_obj].peer_name if peer_obj else ""}


def _print_objective(res: Dict) -> None:
    print(f"\n{res['objective']}: {res['name']}")
    header = (f"{'N':>8} | {'ours':>9} {'mem':>9} {'xGEMM':>6} | {'naive':>9} {'mem':>9} | "
              f"{'time/naive':>10} {'mem/naive':>9} {'value diff':>10}")
    print(header)
    print("-" * len(header))
    for row in res["rows"]:
        o, nv = row["ours"], row.get("naive")
        xg = f"{o['ratio_to_gemm_limit']:.2f}" if _ok(o) else "-"
        print(f"{row['n']:>8,} | {_fmt_time(o):>9} {_fmt_mem(o):>9} {xg:>6} | {_fmt_time(nv):>9} {_fmt_mem(nv):>9} | "
              f"{_ratio(o, nv, 'seconds'):>10} {_ratio(o, nv, 'peak_extra_bytes'):>9} {_value_diff(o, nv):>10}")
    if res["peer_rows"]:
        print(f"peer: {res['peer_name']} ({res['peer_rows'][0]['objective']}, like for like)")
        header = (f"{'N':>8} | {'ours':>9} {'mem':>9} | {'peer':>9} {'mem':>9} | {'time/peer':>9} {'mem/peer':>9} "
                  f"{'value diff':>10}")
        print(header)
        print("-" * len(header))
        for row in res["peer_rows"]:
            o, pr = row["ours"], row["peer"]
            print(f"{row['n']:>8,} | {_fmt_time(o):>9} {_fmt_mem(o):>9} | {_fmt_time(pr):>9} {_fmt_mem(pr):>9} | "
                  f"{_ratio(o, pr, 'seconds'):>9} {_ratio(o, pr, 'peak_extra_bytes'):>9} {_value_diff(o, pr):>10}")


def _print_summary(results: List[Dict]) -> None:
    base = {row["n"]: row["ours"] for r in results if r["objective"] == "info_nce" for row in r["rows"]}
    sizes = sorted(base)
    print("\nevery objective vs plain (symmetric) InfoNCE, same N: our time per logit pair as a ratio, "
          "our peak extra memory")
    print(f"{'objective':>14} | " + " | ".join(f"N={n:,}: time, mem".rjust(24) for n in sizes))
    for r in results:
        cells = []
        pairs = CASES[r["objective"]].pairs
        for n in sizes:
            row = next((x for x in r["rows"] if x["n"] == n), None)
            o = row["ours"] if row else None
            ratio = f"{o['seconds'] / pairs / base[n]['seconds']:.2f}x" if _ok(o) and _ok(base[n]) else "-"
            cells.append(f"{ratio}, {_fmt_mem(o)}".rjust(24))
        print(f"{r['objective']:>14} | " + " | ".join(cells))


def run(args: argparse.Namespace) -> int:
    if "all" in args.objective:
        objectives = [o for o in CASES if o != "nt_xent"]
    else:
        objectives = list(dict.fromkeys(args.objective))
        if len(objectives) > 1 and "info_nce" not in objectives:
            objectives.insert(0, "info_nce")  # the reference of the summary
    default = DEFAULT_SIZES if objectives == ["info_nce"] else OBJECTIVE_SIZES
    sizes = sorted(set((args.sizes or default) + ([LARGE_SIZE] if args.large else [])))
    limit = int((args.mem_limit_gb * 2**30) if args.mem_limit_gb else psutil.virtual_memory().available * 0.9)
    print(f"contrastkit bench loss: d={args.dim}, float32, device={args.device}, {torch.get_num_threads()} threads, "
          f"memory limit {limit / 2**30:.1f} GB per measurement, sizes {sizes}")
    runner = _Runner(args, limit)
    results = [_bench_objective(runner, o, sizes) for o in objectives]
    for res in results:
        _print_objective(res)
    if len(results) > 1:
        _print_summary(results)
    print("\nxGEMM = our time / (8 N^2 d FLOPs at the GEMM rate measured in the same process); "
          "value diff = relative difference of the loss values")
    report = {
        "benchmark": "loss",
        "objectives": objectives,
        "dim": args.dim,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
        print(f"results written to {path}")
    return 0
