"""Soft targets: CWCL and the I-Con KL form. Targets come from small inputs (labels,
frozen teacher embeddings) and are formed per tile or in closed form, never as an
N x M matrix.

**CWCL** (Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously
Weighted Contrastive Loss"). The cross-entropy of each anchor is weighted over all
candidates by the within-modality similarity of a frozen tower, normalised per row:

    w_ij   = (1 + cos(t_i, t'_j)) / 2                      (t, t': frozen teacher embeddings)
    loss_i = -1/(sum_j w_ij) sum_j w_ij log softmax_j(s x_i . y_j),       s = 1 / temperature

Because w is affine in the teacher dot product, ``sum_j w_ij x_i . y_j`` and
``sum_j w_ij`` have an exact closed form (O((N + M) d d_t), no tile); the
log-sum-exp is :func:`contrastkit.engine.tiled_logsumexp`. ``symmetric=True`` adds
the candidate -> anchor direction (weights normalised per column) and averages.

**I-Con** (Alshammari et al. 2025, "I-Con: A Unifying Framework for Representation
Learning"). The loss is the mean KL divergence between a supervisory conditional
p(j|i) and a learned conditional q(j|i), both over j != i:

    loss = 1/N sum_i KL(p(.|i) || q(.|i))
         = 1/N sum_i [ sum_j p_ij log p_ij - sum_j p_ij X_ij + log sum_{j != i} exp X_ij ]

with the learned kernel X_ij one of

    "cosine"     s cos(f_i, f_j)                      (s = 1 / temperature, per anchor allowed)
    "gaussian"   -||f_i - f_j||^2 / (2 sigma^2)
    "student_t"  -log(1 + ||f_i - f_j||^2)

and the supervision p one of

    labels=y                      uniform over the other samples with the same label
    teacher=t, neighbors=k        uniform over the k nearest neighbours of t_i (cosine), tiled top-k
    teacher=t, teacher_temperature=T   softmax_{j != i}(cos(t_i, t_j) / T)

Rows whose p is undefined (a label seen once) are left out of the mean. For labels
or a k-NN graph with a dot-product kernel (cosine, Gaussian) the target term is an
O(N d) mean of candidates and the denominator :func:`contrastkit.engine.tiled_logsumexp`;
otherwise (teacher softmax, Student-t) all three terms come from one pass over the
tiles (:func:`contrastkit.engine.tiled_pairwise.tiled_pairwise` with
:class:`~contrastkit.engine.tiled_pairwise.KernelStats`), p formed per tile from the
labels / neighbour lists / teacher rows.

Example::

    import torch, contrastkit as ck
    image_emb, text_emb = torch.randn(16, 8), torch.randn(16, 8)
    z, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    loss = ck.functional.cwcl(image_emb, text_emb, temperature=0.07)   # teacher = text tower
    loss = ck.functional.icon(z, labels=y, kernel="cosine", temperature=0.1)
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..engine import DiagonalMask, tiled_logsumexp
from ..engine.neighbors import tiled_topk
from ..engine.positives import dense_label_ids, label_positive_logits
from ..engine.tiled_pairwise import IndexWeights, KernelStats, LabelWeights, SoftmaxWeights, tiled_pairwise
from ..engine.tiling import TileSize
from ..validation import check_choice, check_embeddings, check_labels, check_pair, check_reduction, check_scale
from .base import Objective, Work
from .common import finish_rows, inverse_temperature, prepare, reduce_rows

__all__ = ["cwcl", "CWCL", "icon", "ICon", "ICON_KERNELS", "CWCL_CITATION", "ICON_CITATION"]

CWCL_CITATION = """@inproceedings{srinivasa2023cwcl,
  title     = {CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss},
  author    = {Srinivasa, Rakshith Sharma and Cho, Jaejin and Yang, Chouchang and Saidutta, Yashas Malur and
               Lee, Ching-Hua and Shen, Yilin and Jin, Hongxia},
  booktitle = {NeurIPS},
  year      = {2023},
  note      = {arXiv:2309.14580}
}"""

ICON_CITATION = """@inproceedings{alshammari2025icon,
  title     = {I-Con: A Unifying Framework for Representation Learning},
  author    = {Alshammari, Shaden and Hershey, John and Feldmann, Axel and Freeman, William T. and Hamilton, Mark},
  booktitle = {ICLR},
  year      = {2025},
  note      = {arXiv:2504.16929}
}"""

ICON_KERNELS = ("cosine", "gaussian", "student_t")


# --------------------------------------------------------------------------- CWCL


def _teacher(name: str, t: Tensor, n: int, like: Tensor) -> Tensor:
    check_embeddings(name, t)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have one row per {'anchor' if name == 'teacher' else 'candidate'} "
                         f"({n}), got {t.shape[0]} rows")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the embeddings are on {like.device}")
    return F.normalize(t.detach().to(like.dtype), dim=-1)


def cwcl(
    anchors: Tensor,
    candidates: Tensor,
    teacher: Optional[Tensor] = None,
    teacher_candidates: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 0.07,
    symmetric: bool = False,
    similarity: str = "cosine",
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """CWCL of ``anchors`` (N, d) (the tower being trained) against ``candidates`` (M, d); exact, tiled.

    Args:
        temperature: float, scalar tensor (learnable) or one per anchor (N,).
        teacher: frozen embeddings (N, d_t) of the anchors' samples in the teacher
            modality; default ``candidates`` itself, detached (the frozen tower's outputs;
            needs M == N).
        teacher_candidates: frozen embeddings (M, d_t) of the candidates; default
            ``teacher`` (needs M == N).
        symmetric: add the candidate -> anchor direction (weights normalised per column) and average.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per anchor; not with symmetric).

    Example::

        import torch, contrastkit as ck
        img, txt = torch.randn(8, 16), torch.randn(8, 16)
        ck.functional.cwcl(img, txt, temperature=0.07)     # weights from txt's own similarities
    """
    check_reduction(reduction, symmetric)
    q, k = prepare(similarity, anchors=anchors, candidates=candidates)
    n, m = q.shape[0], k.shape[0]
    if teacher is None and teacher_candidates is None:
        if m != n:
            raise ValueError(f"the default teacher (candidates itself) needs as many candidates as anchors, got "
                             f"N={n}, M={m}; pass teacher= and teacher_candidates=")
        teacher = candidates
    if teacher is None:
        raise ValueError("teacher_candidates needs teacher= (the frozen embeddings of the anchors' samples)")
    t_rows = _teacher("teacher", teacher, n, q)
    if teacher_candidates is None:
        if m != n:
            raise ValueError(f"teacher_candidates= is needed when N != M (got N={n}, M={m})")
        t_cols = t_rows
    else:
        t_cols = _teacher("teacher_candidates", teacher_candidates, m, q)
        check_pair("teacher", t_rows, "teacher_candidates", t_cols)
    sc = inverse_temperature(temperature, q)         # inside the engine's walk: q / t is never formed
    lse_r, lse_c = tiled_logsumexp(q, k, symmetric=symmetric, tile_size=tile_size, scale=sc)
    # rows: sum_j w_ij s_i q_i.k_j = s_i q_i . (sum_j k_j + (K^T T') t_i) / 2,  sum_j w_ij = (M + t_i . sum_j t'_j) / 2
    w_rows = 0.5 * (m + t_rows @ t_cols.sum(0))
    target = 0.5 * (k.sum(0) + t_rows @ (k.T @ t_cols).T)
    cross = (q * target).sum(-1) * sc
    valid = w_rows > 0
    row_losses = lse_r.to(cross.dtype) - cross / torch.where(valid, w_rows, torch.ones_like(w_rows))
    if not bool(valid.any()):
        raise ValueError("every anchor row has all-zero CWCL weights (teacher similarities all -1)")
    if not symmetric:
        return finish_rows(row_losses, valid, reduction)
    w_cols = 0.5 * (n + t_cols @ t_rows.sum(0))
    s_rows = sc.expand(n).to(q.dtype)
    # sum_i s_i q_i and sum_i s_i q_i t_i^T without forming the scaled rows
    target_c = 0.5 * (s_rows @ q + t_cols @ (q.T @ (t_rows * s_rows[:, None])).T)
    cross_c = (k * target_c).sum(-1)
    valid_c = w_cols > 0
    col_losses = lse_c.to(cross_c.dtype) - cross_c / torch.where(valid_c, w_cols, torch.ones_like(w_cols))
    return 0.5 * (reduce_rows(row_losses[valid], reduction) + reduce_rows(col_losses[valid_c], reduction))


class CWCL(Objective):
    """CWCL loss module: ``forward(anchors, candidates, teacher=None, teacher_candidates=None)``;
    see :func:`cwcl`.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.CWCL(temperature=0.07)
        speech, text = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)   # text: frozen tower
        loss_fn(speech, text).backward()
    """

    citation = CWCL_CITATION

    def __init__(self, *, temperature: float = 0.07, learn_temperature: bool = False, symmetric: bool = False,
                 similarity: str = "cosine", tile_size: TileSize = None, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, similarity=similarity,
                         tile_size=tile_size, reduction=reduction, symmetric=symmetric)

    @property
    def work(self) -> Work:
        return Work(rows=("anchors", "candidates"), frozen=("teacher", "teacher_candidates"), positives="soft",
                    weighted="teacher", symmetric=self.symmetric)

    def forward(self, anchors: Tensor, candidates: Tensor, teacher: Optional[Tensor] = None,
                teacher_candidates: Optional[Tensor] = None) -> Tensor:
        return cwcl(anchors, candidates, teacher, teacher_candidates, symmetric=self.symmetric, **self._settings())


# --------------------------------------------------------------------------- I-Con


def _sigma_squared(sigma: Union[float, Tensor], like: Tensor) -> Union[float, Tensor]:
    if isinstance(sigma, Tensor) and sigma.numel() != 1:
        raise ValueError(f"sigma must be a number or a scalar tensor, got shape {tuple(sigma.shape)}")
    check_scale("sigma", sigma, like=like, n_rows=1)
    if isinstance(sigma, Tensor):
        return sigma.to(like.dtype).reshape(()) ** 2
    return float(sigma) ** 2


def icon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    teacher: Optional[Tensor] = None,
    *,
    neighbors: Optional[int] = None,
    teacher_temperature: Optional[float] = None,
    kernel: str = "cosine",
    temperature: Union[float, Tensor] = 0.1,
    sigma: Union[float, Tensor] = 1.0,
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """I-Con: mean KL(p(.|i) || q(.|i)) over the rows of ``features`` (N, d); exact, tiled.

    Give exactly one supervision: ``labels`` (N,), or ``teacher`` (N, d_t) with
    ``neighbors=k`` (k-NN graph) or ``teacher_temperature=T`` (teacher softmax).

    Args:
        kernel: learned conditional: ``"cosine"`` (features L2-normalised, scaled by
            1 / ``temperature``: float, scalar tensor or one per row (N,)),
            ``"gaussian"`` (``sigma``: float or scalar tensor) or ``"student_t"``; the
            last two use the features as given.
        reduction: ``"mean"`` over rows with a defined p, ``"sum"``, or ``"none"``
            (per row, 0 where p is undefined).

    Example::

        import torch, contrastkit as ck
        z, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        ck.functional.icon(z, labels=y, kernel="cosine", temperature=0.5)
    """
    check_reduction(reduction)
    check_choice("kernel", kernel, ICON_KERNELS)
    check_embeddings("features", features)
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"I-Con needs at least 2 rows (the conditionals are over j != i), got {n}")
    dev = features.device
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32

    # --- supervision p(j|i), per tile
    given = [labels is not None, neighbors is not None, teacher_temperature is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one supervision: labels=, teacher= with neighbors=, "
                         "or teacher= with teacher_temperature=")
    entropy_from_op = False
    if labels is not None:
        if teacher is not None:
            raise ValueError("labels= and teacher= are two supervisions; give one")
        labels = check_labels("labels", labels, n, dev)
        rid, _, n_cls = dense_label_ids(labels, labels)
        count = (torch.bincount(rid, minlength=n_cls)[rid] - 1).to(acc)
        valid = count > 0
        if not bool(valid.any()):
            raise ValueError("no row has another sample with its label: p(j|i) is undefined for every row")
        row_scale = torch.where(valid, 1.0 / count.clamp(min=1), torch.zeros_like(count))
        weights = LabelWeights(rid, rid, row_scale, self_offset=0)
        neg_entropy = torch.where(valid, -torch.log(count.clamp(min=1)), torch.zeros_like(count))
    else:
        if teacher is None:
            raise ValueError("neighbors= and teacher_temperature= need teacher= (frozen embeddings, (N, d_t))")
        check_embeddings("teacher", teacher)
        if teacher.shape[0] != n:
            raise ValueError(f"teacher must have one row per feature row ({n}), got {teacher.shape[0]} rows")
        if teacher.device != dev:
            raise ValueError(f"teacher is on {teacher.device} but features are on {dev}")
        t = F.normalize(teacher.detach().to(acc), dim=-1)
        valid = torch.ones(n, dtype=torch.bool, device=dev)
        if neighbors is not None:
            if isinstance(neighbors, bool) or not isinstance(neighbors, int) or not 1 <= neighbors <= n - 1:
                raise ValueError(f"neighbors must be an int in [1, N-1={n - 1}], got {neighbors!r}")
            _, idx = tiled_topk(t, t, neighbors, self_offset=0, tile_size=tile_size)
            weights = IndexWeights(idx, torch.full((n,), 1.0 / neighbors, dtype=acc, device=dev))
            neg_entropy = torch.full((n,), -math.log(neighbors), dtype=acc, device=dev)
        else:
            check_scale("teacher_temperature", teacher_temperature)
            tq = t / float(teacher_temperature)
            with torch.no_grad():
                t_lse, _ = tiled_logsumexp(tq, t, masks=[DiagonalMask(0)], tile_size=tile_size)
            weights = SoftmaxWeights(tq, t, t_lse, self_offset=0)
            entropy_from_op = True
            neg_entropy = None

    # --- learned kernel X = f(U), U = q.k + r + c
    row_bias = col_bias = None
    sc = None  # the kernel's scale, applied inside the engine's walk
    if kernel == "cosine":
        z = l2_normalize(features)
        q, k, sc = z, z, inverse_temperature(temperature, z)
        op_kernel = "linear"
    elif kernel == "gaussian":
        s2 = _sigma_squared(sigma, features)
        sq = features.pow(2).sum(-1) / (-2.0 * s2)
        q, k, row_bias, col_bias, sc = features, features, sq, sq, 1.0 / s2
        op_kernel = "linear"
    else:
        sq = features.pow(2).sum(-1) * -0.5
        q, k, row_bias, col_bias = features, features, sq, sq
        op_kernel = "student_t"
    if op_kernel == "linear" and not entropy_from_op:
        # labels / k-NN with a dot-product kernel: the target term is O(N d) (a per-class
        # or per-neighbour-list mean of candidates), the denominator the tiled LSE.
        lse, _ = tiled_logsumexp(q, k, row_bias=row_bias, col_bias=col_bias, masks=[DiagonalMask(0)],
                                 tile_size=tile_size, scale=sc)
        lse = lse.to(features.dtype)
        if labels is not None:
            cross, _ = label_positive_logits(q, k, labels, labels, self_offset=0)
            cross = cross * sc
            if col_bias is not None:
                csum = torch.zeros(n_cls, dtype=col_bias.dtype, device=dev).index_add(0, rid, col_bias)
                cnt = count.to(col_bias.dtype).clamp(min=1)
                cross = cross + row_bias + (csum[rid] - col_bias) / cnt
        else:
            kbar = k[idx[:, 0]]
            for j in range(1, neighbors):
                kbar = kbar + k[idx[:, j]]
            cross = (q * kbar).sum(-1) * sc / neighbors
            if col_bias is not None:
                cross = cross + row_bias + col_bias[idx].mean(1)
    else:
        op = KernelStats(op_kernel, weights=weights, lse=True, weight_entropy=entropy_from_op)
        rows, _ = tiled_pairwise(q, k, op, row_bias=row_bias, col_bias=col_bias, masks=[DiagonalMask(0)],
                                 tile_size=tile_size, scale=sc)
        rows = rows.to(features.dtype)
        cross, lse = rows[0], rows[1]
        if entropy_from_op:
            neg_entropy = rows[2]
    per_row = neg_entropy.to(features.dtype) - cross + lse
    return finish_rows(per_row, valid, reduction)


class ICon(Objective):
    """I-Con loss module: ``forward(features, labels=None, teacher=None)``; see :func:`icon`.

    ``temperature`` / ``learn_temperature`` are the cosine kernel's; ``sigma`` the Gaussian's.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.ICon(kernel="student_t", neighbors=3)          # k-NN graph of a teacher
        x = torch.randn(16, 8)
        student = torch.nn.Linear(8, 4)
        loss_fn(student(x), teacher=x).backward()
    """

    citation = ICON_CITATION
    similarities = ("cosine", "dot")

    def __init__(self, *, kernel: str = "cosine", temperature: float = 0.1, learn_temperature: bool = False,
                 sigma: float = 1.0, neighbors: Optional[int] = None, teacher_temperature: Optional[float] = None,
                 tile_size: TileSize = None, reduction: str = "mean") -> None:
        check_choice("kernel", kernel, ICON_KERNELS)
        if neighbors is not None and teacher_temperature is not None:
            raise ValueError("give neighbors= or teacher_temperature=, not both")
        check_scale("sigma", sigma)
        super().__init__(temperature=temperature, learn_temperature=learn_temperature, tile_size=tile_size,
                         reduction=reduction)
        self.kernel = kernel
        self.sigma = float(sigma)
        self.neighbors, self.teacher_temperature = neighbors, teacher_temperature

    @property
    def work(self) -> Work:
        return Work(rows=("features",), labels=("labels",), frozen=("teacher",), positives="soft",
                    self_position=True, scale="temperature" if self.kernel == "cosine" else "kernel")

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, teacher: Optional[Tensor] = None) -> Tensor:
        neighbors, teacher_temperature = self.neighbors, self.teacher_temperature
        if labels is not None:
            neighbors = teacher_temperature = None
        elif teacher is not None and neighbors is None and teacher_temperature is None:
            raise ValueError("ICon got teacher= but was built without neighbors= or teacher_temperature=")
        settings = self._settings(kernel=self.kernel, sigma=self.sigma, neighbors=neighbors,
                                  teacher_temperature=teacher_temperature)
        settings.pop("similarity")
        return icon(features, labels, teacher, **settings)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, reduction={self.reduction!r}"
