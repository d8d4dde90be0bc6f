"""Naive reference formulas: every objective on the materialised N x M similarity matrix,
written as the papers (and the peer libraries) write them, differentiated by autograd.

This is the oracle the tests compare the tiled engine with (in float64) and the
"naive" row of ``contrastkit bench loss``. Each function takes the same arguments as
its :mod:`contrastkit.functional` namesake, plus ``drop`` (an (N, M) boolean matrix of
entries left out of the denominators, for SigLIP of pairs left out of the sum: what
``masks=`` does per tile) where the objective takes masks. Nothing here is tiled or
memory-bounded: O(N M) memory, small inputs only.

Temperatures: a float, a 0-d tensor, or one per anchor row (a vector that is repeated
over the views in the multi-view layouts, as the functionals do).

Example::

    import torch, contrastkit as ck
    from contrastkit import reference
    q, d = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    a = ck.functional.info_nce(q, d, temperature=0.1)
    b = reference.info_nce(q, d, temperature=0.1)
    assert abs(float(a) - float(b)) < 1e-12
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "logits",
    "info_nce",
    "multiple_negatives_ranking",
    "nt_xent",
    "moco",
    "siglip",
    "supcon",
    "dcl",
    "debiased_contrastive",
    "hard_negative_contrastive",
    "cwcl",
    "icon",
    "multiview_info_nce",
    "alignment",
    "uniformity",
    "align_uniform",
]

NEG = float("-inf")
Temp = Union[float, Tensor]


def _norm(x: Tensor, similarity: str) -> Tensor:
    if similarity == "cosine":
        return F.normalize(x, dim=-1)
    if similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    return x


def _t_rows(t: Temp, rows: int):
    """The temperature as a column (rows, 1) when given per row (repeated over views), else as is."""
    if isinstance(t, Tensor) and t.dim() == 1 and t.numel() > 1:
        return t.repeat(rows // t.numel())[:, None]
    if isinstance(t, Tensor):
        return t.reshape(())
    return t


def _reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return torch.where(valid, rows, torch.zeros_like(rows))
    r = rows[valid]
    return r.mean() if reduction == "mean" else r.sum()


def logits(anchors: Tensor, candidates: Tensor, temperature: Temp = 1.0, similarity: str = "cosine") -> Tensor:
    """The full (N, M) logit matrix ``f(a_i, c_j) / t`` (t scalar or one per row)."""
    x = _norm(anchors, similarity) @ _norm(candidates, similarity).T
    return x / _t_rows(temperature, x.shape[0])


def info_nce(anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *, temperature: Temp = 0.05,
             symmetric: bool = False, similarity: str = "cosine", drop: Optional[Tensor] = None,
             margin: float = 0.0, reduction: str = "mean") -> Tensor:
    """InfoNCE / CLIP with one positive column per row (-1: none), an additive margin on the
    positive similarity and the entries of ``drop`` left out of the denominators:

        row i:    logsumexp_j(X_ij, not dropped) - X_{i,p(i)},   X = (sim - margin [j = p(i)]) / t
        column j: logsumexp_i(X_ij, not dropped) - mean_{i: p(i) = j} X_ij   (symmetric; averaged)
    """
    sim = _norm(anchors, similarity) @ _norm(candidates, similarity).T
    n, m = sim.shape
    if positives is None:
        positives = torch.arange(n, device=sim.device)
    valid = positives >= 0
    onehot = torch.zeros(n, m, dtype=torch.bool, device=sim.device)
    onehot[valid.nonzero().squeeze(1), positives[valid]] = True
    x = (sim - margin * onehot.to(sim.dtype)) / _t_rows(temperature, n)
    # ``drop`` removes any entry, the positive too; with a margin the (shifted) positive is
    # always in its denominator (NT-Xent-AM), as the functional adds it back
    den = x if drop is None else x.masked_fill(drop & ~onehot if margin else drop, NEG)
    rows = torch.logsumexp(den, 1) - (x * onehot).sum(1)
    if not symmetric:
        return _reduce(rows, valid, reduction)
    cnt = onehot.sum(0)
    has = cnt > 0
    cols = torch.logsumexp(den, 0) - (x * onehot).sum(0) / cnt.clamp(min=1)
    red = torch.mean if reduction == "mean" else torch.sum
    return 0.5 * (red(rows[valid]) + red(cols[has]))


def multiple_negatives_ranking(anchors: Tensor, candidates: Tensor, *hard_negatives: Tensor, temperature: Temp = 0.05,
                               symmetric: bool = False, similarity: str = "cosine", drop: Optional[Tensor] = None,
                               reduction: str = "mean") -> Tensor:
    """MNRL: anchor i against [candidates, hard negatives...] (an (N, k, d) tensor gives its k
    slices in order), positive column i: sentence-transformers' MultipleNegativesRankingLoss
    (``symmetric``: its symmetric variant, over the positive columns)."""
    cols = [candidates]
    for h in hard_negatives:
        cols.extend(h.unbind(1) if h.dim() == 3 else [h])
    return info_nce(anchors, torch.cat(cols), None, temperature=temperature, symmetric=symmetric,
                    similarity=similarity, drop=drop, reduction=reduction)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: Temp = 0.5, similarity: str = "cosine",
            drop: Optional[Tensor] = None, margin: float = 0.0, reduction: str = "mean") -> Tensor:
    """SimCLR's NT-Xent: the 2N rows [z1; z2], positive the other view, self dropped."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    idx = torch.arange(n, device=z.device)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    drop = eye if drop is None else drop | eye
    return info_nce(z, z, torch.cat([idx + n, idx]), temperature=temperature, similarity=similarity, drop=drop,
                    margin=margin, reduction=reduction)


