"""Retrieval metrics with BEIR's definitions, and whole-corpus retrieval evaluation.

Metrics (for one query with graded judgements ``rel(d)``; a document is relevant when
``rel(d) > 0``, and ``R`` is the set of relevant documents; ranks ``i = 1..k``):

- ``ndcg@k = DCG@k / IDCG@k`` with ``DCG@k = sum_i rel(d_i) / log2(i + 1)`` (linear gain,
  as trec_eval / pytrec_eval, which BEIR uses) and ``IDCG@k`` the DCG of the judged
  documents sorted by relevance (all of them, not only the retrieved ones), cut at ``k``.
  Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR techniques", TOIS 2002.
- ``recall@k = |R ∩ top-k| / |R|``.
- ``precision@k = |R ∩ top-k| / k`` (divided by ``k`` even when fewer were retrieved).
- ``mrr@k = 1 / rank`` of the first relevant document in the top ``k`` (0 if none), as
  BEIR's ``mrr`` custom metric.
- ``map@k = (1 / |R|) sum_{i <= k, d_i in R} precision@i`` (trec_eval's ``map_cut``: the sum is
  divided by all relevant documents, not ``min(k, |R|)`` as sentence-transformers does).
- ``accuracy@k = 1`` when some relevant document is in the top ``k`` (sentence-transformers'
  accuracy / success@k).

Queries with no relevant document are skipped, as sentence-transformers does (pytrec_eval, and
so BEIR's averages, would count a query judged only non-relevant as 0; BEIR datasets such as
SciFact have none); means are over the remaining queries. Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot
Evaluation of Information Retrieval Models", NeurIPS Datasets and Benchmarks 2021, arXiv:2104.08663.

Example::

    from contrastkit.evaluation import retrieval_metrics
    ranking = {"q1": [("d3", 0.9), ("d1", 0.8), ("d2", 0.1)]}
    qrels = {"q1": {"d1": 1, "d2": 2}}
    s = retrieval_metrics(ranking, qrels, ks=(1, 3))
    assert s.mean["mrr@3"] == 0.5           # first relevant document at rank 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["RetrievalScores", "retrieval_metrics", "evaluate_retrieval", "METRICS"]

METRICS = ("ndcg", "mrr", "recall", "map", "precision", "accuracy")

Qrels = Mapping[str, Mapping[str, int]]


@dataclass
class RetrievalScores:
    """Metric values: ``mean["ndcg@10"]`` etc. and ``per_query["ndcg@10"]`` (a float64 numpy
    array aligned with ``query_ids``, for a paired bootstrap between two systems).

    ``missing`` lists the judged queries the ranking had no entry for (scored as an empty
    ranking: 0 on every metric). ``str(scores)`` is a small table.
    """

    mean: Dict[str, float]
    per_query: Dict[str, np.ndarray]
    query_ids: List[str]
    ks: Tuple[int, ...]
    missing: List[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> float:
        return self.mean[key]

    def __len__(self) -> int:
        return len(self.query_ids)

    def to_dict(self) -> Dict[str, float]:
        """The means as a plain dict (JSON-ready), plus ``n_queries``."""
        out: Dict[str, float] = {k: float(v) for k, v in self.mean.items()}
        out["n_queries"] = len(self.query_ids)
        return out

    def table(self, metrics: Sequence[str] = ("ndcg", "mrr", "recall", "map", "precision")) -> str:
        """A plain-text table: one row per metric, one column per k."""
        head = "metric".ljust(10) + "".join(f"@{k}".rjust(9) for k in self.ks)
        rows = [head]
        for m in metrics:
            rows.append(m.ljust(10) + "".join(f"{self.mean[f'{m}@{k}']:9.4f}" for k in self.ks))
        return "\n".join(rows) + f"\n({len(self.query_ids)} queries)"

    def __str__(self) -> str:
        return self.table()


def _check_ks(ks: Sequence[int]) -> Tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    return tuple(sorted(set(ks)))


def _ranked_ids(qid: str, entry) -> List[str]:
    """One query's ranking as a list of doc ids, best first (stable sort by score)."""
    if isinstance(entry, Mapping):  # BEIR results: {doc_id: score}
        items = list(entry.items())
    else:
        items = list(entry)
    if items and all(isinstance(x, str) for x in items):
        return items  # already ranked ids
    pairs = []
    for pos, x in enumerate(items):
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise ValueError(f"ranking[{qid!r}][{pos}] must be a (doc_id, score) pair, got {x!r}")
        did, score = x
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"ranking[{qid!r}][{pos}]: score {score!r} is not a number") from None
        if math.isnan(score):
            raise ValueError(f"ranking[{qid!r}][{pos}]: score is nan")
        pairs.append((str(did), score))
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][1])  # stable: ties keep given order
    return [pairs[i][0] for i in order]


