"""Peak memory of reading a large pairs file for training: in memory vs data.stream, side by side.

Writes a synthetic JSON-lines triplets file of N records (query, positive, negative; every
text distinct, about 300 bytes a record), then, each in a fresh process, measures the peak
resident memory (ru_maxrss) and the wall time of:

- ``memory``: the in-memory reader of the main job (``build_retrieval_task`` with
  ``data.stream: false``: every record, the corpus and the queries held) and one epoch of
  its no-duplicates batches;
- ``stream``: ``data.stream: true`` (the bounded hold-out pass) and one epoch through the
  shuffle buffer (``ShuffleBufferBatches``), as the training loop iterates it;
- ``peer``: Hugging Face ``datasets`` (what sentence-transformers' trainer reads with)
  ``load_dataset("json", streaming=True).shuffle(buffer_size=...)``, one pass.

No model runs: this measures what the data path holds. Prints one row per reader and the
ratios to ``stream``; run it at two sizes to see which grows with the file.

    python scripts/bench_stream_memory.py --records 200000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("protein vitamin cancer virus neuron insulin gene cell bone heart lung liver brain muscle blood skin "
         "study trial effect dose risk patients measured increased reduced model").split()


def write_file(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(12))
            f.write(json.dumps({"query": f"q{i} what about {words[:40]}?",
                                "positive": f"d{i} we report that {words} in cohort {i}",
                                "negative": f"n{i} an unrelated note on {words[::-1]} number {i}"}) + "\n")


def measure(reader: str, path: str, batch_size: int, buffer: int) -> dict:
    """Runs in the child process."""
    t0 = time.perf_counter()
    batches = 0
    if reader == "peer":
        from datasets import load_dataset

        ds = load_dataset("json", data_files=path, split="train", streaming=True).shuffle(seed=0, buffer_size=buffer)
        n = sum(1 for _ in ds)
        batches = n // batch_size
    else:
        from contrastkit.recipes.retrieval_task import build_retrieval_task
        from contrastkit.recipes.common import ExampleBatches
        from contrastkit.negatives.samplers import NoDuplicatesBatchSampler
        from contrastkit.negatives.stream_sampler import ShuffleBufferBatches
        from contrastkit.training.config import load_config

        sets = [f"data.source={path}", "data.stream_eval_queries=500"] if reader == "stream" else [f"data.source={path}"]
        if reader == "stream":
            sets.append(f"data.shuffle_buffer={buffer}")
        cfg = load_config(overrides=sets + ["data.stream=true"] if reader == "stream" else sets)
        task = build_retrieval_task(cfg.data, seed=0)
        if reader == "stream":
            it = ShuffleBufferBatches(task.train_stream, batch_size, num_records=task.train_count, seed=0,
                                      buffer_size=buffer, num_negatives=1)
        else:
            it = ExampleBatches(NoDuplicatesBatchSampler(task.train_examples, batch_size, seed=0, drop_last=True,
                                                         num_negatives=1), task.train_examples, num_negatives=1)
        for _ in it:
            batches += 1
    return {"reader": reader, "seconds": round(time.perf_counter() - t0, 1), "batches": batches,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=10_000)
    ap.add_argument("--readers", nargs="+", default=["memory", "stream", "peer"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.batch_size, args.buffer)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.records:
            path = Path(tmp) / f"pairs_{n}.jsonl"
            write_file(path, n)
            size = path.stat().st_size / 2**20
            rows = []
            for reader in args.readers:
                env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf_cache"), "HF_HUB_OFFLINE": "1"}
                out = subprocess.run([sys.executable, __file__, "--batch-size", str(args.batch_size), "--buffer",
                                      str(args.buffer), "--child", reader, str(path)],
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    print(f"{reader}: failed\n{out.stderr[-2000:]}")
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            base = next((r for r in rows if r["reader"] == "stream"), None)
            print(f"\n{n} records, {size:.0f} MiB file, batch {args.batch_size}, buffer {args.buffer}")
            print(f"{'reader':8} {'peak RSS MiB':>13} {'x stream':>9} {'seconds':>8} {'batches':>8}")
            for r in rows:
                ratio = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
                print(f"{r['reader']:8} {r['peak_rss_mb']:13.0f} {ratio:9.2f} {r['seconds']:8.1f} {r['batches']:8d}")


if __name__ == "__main__":
    main()
