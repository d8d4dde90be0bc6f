"""A minimal BEIR reader: corpus, queries, qrels, and (query, positive document) pairs.

Reads the BEIR layout (``corpus.jsonl[.gz]`` with ``_id``, ``title``, ``text``;
``queries.jsonl[.gz]`` with ``_id``, ``text``; ``qrels/<split>.tsv`` with
``query-id``, ``corpus-id``, ``score``). Any malformed record is a ValueError that
names the file and the line. The bundled SciFact copy is found from the package
(``contrastkit/bundled`` inside the package, or ``$CONTRASTKIT_DATA``); a path may be given.

Example::

    import contrastkit as ck
    ds = ck.data.load_beir("scifact")                # bundled copy
    pairs = ds.pairs("train")                        # [(claim, "title abstract"), ...]
    pairs = ck.data.scifact_pairs("train")           # the same, in one call
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["BeirDataset", "load_beir", "scifact_pairs", "data_dir", "read_jsonl", "read_qrels"]

PathLike = Union[str, os.PathLike]


def data_dir() -> Path:
    """The folder that holds the bundled datasets (SciFact, STS Benchmark).

    ``$CONTRASTKIT_DATA`` when set; otherwise the package's own ``contrastkit/bundled``
    folder (shipped inside the wheel as package data, so an installed contrastkit
    needs no clone). Raises FileNotFoundError naming the places tried.
    """
    tried = []
    env = os.environ.get("CONTRASTKIT_DATA")
    if env:
        tried.append(Path(env))
    tried.append(Path(__file__).resolve().parents[1] / "bundled")
    for p in tried:
        if (p / "scifact").is_dir() or (env and p == Path(env) and p.is_dir()):
            return p
    raise FileNotFoundError("no bundled data folder found; tried " + ", ".join(str(p) for p in tried)
                            + " (set CONTRASTKIT_DATA or pass a path)")


def _resolve(path: Optional[PathLike], name: str = "scifact") -> Path:
    if path is None:
        return data_dir() / name
    p = Path(path)
    if p.is_dir():
        return p
    if not p.is_absolute() and not p.exists():
        q = data_dir() / p
        if q.is_dir():
            return q
    raise FileNotFoundError(f"BEIR folder {str(path)!r} not found")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{folder} has no {stem}.jsonl or {stem}.jsonl.gz")


def read_jsonl(path: PathLike, required: Tuple[str, ...] = ("_id", "text")) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, record)`` of a (gzipped) JSON-lines file; blank lines are
    skipped; a line that is not a JSON object with string ``required`` fields is a
    ValueError naming the file and line."""
    path = Path(path)
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise ValueError(f"{path}:{lineno}: record has no {key!r} field")
                if not isinstance(rec[key], str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {type(rec[key]).__name__}")
            yield lineno, rec


def read_qrels(path: PathLike) -> Dict[str, Dict[str, int]]:
    """``{query_id: {doc_id: score}}`` from a BEIR qrels TSV (header ``query-id corpus-id score``
    optional). A malformed line is a ValueError naming the file and line."""
    path = Path(path)
    out: Dict[str, Dict[str, int]] = {}
    with _open_text(path) as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                 f"got {len(row)}")
            qid, did, score = (c.strip() for c in row)
            if not qid or not did:
                raise ValueError(f"{path}:{lineno}: empty query-id or corpus-id")
            try:
                s = int(float(score))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {score!r} is not a number") from None
            out.setdefault(qid, {})[did] = s
    return out


@dataclass
class BeirDataset:
    """A BEIR dataset in memory: ``corpus`` {id: (title, text)}, ``queries`` {id: text},
    ``qrels`` {split: {query_id: {doc_id: score}}} (loaded on demand)."""

    folder: Path
    corpus: Dict[str, Tuple[str, str]]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[str, Dict[str, int]]] = field(default_factory=dict)

    def document(self, doc_id: str) -> str:
        """``title + " " + text`` (BEIR's usual document string), stripped."""
        title, text = self.corpus[doc_id]
        return f"{title} {text}".strip() if title else text.strip()

    def load_qrels(self, split: str) -> Dict[str, Dict[str, int]]:
        if split not in self.qrels:
            path = self.folder / "qrels" / f"{split}.tsv"
            if not path.is_file():
                have = sorted(p.stem for p in (self.folder / "qrels").glob("*.tsv"))
                raise FileNotFoundError(f"no qrels for split {split!r} in {self.folder / 'qrels'} (have {have})")
            self.qrels[split] = read_qrels(path)
        return self.qrels[split]

    def pairs(self, split: str = "train", min_score: int = 1) -> List[Tuple[str, str]]:
        """(query text, positive document text) for every judged pair with score >= ``min_score``,
        in qrels order. A qrel naming an unknown query or document is a ValueError."""
        qrels = self.load_qrels(split)
        path = self.folder / "qrels" / f"{split}.tsv"
        out = []
        for qid, docs in qrels.items():
            if qid not in self.queries:
                raise ValueError(f"{path}: query-id {qid!r} is not in the queries file")
            for did, score in docs.items():
                if score < min_score:
                    continue
                if did not in self.corpus:
                    raise ValueError(f"{path}: corpus-id {did!r} (query {qid!r}) is not in the corpus")
                out.append((self.queries[qid], self.document(did)))
        return out


def load_beir(path: Optional[PathLike] = None, *, name: str = "scifact") -> BeirDataset:
    """Read a BEIR folder (default: the bundled ``data/<name>``; a bare name such as
    ``"scifact"`` is looked up in the bundled data folder)."""
    folder = _resolve(path, name)
    corpus_file, queries_file = _find(folder, "corpus"), _find(folder, "queries")
    corpus: Dict[str, Tuple[str, str]] = {}
    for lineno, rec in read_jsonl(corpus_file, ("_id", "text")):
        title = rec.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise ValueError(f"{corpus_file}:{lineno}: field 'title' must be a string, got {type(title).__name__}")
        if rec["_id"] in corpus:
            raise ValueError(f"{corpus_file}:{lineno}: duplicate _id {rec['_id']!r}")
        corpus[rec["_id"]] = (title, rec["text"])
    queries: Dict[str, str] = {}
    for lineno, rec in read_jsonl(queries_file, ("_id", "text")):
        if rec["_id"] in queries:
            raise ValueError(f"{queries_file}:{lineno}: duplicate _id {rec['_id']!r}")
        queries[rec["_id"]] = rec["text"]
    return BeirDataset(folder, corpus, queries)


def scifact_pairs(split: str = "train", path: Optional[PathLike] = None) -> List[Tuple[str, str]]:
    """SciFact (claim, "title abstract") training pairs from the bundled copy (or ``path``).

    Example::

        pairs = scifact_pairs("train")      # 919 pairs
    """
    return load_beir(path, name="scifact").pairs(split)
