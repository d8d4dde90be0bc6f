"""What ``contrastkit bench loss`` measures: for each objective, our tiled loss, the
naive formula (materialised logits, as the peers compute it) and the peer library.

Each case maps ``(n, dim, seed, device)`` inputs to a callable that runs one
forward + backward. Inputs are random unit vectors (the regime of trained
embeddings); the naive formulas are the textbook ones on a full N x M matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import contrastkit as ck

__all__ = ["LossCase", "CASES", "make_inputs"]

TEMPERATURE = 0.05


def make_inputs(n: int, dim: int, seed: int, device: str, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    # positives correlated with their anchors, as after some training
    b = F.normalize(a + 0.8 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, max(2, n // 4), (n,), generator=g)
    to = dict(device=device, dtype=dtype)
    return (a.to(**to).requires_grad_(), b.to(**to).requires_grad_(), labels.to(device))


@dataclass
class LossCase:
    """One objective: ``ours``, ``naive`` and optionally ``peer`` map (a, b, labels, tile) to a loss."""

    name: str
    ours: Callable
    naive: Callable
    peer: Optional[Callable] = None
    peer_name: str = ""


def _naive_info_nce(a, b, labels, tile):
    logits = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T) / TEMPERATURE
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _pml_ntxent(a, b, labels, tile):
    from pytorch_metric_learning.losses import NTXentLoss

    n = a.shape[0]
    ids = torch.arange(n, device=a.device)
    return NTXentLoss(temperature=TEMPERATURE)(torch.cat([a, b]), torch.cat([ids, ids]))


CASES: Dict[str, LossCase] = {
    "info_nce": LossCase(
        name="symmetric InfoNCE (CLIP)",
        ours=lambda a, b, labels, tile: ck.functional.info_nce(
            a, b, temperature=TEMPERATURE, symmetric=True, tile_size=tile),
        naive=_naive_info_nce,
        peer=_pml_ntxent,
        peer_name="pytorch-metric-learning NTXentLoss",
    ),
}
