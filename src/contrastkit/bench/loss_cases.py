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
    # where the peer computes a related objective rather than this one, the case
    # whose ``ours`` / ``peer`` are compared like for like at the peer sizes
    peer_case: Optional[str] = None
    # logit pairs per N^2 (MNRL with one hard negative scores N x 2N): the summary
    # compares time per pair with plain InfoNCE's
    pairs: float = 1.0


def _eye(n, device):
    return torch.eye(n, dtype=torch.bool, device=device)


def _naive_info_nce(a, b, labels, tile):
    logits = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T) / TEMPERATURE
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _naive_nt_xent(a, b, labels, tile, t=0.5):
    z = F.normalize(torch.cat([a, b]), dim=-1)
    n = a.shape[0]
    logits = (z @ z.T / t).masked_fill(_eye(2 * n, z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _pml_ntxent(a, b, labels, tile):
    from pytorch_metric_learning.losses import NTXentLoss

    n = a.shape[0]
    ids = torch.arange(n, device=a.device)
    return NTXentLoss(temperature=0.5)(torch.cat([a, b]), torch.cat([ids, ids]))


def _cos(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _naive_mnrl(a, b, labels, tile):
    neg = b.roll(1, 0).detach()  # one hard negative per anchor
    logits = 20.0 * _cos(a, torch.cat([b, neg]))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def _naive_supcon(a, b, labels, tile, t=0.1):
    z = F.normalize(a, dim=-1)
    logits = (z @ z.T / t).masked_fill(_eye(len(z), z.device), float("-inf"))
    logp = logits - torch.logsumexp(logits, 1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~_eye(len(z), z.device)
    count = pos.sum(1)
    keep = count > 0
    per_row = -(logp.masked_fill(~pos, 0.0)).sum(1)[keep] / count[keep]
    return per_row.mean()


def _pml_supcon(a, b, labels, tile):
    from pytorch_metric_learning.losses import SupConLoss

    return SupConLoss(temperature=0.1)(a, labels)


def _naive_dcl(a, b, labels, tile, t=0.1):
    x = _cos(a, b) / t
    pos = x.diagonal()
    neg = x.masked_fill(_eye(len(x), x.device), float("-inf"))
    return (torch.logsumexp(neg, 1) - pos).mean()


def _naive_dclw(a, b, labels, tile, t=0.1, sigma=0.5):
    sim = _cos(a, b)
    w = 2.0 - len(sim) * torch.softmax(sim.diagonal().detach() / sigma, dim=0)
    x = sim / t
    neg = x.masked_fill(_eye(len(x), x.device), float("-inf"))
    return (torch.logsumexp(neg, 1) - w * x.diagonal()).mean()


def _naive_debiased(a, b, labels, tile, t=0.5, tau_plus=0.1, beta=0.0):
    x = _cos(a, b) / t
    n = len(x)
    pos = x.diagonal().exp()
    negmask = ~_eye(n, x.device)
    neg = x.exp()
    if beta:
        imp = (beta * x).exp() * negmask
        reweight = (imp * neg).sum(1) / (imp.sum(1) / (n - 1))
    else:
        reweight = (neg * negmask).sum(1)
    ng = (reweight - tau_plus * (n - 1) * pos) / (1 - tau_plus)
    ng = torch.clamp(ng, min=(n - 1) * torch.e ** (-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


def _naive_siglip(a, b, labels, tile, t=0.1, bias=-10.0):
    z = 2.0 * _eye(len(a), a.device).to(a.dtype) - 1.0
    return -F.logsigmoid(z * (_cos(a, b) / t + bias)).sum() / len(a)


def _naive_cwcl(a, b, labels, tile, t=0.05):
    teacher = F.normalize(a.detach() + 0.0, dim=-1)
    w = 0.5 * (1.0 + teacher @ teacher.T)
    w = w / w.sum(1, keepdim=True)
    logp = torch.log_softmax(_cos(a, b) / t, dim=1)
    return -(w * logp).sum(1).mean()


def _naive_icon(a, b, labels, tile, t=0.1):
    z = F.normalize(a, dim=-1)
    eye = _eye(len(z), z.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    count = same.sum(1, keepdim=True)
    keep = count.squeeze(1) > 0
    p = same.to(z.dtype) / count.clamp(min=1)
    logq = torch.log_softmax((z @ z.T / t).masked_fill(eye, float("-inf")), dim=1)
    kl = (p * (torch.log(p.clamp(min=1e-30)) - logq.masked_fill(eye, 0.0))).sum(1)
    return kl[keep].mean()


def _views(a):
    n = a.shape[0] // 2 * 2
    return a[:n].reshape(n // 2, 2, -1)


def _naive_multiview(a, b, labels, tile, t=0.1):
    v = _views(a)
    sample = torch.arange(v.shape[0], device=a.device).repeat_interleave(v.shape[1])
    return _naive_supcon(v.reshape(-1, v.shape[-1]), None, sample, tile, t)


def _naive_uniformity(a, b, labels, tile):
    z = F.normalize(a, dim=-1)
    sq = torch.cdist(z, z).pow(2)
    off = ~_eye(len(z), z.device)
    return torch.logsumexp((-2.0 * sq)[off], 0) - torch.log(torch.tensor(float(off.sum()), dtype=z.dtype))


def _naive_margin(a, b, labels, tile, t=0.05, m=0.2):
    x = _cos(a, b)
    x = (x - m * _eye(len(x), x.device).to(x.dtype)) / t
    return F.cross_entropy(x, torch.arange(len(x), device=x.device))


def _ours(fn, **kw):
    return lambda a, b, labels, tile: fn(a, b, tile_size=tile, **kw)


CASES: Dict[str, LossCase] = {
    "info_nce": LossCase(
        name="symmetric InfoNCE (CLIP)",
        ours=lambda a, b, labels, tile: ck.functional.info_nce(
            a, b, temperature=TEMPERATURE, symmetric=True, tile_size=tile),
        naive=_naive_info_nce,
        peer_name="pytorch-metric-learning NTXentLoss (vs our NT-Xent)",
        peer_case="nt_xent",
    ),
    "nt_xent": LossCase(
        name="NT-Xent (SimCLR, 2N views)",
        ours=lambda a, b, labels, tile: ck.functional.nt_xent(a, b, temperature=0.5, tile_size=tile),
        naive=_naive_nt_xent,
        peer=_pml_ntxent,
        peer_name="pytorch-metric-learning NTXentLoss",
    ),
    "mnrl": LossCase(
        name="MNRL, one hard negative per query (N x 2N)",
        ours=lambda a, b, labels, tile: ck.functional.multiple_negatives_ranking(
            a, b, b.roll(1, 0).detach(), scale=20.0, tile_size=tile),
        naive=_naive_mnrl,
        pairs=2.0,
    ),
    "supcon": LossCase(
        name="SupCon L_out (labels: N/4 classes)",
        ours=lambda a, b, labels, tile: ck.functional.supcon(a, labels, temperature=0.1, tile_size=tile),
        naive=_naive_supcon,
        peer=_pml_supcon,
        peer_name="pytorch-metric-learning SupConLoss",
    ),
    "dcl": LossCase(name="DCL (retrieval form)", ours=_ours(ck.functional.dcl, temperature=0.1),
                    naive=_naive_dcl),
    "dclw": LossCase(name="DCLW (retrieval form)", ours=_ours(ck.functional.dcl, temperature=0.1, weighted=True),
                     naive=_naive_dclw),
    "debiased": LossCase(name="debiased contrastive (tau+ = 0.1)",
                         ours=_ours(ck.functional.debiased_contrastive, temperature=0.5, tau_plus=0.1),
                         naive=_naive_debiased),
    "hard_negative": LossCase(
        name="hard-negative reweighted (beta = 1, tau+ = 0.1)",
        ours=_ours(ck.functional.hard_negative_contrastive, temperature=0.5, beta=1.0, tau_plus=0.1),
        naive=lambda a, b, labels, tile: _naive_debiased(a, b, labels, tile, beta=1.0)),
    "siglip": LossCase(name="SigLIP (t = 0.1, b = -10)",
                       ours=_ours(ck.functional.siglip, temperature=0.1, bias=-10.0), naive=_naive_siglip),
    "cwcl": LossCase(
        name="CWCL (teacher = detached anchors)",
        ours=lambda a, b, labels, tile: ck.functional.cwcl(a, b, temperature=0.05, teacher=a.detach(),
                                                           tile_size=tile),
        naive=_naive_cwcl),
    "icon": LossCase(
        name="I-Con, label supervision, cosine kernel",
        ours=lambda a, b, labels, tile: ck.functional.icon(a, labels=labels, temperature=0.1, tile_size=tile),
        naive=_naive_icon),
    "multiview": LossCase(
        name="multi-view InfoNCE (V = 2, N/2 samples)",
        ours=lambda a, b, labels, tile: ck.functional.multiview_info_nce(_views(a), temperature=0.1,
                                                                         tile_size=tile),
        naive=_naive_multiview),
    "uniformity": LossCase(
        name="uniformity (t = 2)",
        ours=lambda a, b, labels, tile: ck.functional.uniformity(a, t=2.0, normalize=True, tile_size=tile),
        naive=_naive_uniformity),
    "margin": LossCase(
        name="InfoNCE with additive margin 0.2",
        ours=lambda a, b, labels, tile: ck.functional.info_nce(a, b, temperature=0.05, margin=0.2,
                                                               tile_size=tile),
        naive=_naive_margin),
}
