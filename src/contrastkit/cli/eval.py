"""Evaluate a text embedding model: BEIR retrieval metrics and (optionally) STS-B correlation.

    contrastkit eval all-MiniLM-L6-v2                          # bundled SciFact test split
    contrastkit eval runs/my-run/model --data path/to/beir --split dev --output metrics.json
    contrastkit eval all-MiniLM-L6-v2 --sts --output metrics.json  # adds STS-B test Spearman

MODEL is a model folder (Hugging Face or sentence-transformers layout) or a bundled name;
a two-tower run's ``model/`` (``query/`` and ``document/`` towers, ``model.separate_towers``)
encodes queries (and STS-B sentences, as the main job does) with the query tower and the
corpus with the document tower.
Queries and documents are encoded with L2 normalisation (cosine similarity); every judged
query ranks the whole corpus (exact tiled top-k in bounded memory; faiss IVF from
--faiss-threshold documents on, or the --method named). Prints a table of nDCG / MRR / Recall / MAP / Precision at each
k and writes the metrics, sizes and wall times as JSON with --output. BEIR's
ignore_identical_ids (a document with the query's own id is not retrieved) is off unless
--ignore-identical-ids is given.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List


def _ks(text: str) -> List[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model folder or bundled name (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--data", default="scifact",
                   help="BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv) or a bundled "
                        "dataset name (default: scifact); 'none' for STS only")
    p.add_argument("--split", default="test", help="qrels split to evaluate (default test)")
    p.add_argument("--sts", action="store_true", help="also report STS Benchmark Spearman / Pearson (bundled)")
    p.add_argument("--sts-split", choices=("train", "dev", "test"), default="test", help="STS-B split (default test)")
    p.add_argument("--ks", type=_ks, default=[1, 10, 100], help="cut-offs, comma separated (default 1,10,100)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder forward pass (default 64)")
    p.add_argument("--max-length", type=int, default=None,
                   help="token limit (default: the model folder's max_seq_length, else 512)")
    p.add_argument("--pooling", choices=("mean", "cls", "last"), default=None,
                   help="pooling (default: what a sentence-transformers folder says, else mean)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="encoding precision (default fp32; auto: bf16 where the device runs it fast)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-tune-malloc", dest="tune_malloc", action="store_false",
                   help="leave glibc's allocator as it is (default on CPU: keep freed memory in the process, "
                        "contrastkit.training.allocator)")
    p.add_argument("--method", default="auto", choices=("auto", "exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"),
                   help="search method (default auto: exact, faiss IVF from --faiss-threshold documents on)")
    p.add_argument("--faiss-threshold", type=int, default=None,
                   help="corpus size from which auto uses faiss IVF (default: never; the exact search was faster "
                        "where measured, docs/benchmarks.md)")
    p.add_argument("--query-prefix", default="", help="text put before every query (e5 / bge style)")
    p.add_argument("--document-prefix", default="", help="text put before every document")
    p.add_argument("--ignore-identical-ids", action="store_true",
                   help="never retrieve the document whose id equals the query id (BEIR's option)")
    p.add_argument("--output", help="write the metrics as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def _encoder_fn(encoder, args, what: str) -> Callable[[List[str]], "object"]:
    """texts -> normalised embeddings, passing only the options this TextEncoder.encode takes."""
    params = inspect.signature(encoder.encode).parameters
    kwargs: Dict[str, object] = {"batch_size": args.batch_size}
    if "precision" in params:
        kwargs["precision"] = args.precision
    elif args.precision != "fp32":
        raise ValueError("this TextEncoder.encode has no precision option; use --precision fp32")
    prefix = args.query_prefix if what == "queries" else args.document_prefix

    def encode(texts: List[str]):
        if "progress" in params:
            kwargs["progress"] = f"encode {what}" if len(texts) > 256 else None
        return encoder.encode([prefix + t for t in texts], **kwargs)

    return encode


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def two_tower_folders(model: str):
    """``(query folder, document folder)`` when ``model`` is a two-tower run's model folder
    (it holds ``query/`` and ``document/``, each a whole model), else None."""
    p = Path(model)
    if (p / "query").is_dir() and (p / "document").is_dir():
        return p / "query", p / "document"
    return None


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..data import load_beir
    from ..data.sts import load_sts
    from ..evaluation import evaluate_retrieval, evaluate_sts
    from ..models import TextEncoder
    from ..models.precision import resolve_device
    from ..training.allocator import tune_malloc_for

    retrieval = str(args.data).lower() != "none"
    if not retrieval and not args.sts:
        return _fail("nothing to evaluate: --data none without --sts")
    for name in ("batch_size", "faiss_threshold"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 1:
        return _fail(f"--max-length must be >= 1, got {args.max_length}")
    out = Path(args.output) if args.output else None
    if out is not None and out.exists() and not args.overwrite:
        return _fail(f"{out} exists; pass --overwrite to replace it")

    timings: Dict[str, float] = {}
    result: Dict[str, object] = {"model": args.model}
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    tune_malloc_for(device, args.tune_malloc, say=lambda note: print(note, file=sys.stderr))
    towers = two_tower_folders(args.model)
    parent = Path(args.model).parent
    if towers is None and Path(args.model).name in ("query", "document") and two_tower_folders(str(parent)):
        print(f"warning: {args.model} is one tower of the two-tower model {parent}; it encodes the queries and "
              f"the documents here. Pass {parent} to encode each side with its own tower.", file=sys.stderr)
    try:
        kw = {"normalize": True, "max_length": args.max_length}
        if args.pooling is not None:
            kw["pooling"] = args.pooling
        encoder = TextEncoder(str(towers[0]) if towers else args.model, **kw).to(device)
        doc_encoder = TextEncoder(str(towers[1]), **kw).to(device) if towers else encoder
    except (OSError, ValueError) as err:
        return _fail(f"cannot load model {args.model!r}: {err}")
    for e in {id(encoder): encoder, id(doc_encoder): doc_encoder}.values():
        if e.max_length is None:
            e.max_length = 512
    timings["load_model"] = time.perf_counter() - t0
    print(f"model {args.model} ({encoder.pooling} pooling, normalised, max_length {encoder.max_length}"
          + (", two towers: query/ for queries, document/ for the corpus" if towers else "") + f") on {device}",
          flush=True)
    result.update(device=str(device), max_length=encoder.max_length, pooling=encoder.pooling,
                  precision=args.precision, two_towers=towers is not None)

    try:
        if retrieval:
            t = time.perf_counter()
            ds = load_beir(args.data)
            qrels = ds.load_qrels(args.split)
            timings["load_data"] = time.perf_counter() - t
            ids = list(ds.corpus)
            t = time.perf_counter()
            c_emb = _encoder_fn(doc_encoder, args, "corpus")([ds.document(d) for d in ids])
            timings["encode_corpus"] = time.perf_counter() - t
            t = time.perf_counter()
            scores = evaluate_retrieval(_encoder_fn(encoder, args, "queries"), None, ds.queries, ds.corpus, qrels,
                                        ks=tuple(args.ks), corpus_embeddings=c_emb, corpus_ids=ids,
                                        method=args.method, faiss_threshold=args.faiss_threshold,
                                        ignore_identical_ids=args.ignore_identical_ids, progress=True)
            timings["encode_queries_and_rank"] = time.perf_counter() - t
            print(f"\n{ds.folder.name} {args.split}: {len(scores)} queries, {len(ids)} documents", flush=True)
            print(scores.table(), flush=True)
            result["retrieval"] = {"data": str(ds.folder), "split": args.split, "corpus_size": len(ids),
                                   "method": args.method, "ignore_identical_ids": bool(args.ignore_identical_ids),
                                   **scores.to_dict()}
            del c_emb
        if args.sts:
            t = time.perf_counter()
            sts = load_sts(args.sts_split)
            res = evaluate_sts(_encoder_fn(encoder, args, "sts sentences"), sts)
            timings["sts"] = time.perf_counter() - t
            print(f"\nSTS-B {args.sts_split}: spearman {res['spearman']:.4f}  pearson {res['pearson']:.4f} "
                  f"({res['n']} pairs)", flush=True)
            result["sts"] = {"split": args.sts_split, **res}
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    timings["total"] = time.perf_counter() - t0
    result["wall_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    print("\nwall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()), flush=True)
    if out is not None:
        _write_json_atomic(out, result)
        print(f"wrote {out}", flush=True)
    return 0
