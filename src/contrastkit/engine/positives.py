"""The numerator of the InfoNCE family: sum_j P_ij X_ij in O((N + M) d), no tile.

For the scaled dot kernel X_ij = q_i . k_j is linear in k_j, so the positive term
of a row is q_i . (sum_j P_ij k_j). With one positive column it is a gather; with
positives given by label equality it is a per-class sum of candidates.

Example::

    import torch
    from contrastkit.engine import label_positive_logits, positive_logits
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    pos = positive_logits(q, k, torch.arange(len(q)))         # diagonal positives
    assert torch.allclose(pos, (q * k).sum(-1))
    z, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 1, 2])
    mean_pos, count = label_positive_logits(z, z, y, y, self_offset=0)
    assert count.tolist() == [1, 1, 2, 2, 2, 0]              # same-label others per row
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["positive_logits", "label_positive_logits", "dense_label_ids"]


def _rowwise_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` as a batched matmul: no N x d product is materialised."""
    return torch.bmm(a.unsqueeze(1), b.to(a.dtype).unsqueeze(2)).reshape(a.shape[0])


def positive_logits(q: Tensor, k: Tensor, index: Tensor) -> Tensor:
    """``q_i . k_{index_i}`` per row (0 where ``index_i == -1``), differentiable.

    Diagonal positives (the common case) read ``k[:N]`` as a view: no gather copy.
    """
    n = q.shape[0]
    if n <= k.shape[0] and bool((index == torch.arange(n, device=index.device)).all()):
        return _rowwise_dot(q, k[:n])
    out = _rowwise_dot(q, k[index.clamp(min=0)])
    return torch.where(index >= 0, out, torch.zeros_like(out))


def dense_label_ids(row_labels: Tensor, col_labels: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Map arbitrary integer labels of rows and columns onto 0..C-1 consistently."""
    uniq, inv = torch.unique(torch.cat([row_labels, col_labels]), return_inverse=True)
    n = row_labels.shape[0]
    return inv[:n], inv[n:], int(uniq.numel())


def label_positive_logits(
    q: Tensor,
    k: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    *,
    self_offset: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Mean positive logit per row when the positives of row i are the columns with
    its label (column ``i + self_offset``, the anchor itself, excluded).

    Returns ``(mean_logit (N,), count (N,))``; rows without positive get 0 and count 0.
    """
    rid, cid, n_classes = dense_label_ids(row_labels, col_labels)
    n, m = q.shape[0], k.shape[0]
    k_sum = torch.zeros(n_classes, k.shape[1], dtype=k.dtype, device=k.device).index_add(0, cid, k)
    counts = torch.bincount(cid, minlength=n_classes)
    pos_sum = k_sum[rid]
    count = counts[rid].clone()
    if self_offset is not None:
        rows = torch.arange(n, device=q.device)
        cols = rows + self_offset
        inside = (cols >= 0) & (cols < m)
        if bool(inside.any()):
            r_in, c_in = rows[inside], cols[inside]
            same = rid[r_in] == cid[c_in]
            r_in, c_in = r_in[same], c_in[same]
            sub = torch.zeros_like(pos_sum).index_add(0, r_in, k[c_in])
            pos_sum = pos_sum - sub
            count = count - torch.bincount(r_in, minlength=n)
    total = (q * pos_sum.to(q.dtype)).sum(-1)
    mean = total / count.clamp(min=1).to(total.dtype)
    return torch.where(count > 0, mean, torch.zeros_like(mean)), count
