"""Streamed readers for training examples and corpus-only files.

:func:`read_examples` reads pairs, triplets and n-tuples from JSON lines, CSV, TSV or
Parquet, one record at a time (JSON lines / CSV line by line, Parquet batch by batch
through pyarrow), so a file larger than memory can be read. A malformed record is a
ValueError naming the file and line (row for Parquet); with ``skip_bad_records=True``
it is counted in a :class:`BadRecords` and skipped. Files are only ever read.

:func:`load_corpus_texts` / :func:`load_corpus` read a corpus without queries (BEIR
``corpus.jsonl``, a JSON-lines file of documents, or a text file with one document per
line) for unsupervised pairs (:func:`independent_crops`) or mining.

Example::

    import json, tempfile, os
    from contrastkit.data import read_examples
    path = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\\n")
    [ex] = read_examples(path)
    assert ex.negatives == ("n",) and ex.source == path + ":1"
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .beir import _open_text
from .examples import BadRecords, Example

__all__ = ["read_examples", "load_corpus", "load_corpus_texts", "FORMATS", "negative_column_names"]

PathLike = Union[str, os.PathLike]

FORMATS = ("jsonl", "csv", "tsv", "parquet")
_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}


def _format_of(path: Path, fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIX:
        return _SUFFIX[suffixes[-1]]
    raise ValueError(f"{path}: cannot tell the format from the suffix {''.join(path.suffixes) or '(none)'!r}; "
                     f"pass format= one of {FORMATS} (suffixes: {sorted(_SUFFIX)}, optionally .gz)")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def negative_column_names(columns: Sequence[str]) -> List[str]:
    """The columns read as negatives when ``negative_columns=None``: every column whose
    name starts with ``neg`` (``negative``, ``negative_1``, ``neg2``, ``negatives``...),
    except id and score columns (names ending in ``id``, ``ids``, ``score`` or
    ``scores``), in natural order (``negative_2`` before ``negative_10``).

    Example::

        from contrastkit.data import negative_column_names
        names = negative_column_names(["query", "positive", "negative_10", "negative_2", "negative_ids"])
        assert names == ["negative_2", "negative_10"]
    """
    out = []
    for c in columns:
        low = c.lower()
        if low.startswith("neg") and not re.search(r"(ids?|scores?)$", low):
            out.append(c)
    return sorted(out, key=_natural_key)


def _open_csv(path: Path) -> io.TextIOBase:
    """Text stream for the csv module (``newline=""`` keeps newlines inside quoted cells)."""
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


class _Bad(Exception):
    """A malformed record (message without the location)."""


def _text(value: Any, column: str) -> str:
    if value is None:
        raise _Bad(f"column {column!r} is missing or null")
    if not isinstance(value, str):
        raise _Bad(f"column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"column {column!r} is empty")
    return value


def _opt_id(value: Any, column: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Bad(f"column {column!r} must be a string or an integer id, got {type(value).__name__}")
    return str(value)


class _Columns:
    """Turns one record (a mapping column -> value) into an Example."""

    def __init__(self, query_column: str, positive_column: str, negative_columns: Optional[Sequence[str]],
                 query_id_column: str, positive_id_column: str, negative_ids_column: str) -> None:
        for name, value in (("query_column", query_column), ("positive_column", positive_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if negative_columns is not None:
            if isinstance(negative_columns, str) or not all(isinstance(c, str) for c in negative_columns):
                raise ValueError(f"negative_columns must be None or a list of column names, got {negative_columns!r}")
            negative_columns = list(negative_columns)
        self.q, self.p, self.negs = query_column, positive_column, negative_columns
        self.qid, self.pid, self.nids = query_id_column, positive_id_column, negative_ids_column

    def check_header(self, columns: Sequence[str], where: str) -> None:
        """Columns known up front (CSV header, Parquet schema): a missing one is fatal."""
        needed = [self.q, self.p] + (self.negs or [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{where}: no column {missing[0]!r} (columns: {', '.join(columns)}); "
                             f"pass query_column= / positive_column= / negative_columns= to name them")

    def negative_columns(self, columns: Sequence[str]) -> List[str]:
        return list(self.negs) if self.negs is not None else negative_column_names(columns)

    def example(self, rec: Dict[str, Any], negs: Sequence[str], source: str, parse_lists: bool) -> Example:
        for c in (self.q, self.p):
            if c not in rec:
                raise _Bad(f"record has no {c!r} column")
        query, positive = _text(rec[self.q], self.q), _text(rec[self.p], self.p)
        negatives: List[str] = []
        for c in negs:
            if c not in rec:
                raise _Bad(f"record has no {c!r} column")
            v = rec[c]
            if isinstance(v, (list, tuple)):
                if not v:
                    raise _Bad(f"column {c!r} is an empty list")
                negatives.extend(_text(x, f"{c}[{i}]") for i, x in enumerate(v))
            else:
                negatives.append(_text(v, c))
        neg_ids: Tuple = ()
        raw = rec.get(self.nids)
        if raw is not None and raw != "":
            if parse_lists and isinstance(raw, str):
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError:
                    raise _Bad(f"column {self.nids!r} must hold a JSON list of ids, got {raw[:40]!r}") from None
            if not isinstance(raw, (list, tuple)):
                raise _Bad(f"column {self.nids!r} must be a list of ids, got {type(raw).__name__}")
            if len(raw) != len(negatives):
                raise _Bad(f"column {self.nids!r} has {len(raw)} ids for {len(negatives)} negatives")
            neg_ids = tuple(_opt_id(x, f"{self.nids}[{i}]") for i, x in enumerate(raw))
        return Example(query, positive, tuple(negatives), _opt_id(rec.get(self.qid), self.qid),
                       _opt_id(rec.get(self.pid), self.pid), neg_ids, source)


def read_examples(path: PathLike, *, format: Optional[str] = None, query_column: str = "query",
                  positive_column: str = "positive", negative_columns: Optional[Sequence[str]] = None,
                  skip_bad_records: bool = False, stats: Optional[BadRecords] = None,
                  query_id_column: str = "query_id", positive_id_column: str = "positive_id",
                  negative_ids_column: str = "negative_ids", parquet_batch_rows: int = 1024) -> Iterator[Example]:
    """Stream :class:`Example` records (pairs, triplets, n-tuples) from a file.

    Args:
        path: a ``.jsonl`` / ``.json`` (JSON lines: one object per line), ``.csv``,
            ``.tsv`` (header row, standard CSV quoting) or ``.parquet`` file; ``.gz`` is
            read transparently for the text formats.
        format: one of ``"jsonl"``, ``"csv"``, ``"tsv"``, ``"parquet"``; default from the suffix.
        query_column, positive_column: the columns holding the query and positive text.
        negative_columns: ``None``: every column named ``neg*`` except id / score columns, in
            natural order (see :func:`negative_column_names`); or an explicit list. A
            negative cell may be a string or (JSON lines / Parquet) a list of strings.
        skip_bad_records: count and skip malformed records instead of raising.
        stats: a :class:`BadRecords` to count skipped records in.
        query_id_column, positive_id_column, negative_ids_column: optional id columns
            (string or integer ids; ``negative_ids`` is a list, in CSV / TSV a JSON list),
            used when present.

    Yields examples lazily, in file order. A record is malformed when it is not valid
    JSON / not an object, lacks a column, or has an empty (whitespace-only), null or
    non-string text; the ValueError says ``path:line: what`` (``path:row N`` for
    Parquet, 1-based data rows). A CSV / Parquet file whose header lacks a named column
    raises immediately, whatever ``skip_bad_records`` says (no record could be read).
    Blank lines in JSON lines are ignored.

    Example::

        import tempfile, os
        from contrastkit.data import read_examples
        path = os.path.join(tempfile.mkdtemp(), "t.csv")
        open(path, "w").write("query,positive,negative_1,negative_2\\nq,p,n1,n2\\n")
        [ex] = list(read_examples(path))
        assert ex.negatives == ("n1", "n2")
    """
    path = Path(path)
    fmt = _format_of(path, format)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    cols = _Columns(query_column, positive_column, negative_columns, query_id_column, positive_id_column,
                    negative_ids_column)
    if stats is None:
        stats = BadRecords()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
        cols.check_header(names, str(path))
        return _read_parquet(pf, path, cols, names, skip_bad_records, stats, int(parquet_batch_rows))
    if fmt in ("csv", "tsv"):
        with _open_csv(path) as f:
            header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), None)
        if header is None:
            raise ValueError(f"{path}:1: empty file (expected a header row)")
        header = [h.lstrip("\ufeff") if i == 0 else h for i, h in enumerate(header)]
        cols.check_header(header, f"{path}:1")
        return _read_csv(path, fmt, cols, header, skip_bad_records, stats)
    return _read_jsonl(path, cols, skip_bad_records, stats)


def _handle(err: _Bad, where: str, skip: bool, stats: BadRecords) -> None:
    msg = f"{where}: {err}"
    if not skip:
        raise ValueError(msg) from None
    stats.add(msg)


def _read_jsonl(path: Path, cols: _Columns, skip: bool, stats: BadRecords) -> Iterator[Example]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    hint = " (a .json file must be JSON lines: one object per line)" if line.lstrip()[:1] == "[" else ""
                    raise _Bad(f"not valid JSON ({err.msg}){hint}") from None
                if not isinstance(rec, dict):
                    raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
                ex = cols.example(rec, cols.negative_columns(list(rec)), where, parse_lists=False)
            except _Bad as err:
                _handle(err, where, skip, stats)
                continue
            yield ex


def _read_csv(path: Path, fmt: str, cols: _Columns, header: List[str], skip: bool,
              stats: BadRecords) -> Iterator[Example]:
    negs = cols.negative_columns(header)
    n = len(header)
    if csv.field_size_limit() < 2 ** 31 - 1:
        csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # long documents in one cell
    with _open_csv(path) as f:
        reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
        next(reader, None)
        last = reader.line_num
        for row in reader:
            lineno, last = last + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            where = f"{path}:{lineno}"
            try:
                if len(row) != n:
                    raise _Bad(f"expected {n} fields (the header's), got {len(row)}")
                rec = dict(zip(header, row))
                ex = cols.example(rec, negs, where, parse_lists=True)
            except _Bad as err:
                _handle(err, where, skip, stats)
                continue
            yield ex


def _read_parquet(pf, path: Path, cols: _Columns, names: List[str], skip: bool, stats: BadRecords,
                  batch_rows: int) -> Iterator[Example]:
    negs = cols.negative_columns(names)
    wanted = [c for c in dict.fromkeys([cols.q, cols.p, *negs, cols.qid, cols.pid, cols.nids]) if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=max(1, batch_rows), columns=wanted):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            where = f"{path}:row {row}"
            try:
                ex = cols.example({c: data[c][i] for c in wanted}, negs, where, parse_lists=False)
            except _Bad as err:
                _handle(err, where, skip, stats)
                continue
            yield ex


def load_corpus(path: PathLike, *, text_field: str = "text", title_field: Optional[str] = "title",
                id_field: str = "_id", skip_bad_records: bool = False,
                stats: Optional[BadRecords] = None) -> Tuple[List[str], List[str]]:
    """``(ids, texts)`` of a corpus-only file.

    - a BEIR folder (its ``corpus.jsonl[.gz]``) or a ``.jsonl[.gz]`` file: one object
      per line with ``text_field`` (and optional ``title_field``: the document is then
      ``title + " " + text`` as in BEIR; and ``id_field``, else ``id``, else the line
      number); a line that is a bare JSON string is a document too;
    - any other file (``.txt``...): every non-blank line is a document, its id the line
      number.

    A malformed line (bad JSON, no / empty / non-string text, duplicate id) is a
    ValueError naming file and line; ``skip_bad_records`` counts and skips it.
    :func:`iter_corpus` reads the same documents lazily.

    Example::

        import tempfile, os
        from contrastkit.data import load_corpus
        path = os.path.join(tempfile.mkdtemp(), "docs.txt")
        open(path, "w").write("first document\\n\\nsecond one\\n")
        ids, texts = load_corpus(path)
        assert ids == ["1", "3"] and texts == ["first document", "second one"]
    """
    ids: List[str] = []
    texts: List[str] = []
    for doc_id, text in iter_corpus(path, text_field=text_field, title_field=title_field, id_field=id_field,
                                    skip_bad_records=skip_bad_records, stats=stats):
        ids.append(doc_id)
        texts.append(text)
    return ids, texts


def corpus_file(path: PathLike) -> Path:
    """The corpus file a path names: the path itself, or a BEIR folder's ``corpus.jsonl[.gz]``."""
    p = Path(path)
    if p.is_dir():
        from .beir import _find

        p = _find(p, "corpus")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return p


