"""Functional form of every objective: ``ck.functional.NAME(..., temperature=...)``.

Each returns a scalar loss computed exactly by the tiled engine.
"""

from .objectives.info_nce import info_nce
from .objectives.mnrl import multiple_negatives_ranking
from .objectives.ntxent import nt_xent

__all__ = [
    "info_nce",
    "nt_xent",
    "multiple_negatives_ranking",
]
