"""Module form of every objective: ``ck.losses.NAME(temperature=...)(...)``."""

from .objectives.common import Temperature
from .objectives.info_nce import InfoNCE
from .objectives.mnrl import MultipleNegativesRanking
from .objectives.ntxent import NTXent

__all__ = [
    "Temperature",
    "InfoNCE",
    "NTXent",
    "MultipleNegativesRanking",
]
