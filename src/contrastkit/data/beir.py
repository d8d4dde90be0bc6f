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

from .examples import Example

__all__ = ["BeirDataset", "load_beir", "scifact_pairs", "data_dir", "read_jsonl", "read_qrels", "iter_qrels"]

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


def read_jsonl(path: PathLike, required: Tuple[str, ...] = ("_id", "text"), *, skip_bad_records: bool = False,
               stats=None) -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, record)`` of a (gzipped) JSON-lines file; blank lines are
    skipped; a line that is not a JSON object with string ``required`` fields is a
    ValueError naming the file and line (with ``skip_bad_records`` it is counted in
    ``stats``, a :class:`~contrastkit.data.BadRecords`, and skipped)."""
    path = Path(path)
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = _json_record(path, lineno, line, required)
            except ValueError as err:
                if not skip_bad_records:
                    raise
                _count(stats, err)
                continue
            yield lineno, rec


def _count(stats, err) -> None:
    if stats is not None:
        stats.add(str(err))


def _json_record(path: Path, lineno: int, line: str, required: Tuple[str, ...]) -> dict:
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
    return rec


def iter_qrels(path: PathLike, *, skip_bad_records: bool = False, stats=None) -> Iterator[Tuple[int, str, str, int]]:
    """Yield ``(line_number, query_id, corpus_id, score)`` of a BEIR qrels TSV (header
    ``query-id corpus-id score`` optional). A malformed line is a ValueError naming the
    file and line (counted in ``stats`` and skipped with ``skip_bad_records``)."""
    path = Path(path)
    with _open_text(path) as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            try:
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
            except ValueError as err:
                if not skip_bad_records:
                    raise
                _count(stats, err)
                continue
            yield lineno, qid, did, s


def read_qrels(path: PathLike, *, skip_bad_records: bool = False, stats=None) -> Dict[str, Dict[str, int]]:
    """``{query_id: {doc_id: score}}`` from a BEIR qrels TSV (header ``query-id corpus-id score``
    optional). A malformed line is a ValueError naming the file and line."""
    out: Dict[str, Dict[str, int]] = {}
    for _, qid, did, s in iter_qrels(path, skip_bad_records=skip_bad_records, stats=stats):
        out.setdefault(qid, {})[did] = s
    return out


@dataclass
class BeirDataset:
    """A BEIR dataset in memory: ``corpus`` {id: (title, text)}, ``queries`` {id: text},
    ``qrels`` {split: {query_id: {doc_id: score}}} (loaded on demand; ``qrel_lines``
    keeps the qrels line of each (query_id, doc_id) for error messages)."""

    folder: Path
    corpus: Dict[str, Tuple[str, str]]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[str, Dict[str, int]]] = field(default_factory=dict)
    qrel_lines: Dict[str, Dict[Tuple[str, str], int]] = field(default_factory=dict, repr=False)
    _skipped_splits: set = field(default_factory=set, repr=False)  # qrels cached with bad lines skipped

    def document(self, doc_id: str) -> str:
        """``title + " " + text`` (BEIR's usual document string), stripped."""
        title, text = self.corpus[doc_id]
        return f"{title} {text}".strip() if title else text.strip()

    def corpus_texts(self) -> Tuple[List[str], List[str]]:
        """``(doc_ids, documents)`` of the whole corpus in file order (documents as
        :meth:`document` gives them), e.g. to encode it once for mining / evaluation."""
        ids = list(self.corpus)
        return ids, [self.document(d) for d in ids]

    def qrels_path(self, split: str) -> Path:
        return self.folder / "qrels" / f"{split}.tsv"

    def load_qrels(self, split: str, *, skip_bad_records: bool = False, stats=None) -> Dict[str, Dict[str, int]]:
        """``{query_id: {doc_id: score}}`` of ``qrels/<split>.tsv`` (cached; a strict call
        re-reads a split that was cached with bad lines skipped, so it still raises)."""
        if split in self._skipped_splits and not skip_bad_records:
            self.qrels.pop(split, None)
            self._skipped_splits.discard(split)
        if split not in self.qrels:
            path = self.qrels_path(split)
            if not path.is_file():
                have = sorted(p.stem for p in (self.folder / "qrels").glob("*.tsv"))
                raise FileNotFoundError(f"no qrels for split {split!r} in {self.folder / 'qrels'} (have {have})")
            out: Dict[str, Dict[str, int]] = {}
            lines: Dict[Tuple[str, str], int] = {}
            for lineno, qid, did, s in iter_qrels(path, skip_bad_records=skip_bad_records, stats=stats):
                out.setdefault(qid, {})[did] = s
                lines[(qid, did)] = lineno
            self.qrels[split], self.qrel_lines[split] = out, lines
            if skip_bad_records:
                self._skipped_splits.add(split)
        return self.qrels[split]

    def _judged(self, split: str, min_score: int, skip_bad_records: bool, stats) -> Iterator[Tuple[str, str, str]]:
        """(query_id, doc_id, "file:line") of every judged pair with score >= min_score."""
        qrels = self.load_qrels(split, skip_bad_records=skip_bad_records, stats=stats)
        path = self.qrels_path(split)
        lines = self.qrel_lines.get(split, {})
        judged = [(q, d, s) for q, docs in qrels.items() for d, s in docs.items()]
        if all((q, d) in lines for q, d, _ in judged):
            judged.sort(key=lambda t: lines[(t[0], t[1])])  # file order
        for qid, did, score in judged:
            where = f"{path}:{lines[(qid, did)]}" if (qid, did) in lines else str(path)
            try:
                if qid not in self.queries:
                    raise ValueError(f"{where}: query-id {qid!r} is not in the queries file")
                if did not in self.corpus:
                    raise ValueError(f"{where}: corpus-id {did!r} (query {qid!r}) is not in the corpus")
            except ValueError as err:
                if not skip_bad_records:
                    raise
                _count(stats, err)
                continue
            if score >= min_score:
                yield qid, did, where

    def relevant_qrels(self, split: str, *, min_score: int = 1, skip_bad_records: bool = False,
                       stats=None) -> Dict[str, Dict[str, int]]:
        """``{query_id: {doc_id: score}}`` of the judged pairs with score >= ``min_score``,
        queries in the order of their first qrels line. Every line is checked first (score 0
        included): a query-id not in the queries file or a corpus-id not in the corpus is a
        ValueError naming the qrels file and line (counted in ``stats`` and skipped with
        ``skip_bad_records``).

        Example::

            import contrastkit as ck
            qrels = ck.data.load_beir("scifact").relevant_qrels("train")
            assert len(qrels) == 809
        """
        out: Dict[str, Dict[str, int]] = {}
        for qid, did, _ in self._judged(split, min_score, skip_bad_records, stats):
            out.setdefault(qid, {})[did] = self.qrels[split][qid][did]
        return out

    def pairs(self, split: str = "train", min_score: int = 1, *, skip_bad_records: bool = False,
              stats=None) -> List[Tuple[str, str]]:
        """(query text, positive document text) for every judged pair with score >= ``min_score``,
        in qrels file order. A qrel naming an unknown query or document is a ValueError naming
        the qrels file and line (counted in ``stats`` and skipped with ``skip_bad_records``)."""
        return [(self.queries[q], self.document(d)) for q, d, _ in self._judged(split, min_score, skip_bad_records, stats)]

    def examples(self, split: str = "train", *, min_score: int = 1, skip_bad_records: bool = False,
                 stats=None) -> List[Example]:
        """One :class:`~contrastkit.data.Example` per judged (query, relevant document)
        pair with score >= ``min_score``, in qrels file order, with ``query_id``,
        ``positive_id`` and ``source`` (the qrels ``file:line``); the document text is
        ``title + " " + text`` as in :meth:`pairs`. Unknown ids raise as in :meth:`pairs`.

        Example::

            import contrastkit as ck
            ex = ck.data.load_beir("scifact").examples("train")
            assert len(ex) == 919
        """
        return [Example(self.queries[q], self.document(d), query_id=q, positive_id=d, source=where)
                for q, d, where in self._judged(split, min_score, skip_bad_records, stats)]


def load_beir(path: Optional[PathLike] = None, *, name: str = "scifact", skip_bad_records: bool = False,
              stats=None) -> BeirDataset:
    """Read a BEIR folder (default: the bundled ``contrastkit/bundled/<name>``; a bare
    name such as ``"scifact"`` is looked up in the bundled data folder). A malformed
    corpus / query line (bad JSON, a missing or non-string field, an empty id, an empty
    query or a document with neither title nor text, a duplicate id) is a ValueError
    naming file and line; ``skip_bad_records`` counts it in ``stats`` (a
    :class:`~contrastkit.data.BadRecords`) and skips it."""
    folder = _resolve(path, name)
    corpus_file, queries_file = _find(folder, "corpus"), _find(folder, "queries")
    corpus: Dict[str, Tuple[str, str]] = {}
    for lineno, rec in read_jsonl(corpus_file, ("_id", "text"), skip_bad_records=skip_bad_records, stats=stats):
        title = rec.get("title", "")
        try:
            if title is None:
                title = ""
            if not isinstance(title, str):
                raise ValueError(f"{corpus_file}:{lineno}: field 'title' must be a string, got {type(title).__name__}")
            if not rec["_id"].strip():
                raise ValueError(f"{corpus_file}:{lineno}: field '_id' is empty")
            if not title.strip() and not rec["text"].strip():
                raise ValueError(f"{corpus_file}:{lineno}: empty document (no title or text)")
            if rec["_id"] in corpus:
                raise ValueError(f"{corpus_file}:{lineno}: duplicate _id {rec['_id']!r}")
        except ValueError as err:
            if not skip_bad_records:
                raise
            _count(stats, err)
            continue
        corpus[rec["_id"]] = (title, rec["text"])
    queries: Dict[str, str] = {}
    for lineno, rec in read_jsonl(queries_file, ("_id", "text"), skip_bad_records=skip_bad_records, stats=stats):
        if not rec["_id"].strip():
            err = ValueError(f"{queries_file}:{lineno}: field '_id' is empty")
        elif not rec["text"].strip():
            err = ValueError(f"{queries_file}:{lineno}: field 'text' is empty")
        elif rec["_id"] in queries:
            err = ValueError(f"{queries_file}:{lineno}: duplicate _id {rec['_id']!r}")
        else:
            err = None
        if err is not None:
            if not skip_bad_records:
                raise err
            _count(stats, err)
            continue
        queries[rec["_id"]] = rec["text"]
    return BeirDataset(folder, corpus, queries)


def scifact_pairs(split: str = "train", path: Optional[PathLike] = None) -> List[Tuple[str, str]]:
    """SciFact (claim, "title abstract") training pairs from the bundled copy (or ``path``).

    Example::

        from contrastkit.data import scifact_pairs
        pairs = scifact_pairs("train")
        assert len(pairs) == 919
    """
    return load_beir(path, name="scifact").pairs(split)
