"""Functional form of every objective: ``ck.functional.NAME(..., temperature=...)``.

Each returns a scalar loss computed exactly by the tiled engine.
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