def iter_corpus(path: PathLike, *, text_field: str = "text", title_field: Optional[str] = "title",
                id_field: str = "_id", skip_bad_records: bool = False, stats: Optional[BadRecords] = None,
                check_duplicate_ids: bool = True) -> Iterator[Tuple[str, str]]:
    """``(id, text)`` of each document of a corpus-only file, read lazily, in file order
    (the formats and errors of :func:`load_corpus`). ``check_duplicate_ids=False`` leaves
    out the duplicate-id check, whose set of every id seen grows with the file.

    Example::

        import tempfile, os
        from contrastkit.data import iter_corpus
        path = os.path.join(tempfile.mkdtemp(), "docs.jsonl")
        open(path, "w").write('{"_id": "a", "title": "T", "text": "body"}\\n"bare text"\\n')
        assert list(iter_corpus(path)) == [("a", "T body"), ("2", "bare text")]
    """
    p = corpus_file(path)
    if stats is None:
        stats = BadRecords()
    suffixes = [s.lower() for s in p.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    jsonl = bool(suffixes) and suffixes[-1] in (".jsonl", ".json", ".ndjson")
    seen = set()
    with _open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                if not jsonl:
                    doc_id, text = str(lineno), line.rstrip("\r\n")
                else:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise _Bad(f"not valid JSON ({err.msg})") from None
                    if isinstance(rec, str):
                        doc_id, text = str(lineno), _text(rec, "document")
                    elif isinstance(rec, dict):
                        if text_field not in rec:
                            raise _Bad(f"record has no {text_field!r} field")
                        body = rec[text_field]
                        if not isinstance(body, str):
                            raise _Bad(f"field {text_field!r} must be a string, got {type(body).__name__}")
                        title = rec.get(title_field) if title_field else None
                        if title is not None and not isinstance(title, str):
                            raise _Bad(f"field {title_field!r} must be a string, got {type(title).__name__}")
                        text = _text(f"{title} {body}".strip() if title else body, text_field)
                        raw_id = rec.get(id_field, rec.get("id"))
                        doc_id = _opt_id(raw_id, id_field) or str(lineno)
                    else:
                        raise _Bad(f"expected a JSON object or string, got {type(rec).__name__}")
                if check_duplicate_ids and doc_id in seen:
                    raise _Bad(f"duplicate id {doc_id!r}")
            except _Bad as err:
                _handle(err, where, skip_bad_records, stats)
                continue
            if check_duplicate_ids:
                seen.add(doc_id)
            yield doc_id, text


def load_corpus_texts(path: PathLike, **kwargs) -> List[str]:
    """The document texts of a corpus-only file (see :func:`load_corpus` for formats).

    Example::

        from contrastkit.data import data_dir, load_corpus_texts
        texts = load_corpus_texts(data_dir() / "scifact")      # 5,183 abstracts
    """
    return load_corpus(path, **kwargs)[1]
