"""scripts/bench_mine_memory.py at a tiny size: both miners run on the same embeddings (the
peer's encoder refuses to run, so it must take them from its cache) and pick the same
negatives, so the benchmark's memory figures compare like with like."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_mine_memory.py"


def test_the_mining_benchmark_runs_both_miners_on_the_same_embeddings():
    out = subprocess.run([sys.executable, str(SCRIPT), "--queries", "300", "--corpus", "800", "--limit-gb", "16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in ("ours", "peer")}
    assert set(rows) == {"ours", "peer"}, out.stdout
    assert rows["ours"][-1] == "1.0000" and rows["peer"][-1] == "1.0000", out.stdout   # the same negatives