def _ranking_lists(ranking, query_ids: Optional[Sequence], corpus_ids: Optional[Sequence]) -> Tuple[Dict[str, List[str]], Optional[int]]:
    """Normalise the accepted ranking forms to ``{qid: [doc ids best first]}`` (and the
    depth of a tensor ranking, where every query has the same number of columns)."""
    if isinstance(ranking, tuple) and len(ranking) == 2 and all(isinstance(t, (Tensor, np.ndarray)) for t in ranking):
        ranking = ranking[1]  # (scores, indices) from search.topk
    if isinstance(ranking, (Tensor, np.ndarray)):
        if query_ids is None or corpus_ids is None:
            raise ValueError("a tensor ranking needs query_ids= (one per row) and corpus_ids= (index -> doc id)")
        idx = torch.as_tensor(ranking)
        if idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"a tensor ranking must be (Q, k) integer corpus indices, got {idx.dtype} "
                             f"of shape {tuple(idx.shape)}")
        if idx.shape[0] != len(query_ids):
            raise ValueError(f"ranking has {idx.shape[0]} rows but query_ids has {len(query_ids)}")
        n_c = len(corpus_ids)
        if idx.numel() and (int(idx.max()) >= n_c or int(idx.min()) < -1):
            raise ValueError(f"ranking indices must be in [-1, {n_c}) (corpus_ids has {n_c} ids)")
        cids = [str(c) for c in corpus_ids]
        lists = {str(q): [cids[j] for j in row if j >= 0] for q, row in zip(query_ids, idx.tolist())}
        return lists, int(idx.shape[1])
    if not isinstance(ranking, Mapping):
        raise ValueError("ranking must be {query_id: [(doc_id, score), ...]}, {query_id: {doc_id: score}}, "
                         f"or a (Q, k) index tensor with query_ids and corpus_ids; got {type(ranking).__name__}")
    return {str(q): _ranked_ids(str(q), v) for q, v in ranking.items()}, None


def _relevance(qid, doc_id, r) -> float:
    try:
        return float(r)
    except (TypeError, ValueError):
        raise ValueError(f"qrels[{qid!r}][{doc_id!r}]: relevance {r!r} is not a number") from None


