"""Evaluation: BEIR retrieval metrics, whole-corpus retrieval, STS correlation, paired bootstrap.

- :func:`retrieval_metrics`: nDCG@k, MRR@k, Recall@k, MAP@k, Precision@k (BEIR's definitions)
  of a ranking, means and per-query arrays (:class:`RetrievalScores`).
- :func:`evaluate_retrieval`: encode queries (and the corpus, or reuse its embeddings), rank the
  whole corpus (:func:`contrastkit.search.topk`), score.
- :func:`evaluate_sts`: Spearman / Pearson of cosine similarities with gold STS scores.
- :func:`paired_bootstrap`: interval and p-value of a per-query metric difference.

Example::

    from contrastkit.evaluation import retrieval_metrics, paired_bootstrap
    s = retrieval_metrics({"q": [("d1", 0.9), ("d2", 0.5)]}, {"q": {"d2": 1}}, ks=(1, 2))
    s.mean["mrr@2"]                                  # 0.5
"""

from .retrieval import METRICS, RetrievalScores, evaluate_retrieval, retrieval_metrics
from .stats import paired_bootstrap
from .sts import evaluate_sts

__all__ = ["RetrievalScores", "retrieval_metrics", "evaluate_retrieval", "evaluate_sts", "paired_bootstrap",
           "METRICS"]
