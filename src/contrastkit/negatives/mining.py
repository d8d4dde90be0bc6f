"""Hard-negative mining from a corpus, with a rank window and false-negative filters.

For every query (one row per (query, positive) pair) the corpus is ranked by inner
product with the query (:func:`contrastkit.search.topk`: exact and memory-bounded on
the tiled search for small corpora, faiss above a size threshold); the query's known
positives are removed from the ranking; the candidates at ranks ``start .. stop - 1``
of what remains form the window; candidates the filters flag as likely false
negatives are dropped; ``num_negatives`` are taken from the survivors, the top ones
or a seeded random draw.

Filters (both optional, both applied when both are given), with ``s+`` the score of
the row's own positive and ``s`` a candidate's score:

- relative margin (NV-Retriever's "TopK-PercPos", Moreira et al., "NV-Retriever:
  Improving text embedding models with effective hard-negative mining",
  arXiv:2407.15831, 2024): drop when ``s > relative_margin * s+`` (0.95 in the paper),
  written ``s > s+ - (1 - relative_margin) * |s+|`` so that it stays below the positive
  when ``s+ < 0``;
- absolute margin ("TopK-MarginPos"): drop when ``s > s+ - absolute_margin``.

Scores are inner products: pass L2-normalised embeddings for cosine similarity.

Compared with sentence-transformers' ``mine_hard_negatives``: our
``relative_margin=0.95`` is its ``relative_margin=0.05`` (the same threshold
``s+ - 0.05 |s+|``); its margins refer to the lowest-scoring positive of the query and its
``range_min`` skips candidates after filtering, while ours refer to the row's own
positive and the rank window is cut from the ranking before filtering (so ``start``
always skips the same closest documents). With ``start = 0``, one positive per query and
a window long enough, both pick the same negatives (tested).

Example::

    import torch
    from contrastkit.negatives import mine_hard_negatives
    c = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    q = torch.nn.functional.normalize(c[:4] + 0.3 * torch.randn(4, 8), dim=1)   # query i is near document i
    mined = mine_hard_negatives(q, c, [[0], [1], [2], [3]], num_negatives=2, rank_window=(0, 10))
    print(mined.summary())
    assert all(len(ix) == 2 and i not in ix for i, ix in enumerate(mined.indices))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["MinedNegatives", "mine_hard_negatives", "known_positives"]

SAMPLINGS = ("top", "random")
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _describe(values: Sequence[float]) -> Dict[str, float]:
    if len(values) == 0:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    out = {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}
    for q in _QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(a, q))
    out["max"] = float(a.max())
    return out


@dataclass
class MinedNegatives:
    """The result of :func:`mine_hard_negatives`.

    Attributes:
        indices: per query, the corpus indices of its mined negatives in rank order
            (hardest first); shorter than ``num_negatives`` where the window ran out.
        scores: the matching query-negative scores.
        positive_scores: per query, the score of its own positive (``positives[i][0]``).
        stats: ``queries``, ``num_negatives``, ``positive_score`` / ``negative_score``
            (count, mean, std, min, q05, q25, q50, q75, q95, max), ``gap`` (per query,
            positive score minus its mean negative score), ``candidates`` (window
            candidates seen), ``filtered`` (dropped by a margin), ``filtered_fraction``,
            ``short_queries`` (queries with fewer than ``num_negatives``),
            ``no_negative_queries``, ``rank_window``, ``relative_margin``,
            ``absolute_margin``, ``sampling``, ``method``.
    """

    indices: List[List[int]]
    scores: List[List[float]]
    positive_scores: List[float]
    stats: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines of text: the score statistics and the filter / shortage counts."""
        s = self.stats

        def line(name: str, d: Dict[str, float]) -> str:
            if not d.get("count"):
                return f"{name}: none"
            return (f"{name}: mean {d['mean']:.4f}  q05 {d['q05']:.4f}  q25 {d['q25']:.4f}  median {d['q50']:.4f}  "
                    f"q75 {d['q75']:.4f}  q95 {d['q95']:.4f}  (n={d['count']})")

        parts = [
            f"mined {s['negatives']} negatives for {s['queries']} queries (num_negatives={s['num_negatives']}, "
            f"rank window {tuple(s['rank_window'])}, sampling {s['sampling']}, search {s['method']})",
            line("positive score", s["positive_score"]),
            line("negative score", s["negative_score"]),
            line("positive - mean negative", s["gap"]),
            f"filtered as likely false negatives: {s['filtered']} of {s['candidates']} window candidates "
            f"({100.0 * s['filtered_fraction']:.1f}%; relative_margin={s['relative_margin']}, "
            f"absolute_margin={s['absolute_margin']})",
            f"queries short of negatives: {s['short_queries']} (of which with none: {s['no_negative_queries']})",
        ]
        return "\n".join(parts)

    def to_examples(self, examples: Sequence, corpus_texts: Sequence[str], corpus_ids: Optional[Sequence] = None,
                    *, drop_short: bool = False) -> List:
        """The examples with their ``negatives`` (and ``negative_ids`` when ``corpus_ids``
        is given) replaced by the mined ones; with ``drop_short`` the examples short of
        ``num_negatives`` are left out.

        Example::

            import torch
            from contrastkit.data import Example
            from contrastkit.negatives import mine_hard_negatives
            texts, ids = ["cats eat fish", "dogs eat meat", "the sky is blue"], ["d0", "d1", "d2"]
            mined = mine_hard_negatives(torch.tensor([[1.0, 0.5, 0.1]]), torch.eye(3), [[0]], relative_margin=None)
            [ex] = mined.to_examples([Example("what do cats eat?", texts[0], positive_id="d0")], texts, ids)
            assert ex.negatives == ("dogs eat meat",) and ex.negative_ids == ("d1",)
        """
        if len(examples) != len(self.indices):
            raise ValueError(f"{len(examples)} examples for {len(self.indices)} mined rows")
        if corpus_ids is not None and len(corpus_ids) != len(corpus_texts):
            raise ValueError(f"corpus_ids has {len(corpus_ids)} entries for {len(corpus_texts)} corpus texts")
        want = int(self.stats.get("num_negatives", 0))
        out = []
        for ex, idx in zip(examples, self.indices):
            if drop_short and len(idx) < want:
                continue
            out.append(dataclasses.replace(
                ex, negatives=tuple(corpus_texts[j] for j in idx),
                negative_ids=tuple(str(corpus_ids[j]) for j in idx) if corpus_ids is not None else ()))
        return out


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def mine_hard_negatives(query_embeddings: Tensor, corpus_embeddings: Tensor, positives: Sequence[Sequence[int]], *,
                        num_negatives: int = 1, rank_window: Tuple[int, int] = (0, 50), sampling: str = "top",
                        relative_margin: Optional[float] = 0.95, absolute_margin: Optional[float] = None,
                        seed: int = 0, method: str = "auto", faiss_threshold: Optional[int] = None,
                        query_block_size: int = 16384, progress: bool = False) -> MinedNegatives:
    """Mine ``num_negatives`` hard negatives per query from a corpus.

    Args:
        query_embeddings: ``(Q, d)``, one row per (query, positive) pair.
        corpus_embeddings: ``(C, d)``.
        positives: per row, the corpus indices of the query's known positives, the row's
            own positive FIRST (its score is the reference of the margins); all of them
            are removed from the ranking. Every row needs at least one.
        num_negatives: negatives per row (>= 1).
        rank_window: ``(start, stop)``: candidates are the ranks ``start .. stop - 1``
            (0-based) of the ranking with the known positives removed; e.g. ``(3, 50)``
            skips the 3 closest documents. ``stop`` may exceed the corpus.
        sampling: ``"top"`` (the best-ranked survivors) or ``"random"`` (a uniform draw
            among the survivors, returned in rank order).
        relative_margin: drop candidates scoring above ``relative_margin * s+``
            (NV-Retriever, 0.95; exactly ``s+ - (1 - relative_margin) |s+|``); None: off. In (0, 1].
        absolute_margin: drop candidates scoring above ``s+ - absolute_margin``; None: off.
        seed: seed of the random sampling (per-row draws in row order, so the result does
            not depend on how the search is blocked).
        method: search method of :func:`contrastkit.search.topk` (``"auto"``: exact, or
            faiss IVF from ``faiss_threshold`` corpus rows on when that is given;
            ``"exact"``, ``"faiss-flat"``, ``"faiss-ivf"``, ``"faiss-hnsw"``).
        query_block_size: queries searched and filtered at a time.
        progress: show tqdm bars (search, blocks).

    Memory: queries are processed ``query_block_size`` at a time (the exact search itself
    walks one query-block x corpus-block score tile at a time; a faiss index is built once
    and reused); what is kept is one block's ``block x stop`` candidates plus the mined
    ``Q x num_negatives`` result.

    Returns a :class:`MinedNegatives`. Raises ValueError for mismatched shapes, an
    empty or out-of-range positive list, an empty window, an unknown sampling.

    Example::

        import torch
        from contrastkit.negatives import mine_hard_negatives
        c = torch.eye(6)                           # 6 orthogonal documents
        q = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.0, 0.0]])
        m = mine_hard_negatives(q, c, [[0]], num_negatives=2, rank_window=(0, 5), relative_margin=None)
        assert m.indices == [[1, 2]]
    """
    # search sits beside negatives; imported on use
    from ..search import build_faiss_index, resolve_method
    from ..search.ann import topk_checked
    from ..search.exact import check_search_inputs

    if not isinstance(query_embeddings, Tensor) or not isinstance(corpus_embeddings, Tensor):
        raise ValueError("query_embeddings and corpus_embeddings must be torch tensors")
    if query_embeddings.dim() != 2 or corpus_embeddings.dim() != 2:
        raise ValueError(f"query_embeddings must be (Q, d) and corpus_embeddings (C, d), got "
                         f"{tuple(query_embeddings.shape)} and {tuple(corpus_embeddings.shape)}")
    n_q, n_c = query_embeddings.shape[0], corpus_embeddings.shape[0]
    if n_c == 0:
        raise ValueError("corpus_embeddings is empty")
    if isinstance(positives, Tensor):
        positives = positives.reshape(n_q, -1).tolist() if positives.numel() else []
    if len(positives) != n_q:
        raise ValueError(f"positives has {len(positives)} rows for {n_q} query rows")
    pos: List[List[int]] = []
    for i, p in enumerate(positives):
        if isinstance(p, (int, np.integer)):
            p = [p]
        p = [int(j) for j in p]
        if not p:
            raise ValueError(f"positives[{i}] is empty: every query row needs its positive's corpus index")
        bad = [j for j in p if not 0 <= j < n_c]
        if bad:
            raise ValueError(f"positives[{i}] holds corpus index {bad[0]}, outside [0, {n_c})")
        pos.append(p)
    num_negatives = _check_int("num_negatives", num_negatives, 1)
    if (not isinstance(rank_window, (tuple, list)) or len(rank_window) != 2):
        raise ValueError(f"rank_window must be (start, stop), got {rank_window!r}")
    start = _check_int("rank_window start", rank_window[0], 0)
    stop = _check_int("rank_window stop", rank_window[1], 1)
    if stop <= start:
        raise ValueError(f"rank_window {tuple(rank_window)} is empty: need start < stop")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if relative_margin is not None:
        if isinstance(relative_margin, bool) or not isinstance(relative_margin, (int, float)) \
                or not 0.0 < float(relative_margin) <= 1.0:
            raise ValueError(f"relative_margin must be None or in (0, 1], got {relative_margin!r}")
        relative_margin = float(relative_margin)
    if absolute_margin is not None:
        if isinstance(absolute_margin, bool) or not isinstance(absolute_margin, (int, float)) \
                or not np.isfinite(absolute_margin):
            raise ValueError(f"absolute_margin must be None or a finite number, got {absolute_margin!r}")
        absolute_margin = float(absolute_margin)
    seed = _check_int("seed", seed, 0)

    method = resolve_method(method, n_c, faiss_threshold)
    query_block_size = _check_int("query_block_size", query_block_size, 1)
    k = min(stop, n_c)
    # checked once here (a bad row named in the whole input), not again for each query block
    check_search_inputs(query_embeddings, corpus_embeddings, k)
    index = build_faiss_index(corpus_embeddings, method) if method.startswith("faiss") and n_q else None
    acc = torch.float64 if query_embeddings.dtype == torch.float64 else torch.float32
    rng = np.random.default_rng(seed)
    indices: List[List[int]] = []
    scores: List[List[float]] = []
    pos_list: List[float] = []
    n_cand = n_filtered = n_short = n_none = 0
    blocks = range(0, n_q, query_block_size)
    if progress and len(blocks) > 1:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="mine", unit="block", leave=False)
    for b0 in blocks:  # one block of queries at a time: memory is block x stop, not Q x stop
        b1 = min(n_q, b0 + query_block_size)
        qb = query_embeddings[b0:b1]
        s_t, i_t = topk_checked(qb, corpus_embeddings, k, method=method, exclude=pos[b0:b1], index=index,
                                progress=progress and len(range(0, n_q, query_block_size)) == 1)
        block_s, block_i = s_t.cpu().double().numpy(), i_t.cpu().numpy()
        # the own positive's score, exactly (one dot product per row)
        own = torch.tensor([p[0] for p in pos[b0:b1]], dtype=torch.long, device=corpus_embeddings.device)
        ps = (qb.to(acc) * corpus_embeddings[own].to(qb.device, acc)).sum(1).cpu().double().numpy()
        for r in range(b1 - b0):
            sp = float(ps[r])
            pos_list.append(sp)
            cand_i, cand_s = block_i[r, start:stop], block_s[r, start:stop]
            valid = cand_i >= 0
            cand_i, cand_s = cand_i[valid], cand_s[valid]
            keep = np.ones(cand_i.shape[0], dtype=bool)
            if relative_margin is not None:
                keep &= ~(cand_s > sp - (1.0 - relative_margin) * abs(sp))
            if absolute_margin is not None:
                keep &= ~(cand_s > sp - absolute_margin)
            n_cand += int(cand_i.shape[0])
            n_filtered += int((~keep).sum())
            cand_i, cand_s = cand_i[keep], cand_s[keep]
            if sampling == "random" and cand_i.shape[0] > num_negatives:
                pick = np.sort(rng.choice(cand_i.shape[0], size=num_negatives, replace=False))
            else:
                pick = np.arange(min(num_negatives, cand_i.shape[0]))
            indices.append([int(j) for j in cand_i[pick]])
            scores.append([float(x) for x in cand_s[pick]])
            if len(pick) < num_negatives:
                n_short += 1
                n_none += int(len(pick) == 0)
    flat_neg = [s for row in scores for s in row]
    gaps = [pos_list[i] - float(np.mean(row)) for i, row in enumerate(scores) if row]
    stats = {
        "queries": n_q, "num_negatives": num_negatives, "negatives": len(flat_neg),
        "positive_score": _describe(pos_list), "negative_score": _describe(flat_neg),
        "gap": _describe(gaps), "candidates": n_cand, "filtered": n_filtered,
        "filtered_fraction": (n_filtered / n_cand) if n_cand else 0.0,
        "short_queries": n_short, "no_negative_queries": n_none, "rank_window": [start, stop],
        "relative_margin": relative_margin, "absolute_margin": absolute_margin, "sampling": sampling,
        "method": method, "seed": seed,
    }
    return MinedNegatives(indices, scores, pos_list, stats)


