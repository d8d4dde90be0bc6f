"""Multi-view InfoNCE for V >= 2 views per sample (features (N, V, d)).

All N V views form one candidate set; X_ab = s_a z_a . z_b (s_a = 1 / temperature of
anchor view a), self-similarity excluded from every denominator. Two published
aggregations of the positives (the other V - 1 views of the same sample):

``aggregation="multi_positive"`` (default): every view is an anchor and its V - 1
sibling views are its positives, averaged outside the log: SupCon's L_out with the
sample id as label (Khosla et al. 2020), the multi-view generalisation of NT-Xent
that poly-view work compares against (the ``NTXent(mv=True)`` baseline in Koromilas
et al.'s code). Shidani et al. 2024's own poly-view estimators (geometric /
arithmetic PVC) are not implemented here:

    loss = 1/(N V) sum_{i, a} -1/(V-1) sum_{b != a} [ X_{(i,a),(i,b)} - log sum_{(j,c) != (i,a)} exp X_{(i,a),(j,c)} ]

``aggregation="joint"``: MV-InfoNCE of Koromilas et al. 2025 ("A Principled
Framework for Multi-View Contrastive Learning"), one term per sample with all
positive pairs in the numerator and all anchors' denominators summed:

    loss = 1/N sum_i -log [ sum_{a != b} exp X_{(i,a),(i,b)} / sum_a sum_{(j,c) != (i,a)} exp X_{(i,a),(j,c)} ]

(checked against the authors' public code, ``MVINFONCE`` in pakoromilas/Multi-View-CL).
For V = 2 "multi_positive" is exactly NT-Xent.

Both are thin specs on the engine: the denominators are one
:func:`~contrastkit.engine.tiled_logsumexp` over the (N V) x (N V) tiles with the
diagonal masked; the positives are O(N V^2 d).

Example::

    import torch, contrastkit as ck
    feats = torch.randn(16, 4, 8)                                  # (N, 4 views, d)
    loss = ck.functional.multiview_info_nce(feats, temperature=0.1)
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..engine import DiagonalMask, tiled_logsumexp
from ..engine.tiling import TileSize
from ..validation import check_choice, check_embeddings, check_reduction, check_scale
from .base import SIMILARITIES, Objective, Work
from .common import reduce_rows

__all__ = ["multiview_info_nce", "MultiViewInfoNCE", "AGGREGATIONS", "CITATION"]

CITATION = """@inproceedings{khosla2020supcon,
  title     = {Supervised Contrastive Learning},
  author    = {Khosla, Prannay and Teterwak, Piotr and Wang, Chen and others},
  booktitle = {NeurIPS},
  year      = {2020},
  note      = {arXiv:2004.11362 (multi_positive aggregation)}
}
@inproceedings{koromilas2025mvinfonce,
  title     = {A Principled Framework for Multi-View Contrastive Learning},
  author    = {Koromilas, Panagiotis and Bouritsas, Giorgos and Giannakopoulos, Theodoros and
               Nicolaou, Mihalis and Panagakis, Yannis},
  booktitle = {arXiv preprint arXiv:2507.06979},
  year      = {2025},
  note      = {joint aggregation (MV-InfoNCE)}
}"""

AGGREGATIONS = ("multi_positive", "joint")


def _row_scale(temperature: Union[float, Tensor], n: int, v: int, like: Tensor) -> Union[float, Tensor]:
    """1 / temperature per flattened view row (N V,), or a float."""
    if isinstance(temperature, Tensor) and temperature.dim() >= 1 and temperature.numel() > 1:
        t = temperature
        if t.dim() == 2 and tuple(t.shape) == (n, v):
            flat = t.reshape(-1)
        elif t.dim() == 1 and t.shape[0] == n:
            flat = t.repeat_interleave(v)
        else:
            raise ValueError(
                f"temperature must be a scalar, one per sample ({n},) or one per view ({n}, {v}), got shape {tuple(t.shape)}"
            )
        check_scale("temperature", flat, like=like, n_rows=n * v)
        return 1.0 / flat.to(like.dtype)
    check_scale("temperature", temperature, like=like, n_rows=n * v)
    if isinstance(temperature, Tensor):
        return 1.0 / temperature.to(like.dtype).reshape(())
    return 1.0 / float(temperature)


def multiview_info_nce(
    features: Tensor,
    *,
    temperature: Union[float, Tensor] = 0.1,
    aggregation: str = "multi_positive",
    similarity: str = "cosine",
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """Multi-view InfoNCE of ``features`` (N, V, d), V >= 2; see the module docstring.

    Args:
        temperature: float, scalar tensor (learnable), one per sample (N,) or one per
            view (N, V) (per-anchor temperatures).
        aggregation: ``"multi_positive"`` (every view an anchor, positives averaged) or
            ``"joint"`` (Koromilas et al.'s MV-InfoNCE, one term per sample).
        similarity: ``"cosine"`` (L2-normalise) or ``"dot"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per view-anchor (N, V) for
            multi_positive, per sample (N,) for joint).

    Example::

        import torch, contrastkit as ck
        z = torch.randn(16, 3, 32)                    # 16 samples, 3 views each
        ck.functional.multiview_info_nce(z, temperature=0.1)
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_reduction(reduction)
    check_choice("similarity", similarity, SIMILARITIES)
    check_embeddings("features", features, ndim=3)
    n, v, d = features.shape
    if v < 2:
        raise ValueError(
            f"multi-view InfoNCE needs at least 2 views per sample (features (N, V, d) with V >= 2), got V={v}"
        )
    z3 = l2_normalize(features) if similarity == "cosine" else features
    z = z3.reshape(n * v, d)
    scale = _row_scale(temperature, n, v, z)         # inside the engine's walk: z / t is never formed
    lse, _ = tiled_logsumexp(z, z, masks=[DiagonalMask(0)], tile_size=tile_size, scale=scale)
    lse = lse.to(z.dtype).reshape(n, v)
    # per view-anchor scale (N, V, 1), or a number
    s3 = scale.reshape(n, v, 1) if isinstance(scale, Tensor) and scale.dim() == 1 else scale
    if aggregation == "multi_positive":
        # mean over siblings of X_ab = s_a z_a . (sum_b z_b - z_a) / (V - 1)
        pos = (z3 * (z3.sum(1, keepdim=True) - z3) * s3).sum(-1) / (v - 1)
        per_anchor = lse - pos
        if reduction == "none":
            return per_anchor
        return reduce_rows(per_anchor.reshape(-1), reduction)
    pair = torch.einsum("nad,nbd->nab", z3, z3) * s3
    off = ~torch.eye(v, dtype=torch.bool, device=z.device)
    pos = torch.logsumexp(pair[:, off], dim=1)
    per_sample = torch.logsumexp(lse, dim=1) - pos
    return reduce_rows(per_sample, reduction)


class MultiViewInfoNCE(Objective):
    """Multi-view InfoNCE module: ``forward(features (N, V, d))``; see :func:`multiview_info_nce`.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.MultiViewInfoNCE(temperature=0.1)
        feats = torch.randn(16, 4, 8, requires_grad=True)
        loss_fn(feats).backward()
    """

    citation = CITATION

    def __init__(self, *, temperature: float = 0.1, aggregation: str = "multi_positive",
                 learn_temperature: bool = False, similarity: str = "cosine", tile_size: TileSize = None,
                 reduction: str = "mean") -> None:
        check_choice("aggregation", aggregation, AGGREGATIONS)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction)
        self.aggregation = aggregation

    @property
    def work(self) -> Work:
        return Work(rows=("features",), positives="views", self_position=True)

    def forward(self, features: Tensor) -> Tensor:
        return multiview_info_nce(features, aggregation=self.aggregation, **self._settings())

    def extra_repr(self) -> str:
        return f"aggregation={self.aggregation!r}, " + super().extra_repr()