def moco(queries: Tensor, keys: Tensor, queue: Tensor, *, temperature: Temp = 0.07) -> Tensor:
    """MoCo (He et al. 2020, Algorithm 1): ``logits = [q.k_own, q.queue] / t``, CE to label 0
    (normalised q, k, queue)."""
    q, k, u = F.normalize(queries, dim=-1), F.normalize(keys, dim=-1), F.normalize(queue, dim=-1)
    x = torch.cat([(q * k).sum(1, keepdim=True), q @ u.T], 1) / temperature
    return F.cross_entropy(x, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def siglip(anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None, *, temperature: Temp = 0.1,
           bias: Union[float, Tensor] = -10.0, similarity: str = "cosine", drop: Optional[Tensor] = None,
           reduction: str = "mean") -> Tensor:
    """SigLIP: ``sum_ij -log sigmoid(z_ij (sim_ij / t + b)) / N``, z = +1 on the positive pairs;
    the (negative) pairs of ``drop`` are left out of the sum (the divisor stays N)."""
    n, m = anchors.shape[0], candidates.shape[0]
    x = logits(anchors, candidates, temperature, similarity) + bias
    if positives is None:
        positives = torch.arange(n, device=x.device)
    z = -torch.ones(n, m, dtype=x.dtype, device=x.device)
    rows = (positives >= 0).nonzero().squeeze(1)
    z[rows, positives[rows]] = 1.0
    terms = -F.logsigmoid(z * x)
    if drop is not None:
        terms = terms.masked_fill(drop, 0.0)
    per_row = terms.sum(1)
    return {"mean": per_row.sum() / n, "sum": per_row.sum(), "none": per_row}[reduction]


def supcon(features: Tensor, labels: Tensor, extra_candidates: Optional[Tensor] = None,
           extra_labels: Optional[Tensor] = None, *, temperature: Temp = 0.1, variant: str = "out",
           margin: float = 0.0, similarity: str = "cosine", reduction: str = "mean") -> Tensor:
    """SupCon (Khosla et al. 2020) L_out / L_in on the view-major rows, self excluded, the
    margin subtracted from every positive similarity; rows without positive left out."""
    if features.dim() == 3:
        v = features.shape[1]
        z, y = torch.cat(torch.unbind(features, dim=1)), labels.repeat(v)
    else:
        z, y = features, labels
    k, yk = z, y
    if extra_candidates is not None:
        k, yk = torch.cat([z, extra_candidates]), torch.cat([y, extra_labels])
    sim = _norm(z, similarity) @ _norm(k, similarity).T
    n, m = sim.shape
    self_mask = torch.zeros(n, m, dtype=torch.bool, device=sim.device)
    self_mask[torch.arange(n), torch.arange(n)] = True
    pos = (y[:, None] == yk[None, :]) & ~self_mask
    x = (sim - margin * pos.to(sim.dtype)) / _t_rows(temperature, n)
    cnt = pos.sum(1)
    valid = cnt > 0
    den = torch.logsumexp(x.masked_fill(self_mask, NEG), 1)
    if variant == "out":
        rows = -((x - den[:, None]) * pos).sum(1) / cnt.clamp(min=1)
    else:
        rows = -(torch.logsumexp(x.masked_fill(~pos, NEG), 1) - torch.log(cnt.clamp(min=1).to(x.dtype)) - den)
    return _reduce(rows, valid, reduction)


def dcl(anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None,
        extra_candidates: Optional[Tensor] = None, *, temperature: Temp = 0.1, two_view: bool = False,
        weighted: bool = False, sigma: float = 0.5, similarity: str = "cosine", drop: Optional[Tensor] = None,
        reduction: str = "mean") -> Tensor:
    """DCL / DCLW (Yeh et al. 2022): InfoNCE with the positive (and self) out of the denominator;
    DCLW weights the positive term by ``2 - n softmax(sim_pos / sigma)`` (no gradient).
    ``drop`` (retrieval form): (N, M + E) entries of ``cat(candidates, extra)`` also left out
    of the denominators."""
    a, c = _norm(anchors, similarity), _norm(candidates, similarity)
    e = None if extra_candidates is None else _norm(extra_candidates, similarity)
    if two_view:
        if drop is not None:
            raise ValueError("drop= is for the retrieval form")
        n, b = a.shape[0], c
        z = torch.cat([a, b])
        k = z if e is None else torch.cat([z, e])
        idx = torch.arange(2 * n, device=z.device)
        index = (idx + n) % (2 * n)
        drop = torch.zeros(2 * n, k.shape[0], dtype=torch.bool, device=z.device)
        drop[idx, idx] = True
        drop[idx, index] = True
        sim = z @ k.T
        x = sim / _t_rows(temperature, 2 * n)
        pos = x.gather(1, index[:, None]).squeeze(1)
        if weighted:
            s = (a * b).sum(1).detach() / sigma
            w = 2 - n * torch.softmax(s, 0)
            pos = pos * torch.cat([w, w])
        rows = torch.logsumexp(x.masked_fill(drop, NEG), 1) - pos
        return _reduce(rows, torch.ones_like(rows, dtype=torch.bool), reduction)
    k = c if e is None else torch.cat([c, e])
    sim = a @ k.T
    x = sim / _t_rows(temperature, a.shape[0])
    if positives is None:
        positives = torch.arange(a.shape[0], device=x.device)
    valid = positives >= 0
    idx = positives.clamp(min=0)
    pos = x.gather(1, idx[:, None]).squeeze(1)
    out = torch.zeros_like(x, dtype=torch.bool) if drop is None else drop.clone()
    out[torch.arange(len(idx)), idx] = True
    # a row without positive and with nothing left (left out of the loss) keeps a finite
    # placeholder, so that autograd's logsumexp of all -inf gives no NaN gradient
    out &= ~(out.all(1, keepdim=True) & ~valid[:, None])
    lse = torch.logsumexp(x.masked_fill(out, NEG), 1)
    if weighted:
        s = sim.gather(1, idx[:, None]).squeeze(1).detach()[valid] / sigma
        w = torch.zeros_like(pos)
        w[valid] = 2 - int(valid.sum()) * torch.softmax(s, 0)
        pos = pos * w
    return _reduce(lse - pos, valid, reduction)


def _debiased_published(pos_sim: Tensor, neg_sim: Tensor, t, tau_plus: float, beta: float) -> Tensor:
    """Chuang et al. / Robinson et al.'s code on similarities: pos (R,), neg (R, Q) negatives only."""
    tcol = t if not isinstance(t, Tensor) or t.dim() == 0 else t
    trow = tcol.squeeze(1) if isinstance(tcol, Tensor) and tcol.dim() == 2 else tcol
    pos = torch.exp(pos_sim / trow)
    neg = torch.exp(neg_sim / tcol)
    n_neg = neg.shape[1]
    if beta > 0:
        imp = (beta * neg.log()).exp()
        reweight = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    else:
        reweight = neg.sum(dim=-1)
    ng = (-tau_plus * n_neg * pos + reweight) / (1 - tau_plus)
    tt = trow if isinstance(trow, Tensor) else torch.tensor(trow, dtype=pos.dtype, device=pos.device)
    ng = torch.maximum(ng, n_neg * torch.exp(-1 / tt))
    return -torch.log(pos / (pos + ng))


def debiased_contrastive(anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None,
                         extra_candidates: Optional[Tensor] = None, *, temperature: Temp = 0.5, tau_plus: float = 0.1,
                         beta: float = 0.0, two_view: bool = False, similarity: str = "cosine",
                         drop: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Debiased (Chuang et al. 2020; ``beta`` > 0: Robinson et al. 2021's hard-negative
    reweighting), exactly the published code (exponentials of the raw logits: small inputs
    and moderate temperatures only). ``drop`` (retrieval form): (N, M + E) entries of
    ``cat(candidates, extra)`` that are not negatives; each row then uses the published
    formula on its own negatives (Q = their number, per row)."""
    a, c = _norm(anchors, similarity), _norm(candidates, similarity)
    e = None if extra_candidates is None else _norm(extra_candidates, similarity)
    if two_view:
        if drop is not None:
            raise ValueError("drop= is for the retrieval form")
        n = a.shape[0]
        out = torch.cat([a, c])
        k = out if e is None else torch.cat([out, e])
        sim = out @ k.T
        keep = torch.ones(2 * n, k.shape[0], dtype=torch.bool, device=sim.device)
        idx = torch.arange(2 * n, device=sim.device)
        keep[idx, idx] = False
        keep[idx, (idx + n) % (2 * n)] = False
        neg = sim.masked_select(keep).view(2 * n, -1)
        pos = (a * c).sum(-1)
        rows = _debiased_published(torch.cat([pos, pos]), neg, _t_rows(temperature, 2 * n), tau_plus, beta)
        return _reduce(rows, torch.ones_like(rows, dtype=torch.bool), reduction)
    k = c if e is None else torch.cat([c, e])
    sim = a @ k.T
    if positives is None:
        positives = torch.arange(a.shape[0], device=sim.device)
    valid = positives >= 0
    rows_i = valid.nonzero().squeeze(1)
    s = sim[rows_i]
    idx = positives[rows_i]
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[torch.arange(len(rows_i)), idx] = False
    neg = s.masked_select(keep).view(len(rows_i), -1)
    pos = s.gather(1, idx[:, None]).squeeze(1)
    tt = _t_rows(temperature, a.shape[0])
    if isinstance(tt, Tensor) and tt.dim() == 2:
        tt = tt[rows_i]
    if drop is not None:  # each row's own negatives: a loop over the rows
        keep = ~drop[rows_i]
        keep[torch.arange(len(rows_i)), idx] = False
        per_row = []
        for r in range(len(rows_i)):
            t_r = tt[r:r + 1] if isinstance(tt, Tensor) and tt.dim() == 2 else tt
            per_row.append(_debiased_published(pos[r:r + 1], s[r][keep[r]][None, :], t_r, tau_plus, beta))
        got = torch.cat(per_row)
    else:
        got = _debiased_published(pos, neg, tt, tau_plus, beta)
    rows = torch.zeros(a.shape[0], dtype=got.dtype, device=got.device).index_copy(0, rows_i, got)
    return _reduce(rows, valid, reduction)


def hard_negative_contrastive(anchors: Tensor, candidates: Tensor, positives: Optional[Tensor] = None,
                              extra_candidates: Optional[Tensor] = None, *, temperature: Temp = 0.5,
                              beta: float = 1.0, tau_plus: float = 0.1, two_view: bool = False,
                              similarity: str = "cosine", drop: Optional[Tensor] = None,
                              reduction: str = "mean") -> Tensor:
    """Robinson et al. 2021: :func:`debiased_contrastive` with ``beta`` > 0."""
    return debiased_contrastive(anchors, candidates, positives, extra_candidates, temperature=temperature,
                                tau_plus=tau_plus, beta=beta, two_view=two_view, similarity=similarity,
                                drop=drop, reduction=reduction)


def cwcl(anchors: Tensor, candidates: Tensor, teacher: Optional[Tensor] = None,
         teacher_candidates: Optional[Tensor] = None, *, temperature: Temp = 0.07, symmetric: bool = False,
         similarity: str = "cosine", reduction: str = "mean") -> Tensor:
    """CWCL (Srinivasa et al. 2023): cross-entropy weighted by ``w_ij = (1 + cos(t_i, t'_j)) / 2``
    of a frozen teacher (default the candidates), normalised per row (per column when symmetric)."""
    if teacher is None:
        teacher = candidates
    if teacher_candidates is None:
        teacher_candidates = teacher
    x = logits(anchors, candidates, temperature, similarity)
    tr, tc = F.normalize(teacher.detach(), dim=-1), F.normalize(teacher_candidates.detach(), dim=-1)
    w = (1 + tr @ tc.T) / 2
    rows = -(w * torch.log_softmax(x, 1)).sum(1) / w.sum(1)
    if not symmetric:
        return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    cols = -(w * torch.log_softmax(x, 0)).sum(0) / w.sum(0)
    red = torch.mean if reduction == "mean" else torch.sum
    return 0.5 * (red(rows) + red(cols))


def icon(features: Tensor, labels: Optional[Tensor] = None, teacher: Optional[Tensor] = None, *,
         neighbors: Optional[int] = None, teacher_temperature: Optional[float] = None, kernel: str = "cosine",
         temperature: Temp = 0.1, sigma: Union[float, Tensor] = 1.0, reduction: str = "mean") -> Tensor:
    """I-Con (Alshammari et al. 2025): mean KL(p(.|i) || q(.|i)) over j != i with the learned
    kernel q and the supervision p (labels, a teacher's k-NN graph or its softmax)."""
    f = features
    n = f.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    if kernel == "cosine":
        x = logits(f, f, temperature, "cosine")
    elif kernel == "gaussian":
        x = -((f[:, None, :] - f[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2)
    else:
        x = -torch.log1p(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    logq = torch.log_softmax(x.masked_fill(eye, NEG), 1)
    if labels is not None:
        same = (labels[:, None] == labels[None, :]) & ~eye
        cnt = same.sum(1, keepdim=True)
        p = same.to(f.dtype) / cnt.clamp(min=1)
        valid = cnt.squeeze(1) > 0
    else:
        tn = F.normalize(teacher, dim=-1)
        s = tn @ tn.T
        if neighbors is not None:
            idx = s.masked_fill(eye, NEG).topk(neighbors, dim=1).indices
            p = torch.zeros(n, n, dtype=f.dtype, device=f.device).scatter_(1, idx, 1.0 / neighbors)
        else:
            p = torch.softmax((s / teacher_temperature).masked_fill(eye, NEG), 1)
        valid = torch.ones(n, dtype=torch.bool, device=f.device)
    kl = (torch.special.xlogy(p, p) - p * logq.masked_fill(eye, 0.0)).sum(1)
    return _reduce(kl, valid, reduction)


def multiview_info_nce(features: Tensor, *, temperature: Temp = 0.1, aggregation: str = "multi_positive",
                       similarity: str = "cosine", reduction: str = "mean") -> Tensor:
    """Multi-view InfoNCE on (N, V, d), rows sample-major (row i V + a is view a of sample i):
    ``multi_positive`` (SupCon L_out with the sample id as label; per view-anchor (N, V) for
    ``"none"``) or ``joint`` (Koromilas et al.'s MV-InfoNCE, one term per sample).
    A temperature per sample (N,) or per view (N, V) is allowed."""
    n, v, d = features.shape
    z = _norm(features.reshape(n * v, d), similarity)
    t = temperature
    if isinstance(t, Tensor) and t.dim() == 2:
        t = t.reshape(-1)
    elif isinstance(t, Tensor) and t.dim() == 1 and t.numel() == n and n > 1:
        t = t.repeat_interleave(v)
    x = z @ z.T / (t[:, None] if isinstance(t, Tensor) and t.dim() == 1 and t.numel() > 1 else
                   (t.reshape(()) if isinstance(t, Tensor) else t))
    eye = torch.eye(n * v, dtype=torch.bool, device=z.device)
    sid = torch.arange(n, device=z.device).repeat_interleave(v)
    pos = (sid[:, None] == sid[None, :]) & ~eye
    if aggregation == "multi_positive":
        logprob = x - torch.logsumexp(x.masked_fill(eye, NEG), 1, keepdim=True)
        per = (-(logprob * pos).sum(1) / (v - 1)).reshape(n, v)
        return per if reduction == "none" else per.mean() if reduction == "mean" else per.sum()
    e = torch.exp(x)
    neg = e.masked_fill(eye, 0).sum(1).reshape(n, v).sum(1)
    num = e.masked_fill(~pos, 0).sum(1).reshape(n, v).sum(1)
    per = -torch.log(num / neg)
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


def alignment(x: Tensor, y: Tensor, *, alpha: float = 2.0, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """Wang & Isola 2020: ``mean_i ||x_i - y_i||^alpha``."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    rows = (x - y).norm(p=2, dim=1).pow(alpha)
    return {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]


def uniformity(x: Tensor, *, t: float = 2.0, normalize: bool = True) -> Tensor:
    """Wang & Isola 2020: ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (their pdist code)."""
    if normalize:
        x = F.normalize(x, dim=-1)
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()


def align_uniform(x: Tensor, y: Tensor, *, alpha: float = 2.0, t: float = 2.0, uniformity_weight: float = 1.0,
                  normalize: bool = True) -> Tensor:
    """``alignment + lam * (uniformity(x) + uniformity(y)) / 2``."""
    return alignment(x, y, alpha=alpha, normalize=normalize) + uniformity_weight * 0.5 * (
        uniformity(x, t=t, normalize=normalize) + uniformity(y, t=t, normalize=normalize))
