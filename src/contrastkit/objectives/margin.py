"""Additive margin (NT-Xent-AM / AM-softmax style) on the positive logit.

With similarity ``sim``, temperature ``t`` and margin ``m`` (in similarity units), the
positive entry of row i becomes ``(sim_ip - m) / t`` everywhere it appears, in the
numerator and inside the denominator:

    loss_i = -(X_ip - m/t) + log( exp(X_ip - m/t) + sum_{j != p} exp(X_ij) )

Computed exactly and stably: the tiled engine gives the log-sum-exp over the negatives
only (the positive entry masked), and the shifted positive is added back with
``logaddexp``; no subtraction of exponentials, so no cancellation at small temperatures.

This module holds the shared loss; the public entry points are the ``margin=`` keyword
of :func:`~contrastkit.objectives.info_nce.info_nce`,
:func:`~contrastkit.objectives.ntxent.nt_xent` and
:func:`~contrastkit.objectives.supcon.supcon`.

Example::

    loss = ck.functional.info_nce(q, d, temperature=0.05, margin=0.1)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..engine import DiagonalMask, IndexMask, TileMask, positive_logits, tiled_logsumexp
from ..engine.tiling import TileSize
from ..engine.validation import check_index
from .common import REDUCTIONS, reduce_rows

__all__ = ["margin_index_target_loss"]


def margin_index_target_loss(
    q: Tensor,
    k: Tensor,
    index: Tensor,
    shift: Tensor,
    *,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy to one positive column per row whose logit is lowered by ``shift``.

    ``q`` is already scaled by the temperature and ``shift`` (N,) is ``margin / t_i``.
    Rows with ``index == -1`` are left out of the mean. With ``symmetric`` the column
    direction is added (the shifted entries are the same in both directions) and the
    two directions are averaged, as in :func:`~contrastkit.objectives.common.index_target_loss`.

    Example::

        margin_index_target_loss(q / t, k, torch.arange(len(q)), torch.full((len(q),), 0.2 / t))
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n, m = q.shape[0], k.shape[0]
    index = check_index("positives", index, n, m, q.device)
    valid = index >= 0
    if not bool(valid.any()):
        raise ValueError("no anchor row has a positive (every entry of positives is -1)")
    # the positive entries leave the denominator (a diagonal is the cheap mask for the common case)
    diagonal = n <= m and bool((index == torch.arange(n, device=index.device)).all())
    pos_mask = DiagonalMask(0) if diagonal else IndexMask(index)
    lse_r, lse_c = tiled_logsumexp(q, k, masks=[*masks, pos_mask], symmetric=symmetric,
                                   tile_size=tile_size)
    pos = positive_logits(q, k, index) - shift.to(q.dtype)
    den_r = torch.logaddexp(lse_r.to(pos.dtype), pos)
    row_losses = den_r - pos
    if not symmetric:
        if reduction == "none":
            return torch.where(valid, row_losses, torch.zeros_like(row_losses))
        return reduce_rows(row_losses[valid], reduction)
    if reduction == "none":
        raise ValueError("reduction='none' is not defined for symmetric losses (rows and columns differ)")
    cols = index[valid]
    vals = pos[valid]
    col_count = torch.bincount(cols, minlength=m)
    has = col_count > 0
    # log-sum-exp of the shifted positives of each column (scatter, stabilised by the max)
    cmax = torch.full((m,), float("-inf"), dtype=pos.dtype, device=pos.device)
    cmax = cmax.scatter_reduce(0, cols, vals.detach(), reduce="amax")
    cmax = torch.where(has, cmax, torch.zeros_like(cmax))
    csum = torch.zeros(m, dtype=pos.dtype, device=pos.device).index_add(0, cols, (vals - cmax[cols]).exp())
    csum = torch.where(has, csum, torch.ones_like(csum))
    pos_lse_c = csum.log() + cmax
    col_pos = torch.zeros(m, dtype=pos.dtype, device=pos.device).index_add(0, cols, vals)
    den_c = torch.logaddexp(lse_c.to(pos.dtype), pos_lse_c)
    col_losses = den_c[has] - col_pos[has] / col_count[has].to(pos.dtype)
    return 0.5 * (reduce_rows(row_losses[valid], reduction) + reduce_rows(col_losses, reduction))