def retrieval_metrics(ranking, qrels: Qrels, ks: Sequence[int] = (1, 10, 100), *,
                      query_ids: Optional[Sequence] = None, corpus_ids: Optional[Sequence] = None,
                      require_depth: bool = True) -> RetrievalScores:
    """nDCG@k, MRR@k, Recall@k, MAP@k, Precision@k and Accuracy@k of a ranking (BEIR's definitions,
    see the module docstring), averaged over the judged queries that have a relevant document.

    Args:
        ranking: one of
            - ``{query_id: [(doc_id, score), ...]}`` (any order; sorted by decreasing score,
              equal scores keep the given order; trec_eval would order them by doc id descending),
            - ``{query_id: {doc_id: score}}`` (BEIR's results format), or
            - ``{query_id: [doc_id, ...]}`` already ranked, or
            - a ``(Q, k)`` long tensor / array of corpus indices (or the ``(scores, indices)``
              pair returned by :func:`contrastkit.search.topk`) with ``query_ids`` (one per row)
              and ``corpus_ids`` (index -> doc id); ``-1`` marks an empty slot.
        qrels: ``{query_id: {doc_id: relevance}}``; relevance <= 0 means not relevant; nDCG uses
            the relevance as the gain.
        ks: cut-offs (positive ints).
        require_depth: raise when a ranking is shorter than ``max(ks)`` (a top-10 ranking cannot
            give recall@100). Pass False when the corpus itself has fewer documents.

    Returns:
        :class:`RetrievalScores`, ``query_ids`` in qrels order. A judged query absent from the
        ranking counts as an empty ranking (0) and is listed in ``.missing``.

    Raises:
        ValueError: a malformed ranking (duplicate document in one query's list, bad score),
        bad ``ks``, or a ranking shallower than ``max(ks)`` with ``require_depth``.

    Example::

        >>> from contrastkit.evaluation import retrieval_metrics
        >>> s = retrieval_metrics({"q": [("a", 2.0), ("b", 1.0)]}, {"q": {"b": 1}}, ks=(1, 2),
        ...                       require_depth=False)
        >>> round(s.mean["ndcg@2"], 4), s.mean["recall@1"], s.mean["mrr@2"]
        (0.6309, 0.0, 0.5)
    """
    ks = _check_ks(ks)
    kmax = ks[-1]
    if not isinstance(qrels, Mapping):
        raise ValueError(f"qrels must be {{query_id: {{doc_id: relevance}}}}, got {type(qrels).__name__}")
    lists, depth = _ranking_lists(ranking, query_ids, corpus_ids)
    judged: List[str] = []
    rels: List[Dict[str, float]] = []
    for qid, docs in qrels.items():
        if not isinstance(docs, Mapping):
            raise ValueError(f"qrels[{qid!r}] must be {{doc_id: relevance}}, got {type(docs).__name__}")
        pos = {str(d): _relevance(qid, d, r) for d, r in docs.items()}
        pos = {d: r for d, r in pos.items() if r > 0}
        if pos:
            judged.append(str(qid))
            rels.append(pos)
    missing = [q for q in judged if q not in lists]
    n = len(judged)
    gains = np.zeros((n, kmax), dtype=np.float64)
    ideal = np.zeros((n, kmax), dtype=np.float64)
    n_rel = np.zeros(n, dtype=np.float64)
    for row, (qid, pos) in enumerate(zip(judged, rels)):
        ranked = lists.get(qid, [])
        if len(set(ranked)) != len(ranked):
            seen = set()
            dup = next(d for d in ranked if d in seen or seen.add(d))
            raise ValueError(f"ranking for query {qid!r} lists document {dup!r} more than once")
        if require_depth and qid in lists and len(ranked) < kmax and (depth is None or depth < kmax):
            raise ValueError(f"ranking for query {qid!r} has {len(ranked)} documents, fewer than max(ks) = "
                             f"{kmax}; rank deeper, lower ks, or pass require_depth=False if the corpus is "
                             "that small")
        top = ranked[:kmax]
        gains[row, :len(top)] = [pos.get(d, 0.0) for d in top]
        best = sorted(pos.values(), reverse=True)[:kmax]
        ideal[row, :len(best)] = best
        n_rel[row] = len(pos)
    hit = gains > 0
    discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))
    dcg = np.cumsum(gains * discount, axis=1)
    idcg = np.cumsum(ideal * discount, axis=1)
    hits = np.cumsum(hit, axis=1).astype(np.float64)
    prec_at_i = hits / np.arange(1, kmax + 1)
    ap_sum = np.cumsum(np.where(hit, prec_at_i, 0.0), axis=1)
    first = np.where(hit.any(1), hit.argmax(1), kmax)  # 0-based rank of the first relevant hit
    per_query: Dict[str, np.ndarray] = {}
    for k in ks:
        c = k - 1
        per_query[f"ndcg@{k}"] = dcg[:, c] / idcg[:, c] if n else np.zeros(0)
        per_query[f"mrr@{k}"] = np.where(first < k, 1.0 / (first + 1.0), 0.0)
        per_query[f"recall@{k}"] = hits[:, c] / n_rel if n else np.zeros(0)
        per_query[f"map@{k}"] = ap_sum[:, c] / n_rel if n else np.zeros(0)
        per_query[f"precision@{k}"] = hits[:, c] / k
        per_query[f"accuracy@{k}"] = (hits[:, c] > 0).astype(np.float64)
    order = [f"{m}@{k}" for m in METRICS for k in ks]
    per_query = {key: per_query[key] for key in order}
    mean = {key: (float(v.mean()) if n else float("nan")) for key, v in per_query.items()}
    return RetrievalScores(mean=mean, per_query=per_query, query_ids=judged, ks=ks, missing=missing)


