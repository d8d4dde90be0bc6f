"""What ``contrastkit bench loss`` measures: for each objective, our tiled loss, the
naive formula (materialised logits, as the peers compute it) and the peer library.

Each case maps ``(n, dim, seed, device)`` inputs to a callable that runs one
forward + backward. Inputs are random unit vectors (the regime of trained
embeddings); the naive formulas are :mod:`contrastkit.reference` (the textbook ones on
a full N x M matrix, the same the tests compare with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import contrastkit as ck
from contrastkit import reference as ref

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
    # where the peer computes a related objective rather than this one, the case
    # whose ``ours`` / ``peer`` are compared like for like at the peer sizes
    peer_case: Optional[str] = None
    # logit pairs per N^2 (MNRL with one hard negative scores N x 2N): the summary
    # compares time per pair with plain InfoNCE's
    pairs: float = 1.0


def _pml_ntxent(a, b, labels, tile):
    from pytorch_metric_learning.losses import NTXentLoss

    n = a.shape[0]
    ids = torch.arange(n, device=a.device)
    return NTXentLoss(temperature=0.5)(torch.cat([a, b]), torch.cat([ids, ids]))


def _pml_supcon(a, b, labels, tile):
    from pytorch_metric_learning.losses import SupConLoss

    return SupConLoss(temperature=0.1)(a, labels)


def _views(a):
    n = a.shape[0] // 2 * 2
    return a[:n].reshape(n // 2, 2, -1)


# the naive formulas are contrastkit.reference's (the tests' oracle), on the same arguments
def _ours(fn, **kw):
    return lambda a, b, labels, tile: fn(a, b, tile_size=tile, **kw)


CASES: Dict[str, LossCase] = {
    "info_nce": LossCase(
        name="symmetric InfoNCE (CLIP)",
        ours=lambda a, b, labels, tile: ck.functional.info_nce(
            a, b, temperature=TEMPERATURE, symmetric=True, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.info_nce(a, b, temperature=TEMPERATURE, symmetric=True),
        peer_name="pytorch-metric-learning NTXentLoss (vs our NT-Xent)",
        peer_case="nt_xent",
    ),
    "nt_xent": LossCase(
        name="NT-Xent (SimCLR, 2N views)",
        ours=lambda a, b, labels, tile: ck.functional.nt_xent(a, b, temperature=0.5, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.nt_xent(a, b, temperature=0.5),
        peer=_pml_ntxent,
        peer_name="pytorch-metric-learning NTXentLoss",
    ),
    "mnrl": LossCase(
        name="MNRL, one hard negative per query (N x 2N)",
        ours=lambda a, b, labels, tile: ck.functional.multiple_negatives_ranking(
            a, b, b.roll(1, 0).detach(), temperature=0.05, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.multiple_negatives_ranking(a, b, b.roll(1, 0).detach(), temperature=0.05),
        pairs=2.0,
    ),
    "supcon": LossCase(
        name="SupCon L_out (labels: N/4 classes)",
        ours=lambda a, b, labels, tile: ck.functional.supcon(a, labels, temperature=0.1, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.supcon(a, labels, temperature=0.1),
        peer=_pml_supcon,
        peer_name="pytorch-metric-learning SupConLoss",
    ),
    "dcl": LossCase(name="DCL (retrieval form)", ours=_ours(ck.functional.dcl, temperature=0.1),
                    naive=lambda a, b, labels, tile: ref.dcl(a, b, temperature=0.1)),
    "dclw": LossCase(name="DCLW (retrieval form)", ours=_ours(ck.functional.dcl, temperature=0.1, weighted=True),
                     naive=lambda a, b, labels, tile: ref.dcl(a, b, temperature=0.1, weighted=True)),
    "debiased": LossCase(name="debiased contrastive (tau+ = 0.1)",
                         ours=_ours(ck.functional.debiased_contrastive, temperature=0.5, tau_plus=0.1),
                         naive=lambda a, b, labels, tile: ref.debiased_contrastive(a, b, temperature=0.5, tau_plus=0.1)),
    "hard_negative": LossCase(
        name="hard-negative reweighted (beta = 1, tau+ = 0.1)",
        ours=_ours(ck.functional.hard_negative_contrastive, temperature=0.5, beta=1.0, tau_plus=0.1),
        naive=lambda a, b, labels, tile: ref.debiased_contrastive(a, b, temperature=0.5, tau_plus=0.1, beta=1.0)),
    "siglip": LossCase(name="SigLIP (t = 0.1, b = -10)",
                       ours=_ours(ck.functional.siglip, temperature=0.1, bias=-10.0), naive=lambda a, b, labels, tile: ref.siglip(a, b, temperature=0.1, bias=-10.0)),
    "cwcl": LossCase(
        name="CWCL (teacher = detached anchors)",
        ours=lambda a, b, labels, tile: ck.functional.cwcl(a, b, temperature=0.05, teacher=a.detach(),
                                                           tile_size=tile),
        naive=lambda a, b, labels, tile: ref.cwcl(a, b, a.detach(), temperature=0.05)),
    "icon": LossCase(
        name="I-Con, label supervision, cosine kernel",
        ours=lambda a, b, labels, tile: ck.functional.icon(a, labels=labels, temperature=0.1, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.icon(a, labels, temperature=0.1)),
    "multiview": LossCase(
        name="multi-view InfoNCE (V = 2, N/2 samples)",
        ours=lambda a, b, labels, tile: ck.functional.multiview_info_nce(_views(a), temperature=0.1,
                                                                         tile_size=tile),
        naive=lambda a, b, labels, tile: ref.multiview_info_nce(_views(a), temperature=0.1)),
    "uniformity": LossCase(
        name="uniformity (t = 2)",
        ours=lambda a, b, labels, tile: ck.functional.uniformity(a, t=2.0, normalize=True, tile_size=tile),
        naive=lambda a, b, labels, tile: ref.uniformity(a, t=2.0)),
    "margin": LossCase(
        name="InfoNCE with additive margin 0.2",
        ours=lambda a, b, labels, tile: ck.functional.info_nce(a, b, temperature=0.05, margin=0.2,
                                                               tile_size=tile),
        naive=lambda a, b, labels, tile: ref.info_nce(a, b, temperature=0.05, margin=0.2)),
}
