"""Module form of every objective: ``ck.losses.NAME(temperature=...)(...)``.

Every loss module is an :class:`Objective` (settings keyword-only: ``temperature``,
``learn_temperature``, ``similarity``, ``tile_size``, ``reduction``; a ``citation``
BibTeX string; a ``work`` description read by :class:`contrastkit.scale.DistributedLoss`).
The argument scheme is in docs/api.md.

Example::

    import torch, contrastkit as ck
    loss_fn = ck.losses.InfoNCE(temperature=0.05)
    loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
"""

from .objectives.base import Objective, Temperature, Work
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
    "Objective",
    "Work",
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