def _doc_text(doc) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, (tuple, list)) and len(doc) == 2:  # (title, text) as in BeirDataset.corpus
        title, text = doc
        return f"{title} {text}".strip() if title else str(text).strip()
    if isinstance(doc, Mapping) and "text" in doc:  # {"title": ..., "text": ...}
        title = doc.get("title") or ""
        return f"{title} {doc['text']}".strip() if title else str(doc["text"]).strip()
    raise ValueError(f"a corpus document must be a str, a (title, text) pair or a {{'title', 'text'}} dict, "
                     f"got {type(doc).__name__}")


def _check_embeddings(emb, n: int, what: str) -> Tensor:
    if not isinstance(emb, Tensor) or emb.dim() != 2:
        raise ValueError(f"{what} must be a (N, d) tensor, got {type(emb).__name__} "
                         f"{tuple(getattr(emb, 'shape', ()))}")
    if emb.shape[0] != n:
        raise ValueError(f"{what} has {emb.shape[0]} rows, expected {n}")
    return emb


@torch.no_grad()
def evaluate_retrieval(encode_queries: Callable[[List[str]], Tensor],
                       encode_corpus: Optional[Callable[[List[str]], Tensor]],
                       queries: Mapping[str, str], corpus: Mapping[str, object], qrels: Qrels, *,
                       ks: Sequence[int] = (1, 10, 100), corpus_embeddings: Optional[Tensor] = None,
                       corpus_ids: Optional[Sequence[str]] = None, method: str = "auto",
                       ignore_identical_ids: bool = False, progress: bool = False,
                       return_ranking: bool = False, **search_kwargs):
    """Encode the judged queries, rank the whole corpus by inner product, and score the ranking.

    The encoders return one embedding row per input text, **L2-normalised** (then the inner
    product is the cosine similarity, which is what every bundled model is trained for; e.g.
    ``TextEncoder(..., normalize=True).encode``). Only queries with a relevant document in
    ``qrels`` are encoded. The corpus is encoded by ``encode_corpus`` unless
    ``corpus_embeddings`` are given (then ``encode_corpus`` may be None): a training loop
    encodes the corpus once and reuses it for mining and evaluation. Search is
    :func:`contrastkit.search.topk` with ``method`` (``"auto"``: exact, or faiss IVF from a
    ``faiss_threshold`` given in ``search_kwargs``) and ``k = min(max(ks), corpus size)``.

    Args:
        queries: ``{query_id: text}``.
        corpus: ``{doc_id: text}``; a value may also be ``(title, text)`` (as in
            :class:`contrastkit.data.BeirDataset`) or ``{"title", "text"}``, joined as BEIR does.
        qrels: ``{query_id: {doc_id: relevance}}``.
        corpus_embeddings: ``(C, d)`` precomputed corpus embeddings, row ``j`` for ``corpus_ids[j]``.
        corpus_ids: the row order of ``corpus_embeddings`` (default: ``list(corpus)``).
        ignore_identical_ids: drop a document whose id equals the query id (BEIR's
            ``ignore_identical_ids`` for datasets such as ArguAna / Quora).
        return_ranking: also return ``(scores, indices, query_ids, corpus_ids)``.
        search_kwargs: passed to :func:`contrastkit.search.topk` (``block_size``, ``nprobe``, ...).

    Returns:
        :class:`RetrievalScores` (and the ranking when ``return_ranking``).

    Raises:
        ValueError: a judged query missing from ``queries``, a relevant document missing from
        the corpus, embeddings of the wrong shape.

    Example::

        import torch, contrastkit as ck
        vocab = {}
        def encode(texts):   # a toy bag-of-words encoder, L2-normalised
            out = torch.zeros(len(texts), 64)
            for i, t in enumerate(texts):
                for w in t.lower().split():
                    out[i, vocab.setdefault(w, len(vocab)) % 64] += 1
            return torch.nn.functional.normalize(out, dim=-1)
        s = ck.evaluation.evaluate_retrieval(encode, encode, {"q": "red apple"},
                                             {"a": "a red apple", "b": "blue sky"}, {"q": {"a": 1}}, ks=(1,))
        s.mean["ndcg@1"]     # 1.0
    """
    from ..search import topk

    ks = _check_ks(ks)
    ids = [str(c) for c in (corpus_ids if corpus_ids is not None else list(corpus.keys()))]
    if corpus_ids is not None and len(set(ids)) != len(ids):
        raise ValueError("corpus_ids has duplicate ids")
    id_set = set(ids)
    if not isinstance(qrels, Mapping) or not all(isinstance(v, Mapping) for v in qrels.values()):
        raise ValueError("qrels must be {query_id: {doc_id: relevance}}")
    # ids compare as strings everywhere (BEIR ids are strings; int keys are accepted)
    qrels = {str(q): {str(d): r for d, r in docs.items()} for q, docs in qrels.items()}
    queries = {str(q): t for q, t in queries.items()}
    judged = [str(q) for q, docs in qrels.items() if any(_relevance(q, d, r) > 0 for d, r in docs.items())]
    if not judged:
        raise ValueError("qrels have no query with a relevant document (relevance > 0)")
    for qid in judged:
        if qid not in queries:
            raise ValueError(f"qrels name query {qid!r}, which is not in the queries")
        for did, r in qrels[qid].items():
            if _relevance(qid, did, r) > 0 and str(did) not in id_set:
                raise ValueError(f"qrels for query {qid!r} name document {did!r}, which is not in the corpus")
    if corpus_embeddings is None:
        if encode_corpus is None:
            raise ValueError("pass encode_corpus or corpus_embeddings")
        corpus = {str(d): doc for d, doc in corpus.items()}
        missing = [d for d in ids if d not in corpus]
        if missing:
            raise ValueError(f"corpus_ids names document {missing[0]!r}, which is not in the corpus")
        corpus_embeddings = encode_corpus([_doc_text(corpus[d]) for d in ids])
    c_emb = _check_embeddings(corpus_embeddings, len(ids), "corpus embeddings")
    q_emb = _check_embeddings(encode_queries([queries[q] for q in judged]), len(judged), "query embeddings")
    exclude = None
    if ignore_identical_ids:
        pos = {d: j for j, d in enumerate(ids)}
        exclude = [[pos[q]] if q in pos else [] for q in judged]
    k = min(max(ks), len(ids))
    scores, idx = topk(q_emb, c_emb, k, method=method, exclude=exclude, progress=progress, **search_kwargs)
    result = retrieval_metrics(idx.cpu(), {q: qrels[q] for q in judged}, ks, query_ids=judged, corpus_ids=ids,
                               require_depth=False)
    if return_ranking:
        return result, (scores, idx, judged, ids)
    return result
