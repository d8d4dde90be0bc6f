"""Module form of every objective: ``ck.losses.NAME(temperature=...)(...)``."""

from .objectives.common import Temperature
from .objectives.info_nce import InfoNCE
from .objectives.mnrl import MultipleNegativesRanking
from .objectives.ntxent import NTXent
from .objectives.siglip import SigLIP
from .objectives.soft_targets import CWCL, ICon
from .objectives.multiview import MultiViewInfoNCE
from .objectives.align_uniform import AlignUniform, Alignment, Uniformity
from .objectives.supcon import SupCon, SupConStats
from .objectives.dcl import DCL, DCLW
from .objectives.debiased import DebiasedContrastive, HardNegativeContrastive

__all__ = [
    "Temperature",
    "InfoNCE",
    "NTXent",
    "MultipleNegativesRanking",
    "SigLIP",
    "CWCL",
    "ICon",
    "MultiViewInfoNCE",
    "Alignment",
    "Uniformity",
    "AlignUniform",
    "SupCon",
    "SupConStats",
    "DCL",
    "DCLW",
    "DebiasedContrastive",
    "HardNegativeContrastive",
]
