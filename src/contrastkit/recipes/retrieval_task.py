"""A retrieval task in one shape, whatever the user's data looked like.

:func:`build_retrieval_task` turns the ``data`` section of the run config into a
:class:`RetrievalTask`: a corpus (ids and texts), queries, and qrels for train, dev and
test, plus the training examples. Every source ends up in this shape:

- a BEIR folder or bundled name (``scifact``): corpus, queries and qrels as given; the
  dev split is carved from the TRAIN queries (seeded, by query); the test qrels are
  only for the final before / after numbers.
- a pairs / triplets / n-tuples file: every distinct query text becomes a query, every
  distinct positive / negative text a corpus document; dev and a held-out test split are
  both carved from the file by query (the report says so: there is no separate test set).
- ``format: corpus``: unsupervised adaptation, training pairs are two independent random
  crops of the same document (Contriever). On a BEIR folder (or bundled name) dev and test
  come from its qrels as above; on a corpus alone (a ``corpus.jsonl[.gz]`` / JSON-lines /
  text file, or a folder holding only ``corpus.jsonl``) there is no dev or test evaluation
  (a note says so). A crop pair's ``query_id`` is ``"crop:<doc id>"`` (never a real query
  id, so it inherits no query's qrels) and its ``positive_id`` the document's id, so the
  duplicate mask drops other crops of the same document in a batch and random negatives
  never draw the source document.

With ``data.stream`` (files larger than memory) the training records are not held:
``task.train_examples`` is empty and ``task.train_stream()`` reads them again, lazily, each
time it is called (``task.train_count`` of them). A pairs file's dev and test are the queries
:func:`contrastkit.data.stream.hold_out` holds out in one bounded pass, with a sample of the
file's documents as the evaluation corpus; a ``data.train_file`` beside a BEIR folder keeps
the folder's splits; a corpus alone is cropped as each document is read.

With ``skip_bad_records`` every reader (pairs file; BEIR corpus, queries and qrels; corpus
file) counts and skips a malformed record instead of raising; a qrels line naming a query
or document that is not in the folder is malformed too (``file:line``). The count and the
first messages are in ``task.bad_records`` and in a note (``"skipped 2 bad records
(data.skip_bad_records):"`` then one ``file:line: why`` a line).

Example::

    from contrastkit.training.config import load_config
    from contrastkit.recipes.retrieval_task import build_retrieval_task
    task = build_retrieval_task(load_config().data, seed=0)
    print(len(task.corpus_ids), len(task.train_examples), len(task.dev_qrels), len(task.test_qrels))
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
import itertools
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from ..data import (BadRecords, Example, independent_crops, iter_corpus, load_beir, load_corpus, read_examples,
                    split_dev)
from ..data.readers import corpus_file
from ..data.stream import Reservoir, hold_out
from ..training.config import ConfigError, DataConfig

__all__ = ["RetrievalTask", "build_retrieval_task"]

Qrels = Dict[str, Dict[str, int]]


@dataclass
class RetrievalTask:
    """Corpus, queries and qrels of one retrieval problem (texts carry their prefixes)."""

    corpus_ids: List[str]
    corpus_texts: List[str]
    queries: Dict[str, str]
    train_examples: List[Example]
    train_qrels: Qrels
    dev_qrels: Qrels
    test_qrels: Qrels
    description: str
    test_is_held_out_from_train_file: bool = False
    bad_records: Optional[BadRecords] = None
    notes: List[str] = field(default_factory=list)
    unsupervised: bool = False  # format: corpus: the training queries are crops, not in ``queries``
    # data.stream: the training records are not held (``train_examples`` is empty); each call
    # of ``train_stream()`` reads them again, lazily, in file order; there are ``train_count``
    train_stream: Optional[Callable[[], Iterator[Example]]] = None
    train_count: int = 0
    train_min_negatives: Optional[int] = None  # the fewest negatives a streamed record brings (None: not counted)
    # data.train_file + data.stream: the (query id, document id) of streamed records whose
    # document is not a relevant one of the train qrels (mined for beside the qrels pairs)
    train_pairs_off_qrels: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def num_train_examples(self) -> int:
        return self.train_count if self.train_stream is not None else len(self.train_examples)

    def corpus_index(self) -> Dict[str, int]:
        return {d: j for j, d in enumerate(self.corpus_ids)}

    def known_positive_indices(self) -> Dict[str, List[int]]:
        """query id -> corpus indices of its relevant documents (train + dev qrels)."""
        index = self.corpus_index()
        out: Dict[str, List[int]] = {}
        for qrels in (self.train_qrels, self.dev_qrels):
            for qid, docs in qrels.items():
                out.setdefault(qid, []).extend(index[d] for d, s in docs.items() if s > 0 and d in index)
        return out


def is_beir_folder(source: str) -> bool:
    p = Path(source)
    if p.is_dir():
        return (p / "qrels").is_dir() or (p / "corpus.jsonl").exists() or (p / "corpus.jsonl.gz").exists()
    return "/" not in source and "." not in Path(source).name  # a bundled name such as "scifact"


def _load_beir(source: str, cfg: DataConfig, bad: BadRecords):
    p = Path(source)
    try:
        if p.is_dir():
            return load_beir(p, skip_bad_records=cfg.skip_bad_records, stats=bad)
        return load_beir(name=source, skip_bad_records=cfg.skip_bad_records, stats=bad)
    except FileNotFoundError as err:
        hint = "; for a corpus alone use data.format: corpus" if p.is_dir() and _has_corpus_file(p) else ""
        raise ConfigError(f"data.source: {source!r} is not a BEIR folder, a bundled dataset name or a file "
                          f"({err}){hint}") from None


def _has_corpus_file(folder: Path) -> bool:
    try:
        corpus_file(folder)
    except FileNotFoundError:
        return False
    return True


def _has_queries_and_qrels(folder: Path) -> bool:
    return ((folder / "queries.jsonl").is_file() or (folder / "queries.jsonl.gz").is_file()) \
        and (folder / "qrels").is_dir()


def _qrels(ds, split: str, key: str, cfg: DataConfig, bad: BadRecords) -> Qrels:
    """The relevant (score > 0) judgements of ``split``; every line checked (file:line)."""
    try:
        return ds.relevant_qrels(split, skip_bad_records=cfg.skip_bad_records, stats=bad)
    except FileNotFoundError as err:
        extra = " (null: no test split)" if key == "test_split" else ""
        raise ConfigError(f"data.{key}: {err}{extra}") from None


def _skipped_note(bad: BadRecords) -> str:
    """``"skipped 2 bad records (data.skip_bad_records):"`` then the first ``file:line: why``s."""
    s = "s" if bad.count != 1 else ""
    head = f"skipped {bad.count} bad record{s} (data.skip_bad_records)"
    if not bad.reasons:
        return head
    more = "" if bad.count <= len(bad.reasons) else f"\n  ... and {bad.count - len(bad.reasons)} more"
    return head + ":\n  " + "\n  ".join(bad.reasons) + more


def _crop_prefix(query_ids) -> str:
    """``"crop:"``, lengthened until no real query id starts with it."""
    prefix = "crop:"
    while any(str(q).startswith(prefix) for q in query_ids):
        prefix = "_" + prefix
    return prefix


CROP_MIN_WORDS = 2  # a document gives crops from this many words on (the streamed count uses it too)


def _crop_examples(cfg: DataConfig, doc_ids: Sequence[str], texts: Sequence[str], seed: Union[int, str],
                   prefix: str) -> List[Example]:
    """Two independent crops of each document; query id ``prefix + doc id``, positive id the doc id."""
    crops = independent_crops(list(texts), seed=seed, ids=list(doc_ids), min_words=CROP_MIN_WORDS)
    return [dataclasses.replace(ex, query=cfg.query_prefix + ex.query, positive=cfg.document_prefix + ex.positive,
                                query_id=prefix + ex.positive_id, source=f"crops of document {ex.positive_id!r}")
            for ex in crops]


def text_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def build_retrieval_task(cfg: DataConfig, *, seed: int = 0) -> RetrievalTask:
    """The task the ``data`` section describes (see the module doc)."""
    fmt = cfg.format
    if fmt == "auto":
        fmt = "beir" if is_beir_folder(cfg.source) else "pairs"
    if cfg.train_file and fmt != "beir":
        raise ConfigError(f"data.train_file: training records by the ids of a BEIR folder need data.source to be one "
                          f"(and data.format beir or auto), got source {cfg.source!r} with format {cfg.format!r}; "
                          "to train on the file alone, give it as data.source")
    if fmt == "corpus":
        p = Path(cfg.source)
        if p.is_file() or (p.is_dir() and _has_corpus_file(p) and not _has_queries_and_qrels(p)):
            return _from_corpus_stream(cfg, seed=seed) if cfg.stream else _from_corpus_file(cfg, seed=seed)
    if cfg.stream and fmt != "pairs" and not (fmt == "beir" and cfg.train_file):
        raise ConfigError(f"data.stream: reads a pairs / triplets / n-tuples file (data.source, or data.train_file "
                          f"beside a BEIR folder), or a corpus alone with format corpus, lazily; data.source "
                          f"{cfg.source!r} is read as a BEIR folder ({fmt}), whose qrels and corpus are held in memory "
                          "(set data.stream: false)")
    if fmt == "corpus":
        return _from_beir(cfg, seed=seed, unsupervised=True)
    if fmt == "beir":
        return _from_beir(cfg, seed=seed, unsupervised=False)
    if cfg.stream:
        return _from_pairs_stream(cfg, seed=seed)
    return _from_pairs_file(cfg, seed=seed)


def _split_queries(qids: Sequence[str], fraction: float, seed: int) -> tuple:
    train, dev = split_dev(sorted(qids), fraction=fraction, seed=seed)
    return list(train), list(dev)


def _from_beir(cfg: DataConfig, *, seed: int, unsupervised: bool) -> RetrievalTask:
    bad = BadRecords()
    ds = _load_beir(cfg.source, cfg, bad)
    corpus_ids = list(ds.corpus)
    corpus_texts = [cfg.document_prefix + ds.document(d) for d in corpus_ids]
    # unknown query / document ids are ValueErrors naming the qrels file:line (or, with
    # skip_bad_records, counted and skipped), every line checked, score 0 included
    train_all = _qrels(ds, cfg.train_split, "train_split", cfg, bad)
    test_qrels = _qrels(ds, cfg.test_split, "test_split", cfg, bad) if cfg.test_split else {}
    train_q, dev_q = _split_queries(list(train_all), cfg.dev_fraction, seed)
    overlap = set(train_q) & set(test_qrels)
    notes = []
    if overlap:
        notes.append(f"{len(overlap)} train queries also appear in the test qrels; they are dropped from training")
        train_q = [q for q in train_q if q not in overlap]
    queries = {q: cfg.query_prefix + ds.queries[q] for q in set(train_all) | set(test_qrels)}
    train_qrels = {q: train_all[q] for q in train_q}
    dev_qrels = {q: train_all[q] for q in dev_q}
    index = {d: j for j, d in enumerate(corpus_ids)}
    if unsupervised:
        texts = [ds.document(d) for d in corpus_ids]
        examples = _crop_examples(cfg, corpus_ids, texts, seed, _crop_prefix(ds.queries))
        description = f"{ds.folder.name}: {len(examples)} independent-crop pairs from {len(corpus_ids)} documents"
        notes.append("unsupervised: training pairs are independent crops of corpus documents (Contriever); "
                     "the train qrels give only the dev split")
    elif cfg.train_file and cfg.stream:
        # one pass checks every record (file:line) and counts them; training reads the file again
        train_set = set(train_q)
        stream_count, min_negatives = 0, None
        off_qrels: Set[Tuple[str, str]] = set()
        for ex in _file_examples(cfg, ds, index, corpus_texts, queries, train_set, bad):
            if cfg.max_train_examples is not None and stream_count == cfg.max_train_examples:
                continue  # checked (file:line), not trained on
            stream_count += 1
            min_negatives = len(ex.negatives) if min_negatives is None else min(min_negatives, len(ex.negatives))
            if train_all[ex.query_id].get(ex.positive_id, 0) <= 0:
                off_qrels.add((ex.query_id, ex.positive_id))
        if not stream_count:
            raise _no_file_record(cfg, ds)

        def train_stream() -> Iterator[Example]:
            return itertools.islice(_file_examples(cfg, ds, index, corpus_texts, queries, train_set, BadRecords()),
                                    stream_count)

        examples = []
        description = (f"{ds.folder.name}: {stream_count} training records of {Path(cfg.train_file).name} "
                       f"(streamed); dev {len(dev_q)} queries carved from train; test {len(test_qrels)} queries")
        notes.append(f"training records from {cfg.train_file} (data.train_file), read again each epoch through a "
                     f"shuffle buffer of {cfg.shuffle_buffer} (data.stream), texts from {ds.folder.name}; records of "
                     "dev or test queries are left out of training")
    elif cfg.train_file:
        examples = list(_file_examples(cfg, ds, index, corpus_texts, queries, set(train_q), bad))
        if not examples:
            raise _no_file_record(cfg, ds)
        description = (f"{ds.folder.name}: {len(examples)} training records of {Path(cfg.train_file).name} for "
                       f"{len({e.query_id for e in examples})} train queries; dev {len(dev_q)} queries carved from "
                       f"train; test {len(test_qrels)} queries")
        notes.append(f"training records from {cfg.train_file} (data.train_file), texts from {ds.folder.name}; records "
                     "of dev or test queries are left out of training")
    else:
        examples = [Example(query=queries[q], positive=corpus_texts[index[d]], query_id=q, positive_id=d,
                            source=f"{ds.qrels_path(cfg.train_split)}:{ds.qrel_lines[cfg.train_split][(q, d)]}")
                    for q in train_q for d in sorted(train_all[q])]
        description = (f"{ds.folder.name}: {len(examples)} (query, relevant document) pairs from {len(train_q)} train "
                       f"queries; dev {len(dev_q)} queries carved from train; test {len(test_qrels)} queries")
    if cfg.max_train_examples is not None:
        examples = examples[:cfg.max_train_examples]
    if bad.count:
        notes.append(_skipped_note(bad))
    task = RetrievalTask(corpus_ids, corpus_texts, queries, examples, train_qrels, dev_qrels, test_qrels,
                         description, bad_records=bad, notes=notes, unsupervised=unsupervised)
    if cfg.train_file and cfg.stream:
        task.train_stream, task.train_count, task.train_min_negatives = train_stream, stream_count, min_negatives
        task.train_pairs_off_qrels = sorted(off_qrels)
    return task


def _file_examples(cfg: DataConfig, ds, index: Dict[str, int], corpus_texts: Sequence[str],
                   queries: Dict[str, str], train_q: set, bad: BadRecords) -> Iterator[Example]:
    """The records of ``data.train_file`` as training examples of the BEIR task, lazily: each
    names the folder's query and documents by id (texts taken from the folder, prefixes
    applied); an unknown id is a bad record (file:line); records of queries outside
    ``train_q`` (dev, test) are left out."""
    path = Path(cfg.train_file)
    if not path.is_file():
        raise ConfigError(f"data.train_file: {cfg.train_file!r} is not a file")
    for ex in read_examples(path, query_column=cfg.query_column, positive_column=cfg.positive_column,
                            negative_columns=cfg.negative_columns, skip_bad_records=cfg.skip_bad_records, stats=bad):
        problem = None
        if ex.query_id is None or ex.positive_id is None or len(ex.negative_ids) != len(ex.negatives):
            problem = ("needs query_id and positive_id (and negative_ids for its negatives) naming the folder's "
                       "queries and documents, as `contrastkit mine` writes them")
        elif ex.query_id not in ds.queries:
            problem = f"query_id {ex.query_id!r} is not in {ds.folder.name}'s queries"
        else:
            unknown = [d for d in (ex.positive_id, *ex.negative_ids) if d not in index]
            if unknown:
                problem = f"document id {unknown[0]!r} is not in {ds.folder.name}'s corpus"
        if problem is not None:
            if not cfg.skip_bad_records:
                raise ValueError(f"{ex.source}: {problem}")
            bad.add(f"{ex.source}: {problem}")
            continue
        if ex.query_id not in train_q:
            continue
        yield dataclasses.replace(
            ex, query=queries[ex.query_id],   # a train query: prefixed in ``queries``
            positive=corpus_texts[index[ex.positive_id]],
            negatives=tuple(corpus_texts[index[d]] for d in ex.negative_ids))


def _no_file_record(cfg: DataConfig, ds) -> ValueError:
    return ValueError(f"{cfg.train_file}: no record for a train query of {ds.folder.name} (dev and test queries are "
                      "left out)")


def _from_corpus_file(cfg: DataConfig, *, seed: int) -> RetrievalTask:
    """``format: corpus`` on a corpus alone: crops to train on, nothing to evaluate on."""
    path = Path(cfg.source)
    bad = BadRecords()
    doc_ids, texts = load_corpus(path, skip_bad_records=cfg.skip_bad_records, stats=bad)
    where = corpus_file(path)
    if not doc_ids:
        raise ValueError(f"{where}: no usable document")
    examples = _crop_examples(cfg, doc_ids, texts, seed, "crop:")
    if not examples:
        raise ValueError(f"{where}: no document has the 2 words two crops need")
    if cfg.max_train_examples is not None:
        examples = examples[:cfg.max_train_examples]
    corpus_texts = [cfg.document_prefix + t for t in texts]
    task = RetrievalTask(list(doc_ids), corpus_texts, {}, examples, {}, {}, {},
                         f"{where.name}: {len(examples)} independent-crop pairs from {len(doc_ids)} documents; "
                         "no qrels, so no dev or test evaluation", bad_records=bad, unsupervised=True)
    task.notes.append("unsupervised: training pairs are independent crops of corpus documents (Contriever)")
    task.notes.append("a corpus alone has no qrels: no dev evaluation (no checkpoint selection, no WiSE-FT "
                      "interpolation) and no before / after test numbers; the model of the last step is saved")
    if bad.count:
        task.notes.append(_skipped_note(bad))
    return task


def _pairs_path(cfg: DataConfig) -> Path:
    path = Path(cfg.source)
    if not path.is_file():
        raise ConfigError(f"data.source: {cfg.source!r} is not a file, a BEIR folder or a bundled dataset name")
    return path


def _read_pairs(cfg: DataConfig, path: Path, bad: BadRecords) -> Iterator[Example]:
    return read_examples(path, query_column=cfg.query_column, positive_column=cfg.positive_column,
                         negative_columns=cfg.negative_columns, skip_bad_records=cfg.skip_bad_records, stats=bad)


def _with_ids(cfg: DataConfig, ex: Example) -> Example:
    """The record with every id set (a hash of the text where the file gives none) and the prefixes applied."""
    nids = [ex.negative_ids[j] if j < len(ex.negative_ids) and ex.negative_ids[j] else text_id("d", neg)
            for j, neg in enumerate(ex.negatives)]
    return dataclasses.replace(ex, query=cfg.query_prefix + ex.query, positive=cfg.document_prefix + ex.positive,
                               negatives=tuple(cfg.document_prefix + n for n in ex.negatives),
                               query_id=ex.query_id or text_id("q", ex.query),
                               positive_id=ex.positive_id or text_id("d", ex.positive), negative_ids=tuple(nids))


def _from_corpus_stream(cfg: DataConfig, *, seed: int) -> RetrievalTask:
    """``format: corpus`` with ``data.stream`` on a corpus alone: one pass counts the documents
    that give crops and samples ``data.stream_distractors`` of them (random negatives); each
    call of ``task.train_stream()`` reads the corpus again and crops each document as it comes
    (seeded by the seed and the document's id, so every pass gives the same crops)."""
    path = Path(cfg.source)
    where = corpus_file(path)
    bad = BadRecords()

    def documents(stats: BadRecords):
        # no duplicate-id check: its set of every id would grow with the file
        return iter_corpus(path, skip_bad_records=cfg.skip_bad_records, stats=stats, check_duplicate_ids=False)

    sample = Reservoir(cfg.stream_distractors, seed)
    croppable = 0
    for doc_id, text in documents(bad):
        sample.offer(doc_id, cfg.document_prefix + text)
        croppable += len(text.split()) >= CROP_MIN_WORDS
    if not croppable:
        raise ValueError(f"{where}: no document has the {CROP_MIN_WORDS} words two crops need")
    count = croppable if cfg.max_train_examples is None else min(croppable, cfg.max_train_examples)

    def train_stream() -> Iterator[Example]:
        crops = (ex for doc_id, text in documents(BadRecords())
                 for ex in _crop_examples(cfg, [doc_id], [text], f"{seed}:{doc_id}", "crop:"))
        return itertools.islice(crops, count)

    ids = list(sample.items)
    task = RetrievalTask(ids, [sample.items[d] for d in ids], {}, [], {}, {}, {},
                         f"{where.name} (streamed): {count} independent-crop pairs, one per document; no qrels, so "
                         "no dev or test evaluation", bad_records=bad, unsupervised=True, train_stream=train_stream,
                         train_count=count)
    task.notes.append("unsupervised: training pairs are independent crops of corpus documents (Contriever), cut as "
                      "each document is read (data.stream); duplicate document ids are not checked")
    task.notes.append("a corpus alone has no qrels: no dev evaluation (no checkpoint selection, no WiSE-FT "
                      "interpolation) and no before / after test numbers; the model of the last step is saved")
    if bad.count:
        task.notes.append(_skipped_note(bad))
    return task


def _from_pairs_stream(cfg: DataConfig, *, seed: int) -> RetrievalTask:
    """``data.stream``: one bounded pass holds out dev and test queries and samples distractor
    documents (:func:`contrastkit.data.stream.hold_out`); the training records are read again,
    lazily, each time ``task.train_stream()`` is called."""
    path = _pairs_path(cfg)
    bad = BadRecords()
    split = hold_out(lambda: (_with_ids(cfg, e) for e in _read_pairs(cfg, path, bad)), seed=seed,
                     num_dev=cfg.stream_eval_queries, num_test=cfg.stream_eval_queries, fraction=cfg.dev_fraction,
                     num_distractors=cfg.stream_distractors, document_id=lambda text: text_id("d", text))
    if not split.records:
        raise ValueError(f"{path}: no usable record")
    count = split.train_records if cfg.max_train_examples is None else min(split.train_records,
                                                                           cfg.max_train_examples)
    if not count:
        raise ValueError(f"{path}: no record is left for training after holding out {len(split.test_keys)} test and "
                         f"{len(split.dev_keys)} dev queries (data.stream_eval_queries, data.dev_fraction)")

    def train_stream() -> Iterator[Example]:
        # bad records were counted (or raised) by the first pass; later passes skip them silently
        records = (e for e in (_with_ids(cfg, x) for x in _read_pairs(cfg, path, BadRecords()))
                   if not split.is_held_out(e))
        return itertools.islice(records, count)

    corpus: Dict[str, str] = {}
    queries: Dict[str, str] = {}
    qrels: Dict[str, Qrels] = {"test": {}, "dev": {}}
    for name, records in (("test", split.test), ("dev", split.dev)):
        for ex in records:
            queries[ex.query_id] = ex.query
            qrels[name].setdefault(ex.query_id, {})[ex.positive_id] = 1
            corpus.setdefault(ex.positive_id, ex.positive)
            for d, t in zip(ex.negative_ids, ex.negatives):
                corpus.setdefault(d, t)
    held_docs = len(corpus)
    for d, t in split.distractors.items():
        corpus.setdefault(d, t)
    corpus_ids = list(corpus)
    task = RetrievalTask(corpus_ids, [corpus[d] for d in corpus_ids], queries, [], {}, qrels["dev"], qrels["test"],
                         f"{path.name} (streamed): {count} training records of {split.records}; dev "
                         f"{len(qrels['dev'])} and held-out test {len(qrels['test'])} queries carved from the same "
                         f"file by a seeded hash of the query",
                         test_is_held_out_from_train_file=True, bad_records=bad, train_stream=train_stream,
                         train_count=count, train_min_negatives=split.train_min_negatives)
    task.notes.append(f"data.stream: the training records are read again each epoch through a shuffle buffer of "
                      f"{cfg.shuffle_buffer}; the dev / test corpus is the held-out queries' {held_docs} documents and "
                      f"{len(corpus_ids) - held_docs} documents sampled from the file (data.stream_distractors)")
    task.notes.extend(split.notes)
    if bad.count:
        task.notes.append(_skipped_note(bad))
    return task


def physical_memory_bytes() -> Optional[int]:
    """This machine's memory (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _refuse_file_larger_than_memory(path: Path) -> None:
    """The in-memory reader holds every record's text several times over (records, corpus,
    queries) and then their embeddings: a file over a quarter of the machine's memory
    (a ``.gz`` counted at 4x its size) is refused with the streamed reader as the way out."""
    gz = path.suffix.lower() == ".gz"
    size = path.stat().st_size * (4 if gz else 1)
    memory = physical_memory_bytes()
    if memory and size > memory / 4:
        raise ConfigError(f"data.stream: {path} ({size / 2**30:.1f} GB{' uncompressed, estimated' if gz else ''}) "
                          f"is more than a quarter of this machine's {memory / 2**30:.1f} GB of memory, too large to "
                          "hold; set data.stream: true to read it lazily")


def _from_pairs_file(cfg: DataConfig, *, seed: int) -> RetrievalTask:
    path = _pairs_path(cfg)
    _refuse_file_larger_than_memory(path)
    bad = BadRecords()
    rows = list(_read_pairs(cfg, path, bad))
    if not rows:
        raise ValueError(f"{path}: no usable record")
    corpus: Dict[str, str] = {}
    queries: Dict[str, str] = {}
    qrels: Qrels = {}
    examples: List[Example] = []
    for raw in rows:
        ex = _with_ids(cfg, raw)
        queries[ex.query_id] = ex.query
        for d, t in zip((ex.positive_id, *ex.negative_ids), (ex.positive, *ex.negatives)):
            corpus.setdefault(d, t)   # an id's first text is its text
        qrels.setdefault(ex.query_id, {})[ex.positive_id] = 1
        examples.append(dataclasses.replace(ex, positive=corpus[ex.positive_id],
                                            negatives=tuple(corpus[n] for n in ex.negative_ids)))
    # dev and a held-out "test" share of the queries, both carved from the file
    rest, test_q = _split_queries(list(qrels), cfg.dev_fraction, seed + 1)
    train_q, dev_q = _split_queries(rest, cfg.dev_fraction / max(1e-9, 1 - cfg.dev_fraction), seed)
    train_set = set(train_q)
    examples = [ex for ex in examples if ex.query_id in train_set]
    if cfg.max_train_examples is not None:
        examples = examples[:cfg.max_train_examples]
    corpus_ids = list(corpus)
    task = RetrievalTask(corpus_ids, [corpus[d] for d in corpus_ids], queries, examples,
                         {q: qrels[q] for q in train_q}, {q: qrels[q] for q in dev_q}, {q: qrels[q] for q in test_q},
                         f"{path.name}: {len(examples)} training examples from {len(train_q)} queries; dev "
                         f"{len(dev_q)} and held-out test {len(test_q)} queries carved from the same file",
                         test_is_held_out_from_train_file=True, bad_records=bad)
    task.notes.append("the test split is a held-out share of the training file (no separate test set was given); "
                      "its corpus is every document text in the file")
    if bad.count:
        task.notes.append(_skipped_note(bad))
    return task
