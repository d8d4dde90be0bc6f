"""The automatic tile on CUDA, A/B: ours with today's ``auto_tile`` against the rule it
replaced (the 1/64 share rule at every size, which cut a 4,096 x 4,096 problem into 64
launch-bound tiles), in one process, two alternating rounds (best of each), at N = 256,
1,024, 4,096 and 16,384 for six objectives; with the naive formula up to 4,096.
Prints time (ms per forward + backward) and peak memory (MB above the inputs) and writes
``<out>/census2.json``.

    python scripts/bench_cuda_tiles.py cuda results/gpu     # needs a CUDA device
    python scripts/bench_cuda_tiles.py cpu /tmp             # runs anywhere (slow at 16,384)
    python scripts/bench_cuda_tiles.py --plot-from results/gpu/census2.json docs/images/x.png

Each run also draws ``<out>/census2.png`` (time per call, old rule / new rule / naive, by N).

Latest figures (one H200, 2026-11-28): docs/benchmarks.md, "The automatic tile on CUDA".
"""
import json, sys, time
import torch


def plot(rows, path):
    """One panel per objective: ms per forward + backward against N, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["name"] for r in rows})
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        rs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["n"])
        n = [r["n"] for r in rs]
        ax.plot(n, [r["old_ms"] for r in rs], "o-", label="old tile rule")
        ax.plot(n, [r["new_ms"] for r in rs], "o-", label="auto_tile (now)")
        nv = [(r["n"], r["naive_ms"]) for r in rs if r["naive_ms"] == r["naive_ms"]]
        ax.plot([x for x, _ in nv], [y for _, y in nv], "s--", color="grey", label="naive formula")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("N")
        ax.set_ylabel("ms per forward + backward")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("the automatic tile on CUDA (bench_cuda_tiles.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if len(sys.argv) > 1 and sys.argv[1] == "--plot-from":
    plot(json.load(open(sys.argv[2])), sys.argv[3])
    sys.exit(0)
import contrastkit.engine.tiling as tiling
from contrastkit.bench.loss_cases import CASES, make_inputs

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp"
new_auto = tiling.auto_tile

def old_auto(n_rows, n_cols, free_bytes, *, gpu, element_size=4):
    entries = (1 << 24) if gpu else (1 << 21)
    budget = max(1 << 14, free_bytes // (8 * 3 * element_size))
    entries = min(entries, budget, max(1 << 16, (n_rows * n_cols) // 64))
    tc = min(n_cols, 16384 if gpu else 2048)
    return max(1, min(n_rows, entries // max(tc, 1))), tc

sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

def timed(fn, a, b, lab, reps):
    def once():
        a.grad = b.grad = None
        fn(a, b, lab, None).backward()
    for _ in range(2):
        once()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    t = time.perf_counter()
    for _ in range(reps):
        once()
    sync()
    ms = (time.perf_counter() - t) / reps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else 0.0
    return ms, peak

rows = []
for n in (256, 1024, 4096, 16384):
    for name in ("info_nce", "mnrl", "supcon", "siglip", "nt_xent", "hard_negative"):
        a, b, lab = make_inputs(n, 256, seed=0, device=dev)
        reps = 20 if n <= 4096 else 5
        res = {}
        for rnd in range(2):
            for label, fn in (("old", old_auto), ("new", new_auto)):
                tiling.auto_tile = fn
                ms, mb = timed(CASES[name].ours, a, b, lab, reps)
                res.setdefault(label, []).append((ms, mb))
        tiling.auto_tile = new_auto
        nv = timed(CASES[name].naive, a, b, lab, reps)[0] if n <= 4096 else float("nan")
        o = min(r[0] for r in res["old"]); w = min(r[0] for r in res["new"])
        om = max(r[1] for r in res["old"]); wm = max(r[1] for r in res["new"])
        rows.append(dict(n=n, name=name, old_ms=o, new_ms=w, old_mb=om, new_mb=wm, naive_ms=nv))
        print(f"{name:14s} n={n:6d} old {o:8.2f} ms {om:8.1f} MB | new {w:8.2f} ms {wm:8.1f} MB | speed-up {o / w:5.2f}x | naive {nv:8.2f} ms", flush=True)
json.dump(rows, open(f"{out}/census2.json", "w"), indent=1)
plot(rows, f"{out}/census2.png")