def known_positives(examples: Sequence, *, corpus_ids: Optional[Sequence] = None,
                    corpus_texts: Optional[Sequence[str]] = None) -> List[List[int]]:
    """Per example, the corpus indices of its query's known positives, its own first:
    the ``positives`` argument of :func:`mine_hard_negatives`.

    An example's positive is found by ``positive_id`` in ``corpus_ids`` when both are
    there, else by its text in ``corpus_texts``. All examples sharing a query (same
    ``query_id``, else the same query text) share their positives, so a query with
    several relevant documents never gets one of them as a negative. A positive not in
    the corpus is a ValueError naming the example's source.

    Example::

        from contrastkit.data import Example
        from contrastkit.negatives import known_positives
        ex = [Example("q", "a", query_id="1", positive_id="d0"), Example("q", "b", query_id="1", positive_id="d2")]
        assert known_positives(ex, corpus_ids=["d0", "d1", "d2"]) == [[0, 2], [2, 0]]
    """
    if corpus_ids is None and corpus_texts is None:
        raise ValueError("pass corpus_ids and / or corpus_texts to locate the positives")
    by_id = {str(d): j for j, d in enumerate(corpus_ids)} if corpus_ids is not None else {}
    by_text: Dict[str, int] = {}
    if corpus_texts is not None:
        for j, t in enumerate(corpus_texts):
            by_text.setdefault(t, j)
    own: List[int] = []
    groups: Dict[Hashable, List[int]] = {}
    keys = []
    for n, ex in enumerate(examples):
        j = None
        if ex.positive_id is not None and by_id:
            j = by_id.get(str(ex.positive_id))
        if j is None and by_text:
            j = by_text.get(ex.positive)
        if j is None:
            where = ex.source or f"example {n}"
            what = f"positive_id {ex.positive_id!r}" if ex.positive_id is not None and by_id else "positive text"
            raise ValueError(f"{where}: the {what} is not in the corpus")
        key = ("id", ex.query_id) if ex.query_id is not None else ("text", ex.query)
        own.append(j)
        keys.append(key)
        g = groups.setdefault(key, [])
        if j not in g:
            g.append(j)
    return [[j] + [o for o in groups[key] if o != j] for j, key in zip(own, keys)]
