"""Mine hard negatives from a corpus and write an n-tuple file that `contrastkit train` reads.

    contrastkit mine --data scifact --output scifact-mined.jsonl
    contrastkit mine --model BAAI/bge-small-en-v1.5 --data path/to/beir --split train --output mined.jsonl \\
        --num-negatives 3 --rank-window 3 50 --relative-margin 0.95
    contrastkit mine --pairs pairs.jsonl --corpus corpus.jsonl --output mined.jsonl --absolute-margin 0.05

Encodes the queries and the corpus once (normalised embeddings), ranks the corpus for
each (query, positive) pair (exact tiled search in bounded memory; faiss with --method or
from --faiss-threshold documents), skips the query's known positives, takes candidates from
the rank window, drops likely false negatives (scoring above --relative-margin x the
positive's score, or above positive - --absolute-margin), prints the score statistics and
writes one JSON line per pair: query, positive, negative_1..negative_n, query_id,
positive_id, negative_ids. With --pairs and no --corpus the corpus is the file's
distinct positives; a positive missing from --corpus is added to it (said in the
output). An existing output file is never replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def _margin(text: str) -> Optional[float]:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a BEIR folder or a bundled dataset name (default: scifact)")
    src.add_argument("--pairs", help="pairs / triplets file (.jsonl, .csv, .tsv, .parquet) with query and positive columns")
    p.add_argument("--corpus", help="corpus file for --pairs (BEIR corpus.jsonl, jsonl, or text with one document "
                                    "per line); default: the pairs' distinct positives")
    p.add_argument("--split", default="train", help="qrels split of --data to mine for (default train)")
    p.add_argument("--output", required=True, help="the n-tuple .jsonl file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="encoder: bundled name, local folder or hub name")
    p.add_argument("--num-negatives", type=int, default=1, help="negatives per pair (default 1)")
    p.add_argument("--rank-window", type=int, nargs=2, default=(0, 50), metavar=("START", "STOP"),
                   help="candidate ranks START..STOP-1 after removing known positives (default 0 50)")
    p.add_argument("--relative-margin", type=_margin, default=0.95,
                   help="drop candidates above this fraction of the positive's score (default 0.95; 'none': off)")
    p.add_argument("--absolute-margin", type=_margin, default=None,
                   help="drop candidates above positive score - margin (default: off)")
    p.add_argument("--sampling", choices=("top", "random"), default="top", help="take the top survivors or a random draw")
    p.add_argument("--keep-short", action="store_true",
                   help="also write pairs that got fewer than --num-negatives negatives (default: leave them out)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder forward pass")
    p.add_argument("--max-length", type=int, default=256, help="token limit for queries and documents")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="encoding precision")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                   help="leave glibc's allocator as it is (default on CPU: keep freed memory in the process, "
                        "contrastkit.training.allocator)")
    p.add_argument("--method", default="auto", help="search: auto, exact, faiss-flat, faiss-ivf, faiss-hnsw")
    p.add_argument("--faiss-threshold", type=int, default=None,
                   help="corpus size from which auto uses faiss IVF (default: never; the exact search was faster "
                        "where measured, docs/benchmarks.md)")
    p.add_argument("--query-prefix", default="", help="text put before every query (e5 / bge style)")
    p.add_argument("--document-prefix", default="", help="text put before every document")
    p.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed records")
    p.add_argument("--stats-json", help="also write the score statistics to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random")


def _load(args) -> Tuple[list, List[str], List[str], str, object]:
    """(examples, corpus ids, corpus texts, how positives are matched, bad-record stats)."""
    from ..data import BadRecords, load_beir, load_corpus, read_examples

    stats = BadRecords()
    skip = bool(args.skip_bad_records)
    if args.pairs is None:
        if args.corpus is not None:
            raise ValueError("--corpus goes with --pairs (a BEIR folder has its own corpus)")
        ds = load_beir(args.data or "scifact", skip_bad_records=skip, stats=stats)
        examples = ds.examples(args.split, skip_bad_records=skip, stats=stats)
        ids, texts = ds.corpus_texts()
        return examples, ids, texts, "id", stats
    examples = list(read_examples(args.pairs, skip_bad_records=skip, stats=stats))
    if args.corpus is not None:
        ids, texts = load_corpus(args.corpus, skip_bad_records=skip, stats=stats)
    else:
        ids, texts = [], []
    # match positives by text; positives the corpus lacks are added to it
    where: Dict[str, int] = {}
    for j, t in enumerate(texts):
        where.setdefault(t, j)
    used = set(ids)
    added = 0
    for n, ex in enumerate(examples):
        if ex.positive in where:
            continue
        new_id = ex.positive_id if ex.positive_id is not None and ex.positive_id not in used else f"positive-{n}"
        where[ex.positive] = len(texts)
        ids.append(new_id)
        texts.append(ex.positive)
        used.add(new_id)
        added += 1
    if args.corpus is not None and added:
        print(f"{added} positives were not in {args.corpus}: added to the corpus searched", flush=True)
    return examples, ids, texts, "text", stats


def _write_atomic(path: Path, lines) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in lines:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import TextEncoder
    from ..models.precision import resolve_device
    from ..training.allocator import tune_malloc_for
    from ..negatives import known_positives, mine_hard_negatives

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.stats_json and Path(args.stats_json).exists() and not args.overwrite:
        print(f"error: {args.stats_json} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if out.suffix.lower() not in (".jsonl", ".json"):
        print(f"error: --output must be a .jsonl file, got {out}", file=sys.stderr)
        return 2
    for name in ("num_negatives", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        examples, ids, texts, match, bad = _load(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if bad.count:
        print(str(bad), flush=True)
    if not examples:
        print("error: no (query, positive) pairs to mine for", file=sys.stderr)
        return 2
    positives = known_positives(examples, corpus_ids=ids if match == "id" else None,
                                corpus_texts=texts if match == "text" else None)
    print(f"{len(examples)} pairs, {len(set(e.query for e in examples))} distinct queries, "
          f"corpus of {len(texts)} documents ({time.perf_counter() - t0:.1f} s)", flush=True)

    device = resolve_device(args.device)
    tune_malloc_for(device, args.tune_malloc, say=lambda note: print(note, file=sys.stderr))
    encoder = TextEncoder(args.model, normalize=True, max_length=args.max_length).to(device)
    queries = list(dict.fromkeys(e.query for e in examples))
    row_of = {q: i for i, q in enumerate(queries)}
    t1 = time.perf_counter()
    q_emb = encoder.encode([args.query_prefix + q for q in queries], batch_size=args.batch_size,
                           precision=args.precision, progress="encode queries")
    c_emb = encoder.encode([args.document_prefix + t for t in texts], batch_size=args.batch_size,
                           precision=args.precision, progress="encode corpus")
    q_emb = q_emb[torch.tensor([row_of[e.query] for e in examples], device=q_emb.device)]
    print(f"encoded {len(queries)} queries and {len(texts)} documents in {time.perf_counter() - t1:.1f} s "
          f"on {device}", flush=True)
    t2 = time.perf_counter()
    try:
        mined = mine_hard_negatives(q_emb, c_emb, positives, num_negatives=args.num_negatives,
                                    rank_window=tuple(args.rank_window), sampling=args.sampling,
                                    relative_margin=args.relative_margin, absolute_margin=args.absolute_margin,
                                    seed=args.seed, method=args.method, faiss_threshold=args.faiss_threshold,
                                    progress=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(mined.summary(), flush=True)

    def records():
        for ex, idx in zip(examples, mined.indices):
            if len(idx) < args.num_negatives and not args.keep_short:
                continue
            rec = {"query": ex.query, "positive": ex.positive}
            for h, j in enumerate(idx, 1):
                rec[f"negative_{h}"] = texts[j]
            if ex.query_id is not None:
                rec["query_id"] = ex.query_id
            if ex.positive_id is not None:
                rec["positive_id"] = ex.positive_id
            rec["negative_ids"] = [ids[j] for j in idx]
            yield rec

    n = _write_atomic(out, records())
    left = len(examples) - n
    print(f"wrote {n} examples to {out}" + (f" ({left} pairs short of {args.num_negatives} negatives left out; "
                                              f"--keep-short keeps them)" if left else "")
          + f" in {time.perf_counter() - t2:.1f} s mining + writing, {time.perf_counter() - t0:.1f} s in all",
          flush=True)
    if args.stats_json:
        stats = dict(mined.stats, written=n, left_out_short=left, model=args.model,
                     bad_records=bad.count)
        Path(args.stats_json).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return 0
