"""Semantic textual similarity: Spearman / Pearson correlation of cosine similarities with gold scores.

The protocol of Reimers & Gurevych, "Sentence-BERT", EMNLP 2019 (arXiv:1908.10084) and
sentence-transformers' ``EmbeddingSimilarityEvaluator``: cosine similarity of the two
sentence embeddings, rank (Spearman) and linear (Pearson) correlation with the gold scores
over all pairs.

Example::

    import torch
    from contrastkit.data.sts import StsData
    from contrastkit.evaluation import evaluate_sts
    data = StsData(["a b", "a c", "d"], ["a b", "a d", "e"], [5.0, 2.5, 0.0])
    def encode(texts):          # a toy encoder: one-hot letters
        return torch.stack([torch.tensor([float(ch in t) for ch in "abcde"]) for t in texts])
    evaluate_sts(encode, data)["spearman"]      # 1.0
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["evaluate_sts"]


@torch.no_grad()
def evaluate_sts(encode: Callable[[List[str]], Tensor], data) -> Dict[str, float]:
    """``{"spearman", "pearson", "n"}`` of ``cos(encode(s1_i), encode(s2_i))`` against ``data.scores``.

    Args:
        encode: texts -> ``(N, d)`` embeddings (normalised or not: the cosine is taken here, in float64).
        data: an :class:`contrastkit.data.sts.StsData` (or anything with ``sentences1``,
            ``sentences2``, ``scores``). Each distinct sentence is encoded once.

    Correlations use ``scipy.stats.spearmanr`` / ``pearsonr``; they are undefined for fewer than
    2 pairs or constant scores (ValueError).

    Example::

        import contrastkit as ck
        from contrastkit.data.sts import StsData
        from contrastkit.evaluation import evaluate_sts
        sts = ck.data.load_sts("test")       # all 1,379 pairs: spearman about 0.82
        first = StsData(sts.sentences1[:200], sts.sentences2[:200], sts.scores[:200])
        res = evaluate_sts(ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True).encode, first)
        assert res["n"] == 200 and res["spearman"] > 0.8
    """
    from scipy.stats import pearsonr, spearmanr

    s1, s2 = list(data.sentences1), list(data.sentences2)
    gold = torch.as_tensor(list(data.scores), dtype=torch.float64)
    if not (len(s1) == len(s2) == gold.numel()):
        raise ValueError(f"sentences1, sentences2 and scores must have the same length, got {len(s1)}, "
                         f"{len(s2)}, {gold.numel()}")
    if len(s1) < 2:
        raise ValueError(f"STS evaluation needs at least 2 pairs, got {len(s1)}")
    if bool((gold == gold[0]).all()):
        raise ValueError("all gold scores are equal: the correlations are undefined")
    unique = list(dict.fromkeys(s1 + s2))
    pos = {t: i for i, t in enumerate(unique)}
    emb = encode(unique)
    if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] != len(unique):
        raise ValueError(f"encode must return a ({len(unique)}, d) tensor, got {type(emb).__name__} "
                         f"{tuple(getattr(emb, 'shape', ()))}")
    emb = F.normalize(emb.detach().to("cpu", torch.float64), dim=-1)
    a = emb[[pos[t] for t in s1]]
    b = emb[[pos[t] for t in s2]]
    cos = (a * b).sum(-1).numpy()
    g = gold.numpy()
    return {"spearman": float(spearmanr(cos, g)[0]), "pearson": float(pearsonr(cos, g)[0]), "n": len(s1)}
