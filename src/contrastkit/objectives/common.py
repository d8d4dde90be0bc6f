"""Pieces every objective shares: input preparation, the temperature, reductions.

An objective of the InfoNCE family is, per anchor row i,

    loss_i = -sum_j P_ij X_ij + log sum_j W_ij exp(X_ij)

The log-sum-exp is :func:`contrastkit.engine.tiled_logsumexp`; the target term is
an O(N d) gather (:func:`contrastkit.engine.positive_logits`). The functions here
glue them so that each objective module stays a thin spec.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..engine import DiagonalMask, IndexMask, TileMask, tiled_logsumexp_with_positives
from ..engine.tiling import TileSize
from ..validation import REDUCTIONS, check_embeddings, check_index, check_pair, check_choice, check_reduction, check_scale
from .base import SIMILARITIES, Temperature

__all__ = [
    "Temperature",
    "prepare",
    "reduce_rows",
    "index_target_loss",
    "check_reduction",
    "finish_rows",
    "leave_out_empty_rows",
    "EMPTY_ROWS",
    "EmptyRowsWarning",
    "EmptyRowsCount",
    "count_empty_rows",
    "default_positives",
    "inverse_temperature",
    "check_denominators",
    "SIMILARITIES",
]



def prepare(similarity: str, **named: Tensor) -> Tuple[Tensor, ...]:
    """Validate embeddings (shape, dtype, device, finiteness) and apply the kernel's
    per-row transform: L2 normalisation for ``"cosine"``, nothing for ``"dot"``."""
    check_choice("similarity", similarity, SIMILARITIES)
    items = list(named.items())
    for name, x in items:
        check_embeddings(name, x)
    for (a_name, a), (b_name, b) in zip(items, items[1:]):
        check_pair(a_name, a, b_name, b)
    if similarity == "cosine":
        return tuple(l2_normalize(x) for _, x in items)
    return tuple(x for _, x in items)


def inverse_temperature(temperature: Union[float, Tensor], like: Tensor) -> Tensor:
    """``1 / temperature`` as a 0-dim tensor or one per row (N,), for the engine's ``scale=``
    (differentiable in a tensor temperature), checked by
    :func:`~contrastkit.validation.check_scale`."""
    check_scale("temperature", temperature, like=like, n_rows=like.shape[0])
    if isinstance(temperature, Tensor):
        t = temperature.to(like.dtype)
        if t.dim() == 1 and t.numel() == like.shape[0] and like.shape[0] != 1:
            return 1.0 / t
        return 1.0 / t.reshape(())
    return torch.tensor(1.0 / float(temperature), dtype=like.dtype, device=like.device)


def reduce_rows(losses: Tensor, reduction: str) -> Tensor:
    """Mean / sum over the valid rows, or the per-row vector for ``"none"``."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_denominators(lse: Tensor, valid: Tensor, what: str) -> None:
    """Raise when a row that counts has an empty (``-inf``) denominator."""
    bad = valid & ~torch.isfinite(lse)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{what} {i} has every candidate masked out of the denominator")


