"""Functional form of every objective: ``ck.functional.NAME(tensors..., temperature=...)``.

Tensors are positional, every setting keyword-only (the scheme is in docs/api.md).
Each returns the loss computed exactly by the tiled engine.

Example::

    import torch, contrastkit as ck
    loss = ck.functional.info_nce(torch.randn(8, 16), torch.randn(8, 16), temperature=0.05)
"""

from .objectives.info_nce import info_nce
from .objectives.mnrl import multiple_negatives_ranking
from .objectives.ntxent import nt_xent
from .objectives.siglip import siglip
from .objectives.soft_targets import cwcl, icon
from .objectives.multiview import multiview_info_nce
from .objectives.align_uniform import align_uniform, alignment, uniformity
from .objectives.supcon import supcon
from .objectives.dcl import dcl
from .objectives.debiased import debiased_contrastive, hard_negative_contrastive

__all__ = [
    "info_nce",
    "nt_xent",
    "multiple_negatives_ranking",
    "siglip",
    "cwcl",
    "icon",
    "multiview_info_nce",
    "alignment",
    "uniformity",
    "align_uniform",
    "supcon",
    "dcl",
    "debiased_contrastive",
    "hard_negative_contrastive",
]