def finish_rows(row_losses: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Reduce the valid rows; for ``"none"`` the per-row vector with 0 on invalid rows."""
    if reduction == "none":
        return torch.where(valid, row_losses, torch.zeros_like(row_losses))
    return reduce_rows(row_losses[valid], reduction)


EMPTY_ROWS = ("raise", "skip")


def leave_out_empty_rows(valid: Tensor, empty: Tensor, empty_rows: str, loss: str) -> Tensor:
    """The rows left in a loss whose denominator needs a negative (DCL, debiased): ``valid``
    (rows with a positive) less the ``empty`` rows (no negative left after the masks).

    ``empty_rows="raise"``: a valid empty row is a ValueError naming it. ``"skip"``: those
    rows leave the loss like rows without a positive (no value, no gradient) and a
    RuntimeWarning says how many; a batch where no row is left is still a ValueError. The
    training step of the main job uses ``"skip"``: a false-negative mask (the GISTEmbed
    guide) can empty a row in one batch, and a run must not stop there."""
    check_choice("empty_rows", empty_rows, EMPTY_ROWS)
    bad = valid & empty
    if not bool(bad.any()):
        return valid
    if empty_rows == "raise":
        raise ValueError(f"{loss}: anchor row {int(bad.nonzero()[0])} has no negative left in the denominator "
                         "after the masks (pass empty_rows='skip' to leave such rows out of the loss)")
    kept = valid & ~empty
    if not bool(kept.any()):
        raise ValueError(f"{loss}: no anchor row has both a positive and a negative left after the masks")
    skipped, rows = int(bad.sum()), int(valid.sum())
    warnings.warn(EmptyRowsWarning(f"{loss}: {skipped} of {rows} anchor row(s) had no negative left after the "
                                   "masks and were left out of the loss", skipped=skipped, rows=rows), stacklevel=3)
    return kept


class EmptyRowsWarning(RuntimeWarning):
    """The warning of ``empty_rows="skip"``: ``skipped`` of the ``rows`` anchor rows that had a
    positive were left out of the loss (no negative left after the masks)."""

    def __init__(self, message: str, *, skipped: int, rows: int) -> None:
        super().__init__(message)
        self.skipped, self.rows = int(skipped), int(rows)


@dataclass
class EmptyRowsCount:
    """What :func:`count_empty_rows` counted: anchor rows left out, over how many calls."""

    skipped: int = 0
    calls: int = 0


_REEMITTED: dict = {}  # the warnings registry of the warnings count_empty_rows passes on


@contextlib.contextmanager
def count_empty_rows() -> Iterator[EmptyRowsCount]:
    """Count the anchor rows ``empty_rows="skip"`` leaves out inside the block instead of
    showing an :class:`EmptyRowsWarning` for them (a training loop reports the count in its
    metrics); any other warning raised in the block is passed on as usual. The count is
    filled in when the block exits.

    Example::

        import torch, contrastkit as ck
        from contrastkit.engine import IndexMask
        from contrastkit.objectives.common import count_empty_rows
        a, b = torch.randn(3, 4), torch.randn(3, 4)
        # row 0 loses both its negatives (columns 1 and 2); -1 drops nothing
        drop = IndexMask(torch.tensor([[1, 2], [-1, -1], [-1, -1]]))
        with count_empty_rows() as count:
            loss = ck.losses.DCL(temperature=0.1)(a, b, masks=[drop], empty_rows="skip")
        assert count.skipped == 1 and count.calls == 1
    """
    count = EmptyRowsCount()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmptyRowsWarning)
        yield count
    for w in caught:
        if isinstance(w.message, EmptyRowsWarning):
            count.skipped += w.message.skipped
            count.calls += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_REEMITTED)


def default_positives(positives: Optional[Tensor], n: int, m: int, device: torch.device) -> Tensor:
    """The diagonal (anchor i <-> candidate i) unless positives are given."""
    if positives is not None:
        return positives
    if m < n:
        raise ValueError(
            f"default diagonal positives need at least as many candidates as anchors, got N={n}, M={m}; "
            "pass positives= explicitly"
        )
    return torch.arange(n, device=device)


def _scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """log sum of exp(values) grouped by ``index`` into ``size`` slots (-inf where empty)."""
    top = torch.full((size,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, index, values.detach(), reduce="amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, (values - top[index]).exp())
    return total.log() + top


def index_target_loss(
    q: Tensor,
    k: Tensor,
    index: Tensor,
    *,
    masks: Sequence[TileMask] = (),
    symmetric: bool = False,
    tile_size: TileSize = None,
    reduction: str = "mean",
    row_bias: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
) -> Tensor:
    """Cross-entropy of each row of ``s q k^T`` to one positive column (``-1``: none).

    ``scale`` (0-dim or (N,), from :func:`inverse_temperature`) is applied inside the
    engine, so ``q / t`` is never materialised; without it ``q`` is taken as already
    scaled. Rows without a positive are left out
    of the mean. With ``symmetric`` the column direction is added (CLIP): each column
    that is some row's positive is scored against all rows, and the two directions
    are averaged. One pass over the tiles computes both.

    ``shift`` (N,) lowers each row's positive logit, in the numerator and inside the
    denominator (additive margin, NT-Xent-AM: ``shift = margin / t``):

        loss_i = -(X_ip - shift_i) + log( exp(X_ip - shift_i) + sum_{j != p} exp(X_ij) )

    computed stably: the engine gives the log-sum-exp over the other entries (the
    positive masked) and the shifted positive is added back with ``logaddexp``, so
    nothing is subtracted from an exponential sum (no cancellation at small t).
    """
    check_reduction(reduction, symmetric)
    n, m = q.shape[0], k.shape[0]
    index = check_index("positives", index, n, m, q.device)
    valid = index >= 0
    if not bool(valid.any()):
        raise ValueError("no anchor row has a positive (every entry of positives is -1)")
    masks = list(masks)
    if shift is not None:  # the positive entries leave the denominator; a diagonal is the cheap mask
        diagonal = n <= m and bool((index == torch.arange(n, device=index.device)).all())
        masks.append(DiagonalMask(0) if diagonal else IndexMask(index))
    lse_r, lse_c, pos = tiled_logsumexp_with_positives(q, k, index, masks=masks, symmetric=symmetric,
                                                       tile_size=tile_size, row_bias=row_bias, scale=scale)
    if row_bias is not None:
        pos = pos + row_bias
    lse_r = lse_r.to(pos.dtype)
    if shift is not None:
        pos = pos - shift.to(pos.dtype)
        lse_r = torch.logaddexp(lse_r, pos)
    else:
        check_denominators(lse_r, valid, "anchor row")
    row_losses = finish_rows(lse_r - pos, valid, reduction)
    if not symmetric:
        return row_losses
    cols, vals = index[valid], pos[valid]
    col_pos = torch.zeros(m, dtype=pos.dtype, device=pos.device).index_add(0, cols, vals)
    col_count = torch.bincount(cols, minlength=m)
    has = col_count > 0
    lse_c = lse_c.to(pos.dtype)
    if shift is not None:
        lse_c = torch.logaddexp(lse_c, _scatter_logsumexp(vals, cols, m))
    else:
        check_denominators(lse_c, has, "candidate column")
    col_losses = lse_c[has] - col_pos[has] / col_count[has].to(pos.dtype)
    return 0.5 * (row_losses + reduce_rows(col_losses, reduction))
