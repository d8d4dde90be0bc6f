"""Many processes: every objective across ranks, the whole-batch value and exact gradients.

:class:`DistributedLoss` reads the objective's :class:`~contrastkit.objectives.base.Work`
description (no list of types):

- objectives whose rows it can compute locally (``work.local == "index"``: InfoNCE / CLIP,
  MNRL, NT-Xent; ``"pairs"``: SigLIP) run this rank's anchors against every rank's
  candidates, gathered (``mode="gather"``, an autograd-aware all-gather) or passed round a
  ring (``mode="ring"``, where ``work.ring``); no rank forms more than its own rows of the
  logit matrix;
- every other objective (and the cases the local path does not cover: a symmetric loss
  with a margin or masks, ``reduction="none"``) gathers every per-row argument named in
  the description (rows with gradient; labels and frozen teacher rows without; index
  arguments offset by the rank's first row) and evaluates the objective on the whole
  batch on every rank: exact, the loss computed ``world`` times, the encoders not.

Scaling (the part libraries get wrong): every rank returns the whole-batch loss, and the
gradients are those of its share ``world * (its row losses) / (rows over all ranks)``, so
that DistributedDataParallel's gradient *averaging* gives every parameter, a learnable
temperature and bias included, exactly the gradient of one process on the concatenated
batch. (In the whole-batch path the all-gather's backward sums the ``world`` identical
gradients, which the averaging divides again.)

``masks=`` given to a wrapped objective are in the coordinates of the concatenated batch
(rank-order rows and columns, the layout one process would see).

Example (``torchrun --nproc-per-node 2 train.py``)::

    import os, torch, torch.distributed as dist, contrastkit as ck
    if "RANK" in os.environ:                    # under torchrun (run plainly: one process)
        dist.init_process_group("gloo")
    torch.manual_seed(0)                        # the same initial weights on every rank
    encoder = torch.nn.Linear(16, 8)
    loss_fn = ck.scale.DistributedLoss(ck.losses.InfoNCE(temperature=0.05, learn_temperature=True))
    opt = torch.optim.SGD([*encoder.parameters(), *loss_fn.parameters()], lr=0.1)
    q_local, d_local = torch.randn(8, 16), torch.randn(8, 16)   # local batch, same size on every rank
    loss = loss_fn(encoder(q_local), encoder(d_local))          # the loss of all ranks' rows
    loss.backward()
    ck.scale.average_gradients([encoder, loss_fn])              # or wrap both in one DDP module
    opt.step()
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine import IndexMask, TileMask, positive_logits, tiled_logsumexp
from ..engine.tiling import TileSize
from ..objectives.base import IndexRows, Work
from ..objectives.common import check_denominators, index_target_loss
from ..objectives.siglip import siglip
from .collectives import (
    all_gather_rows,
    all_gather_with_grad,
    all_reduce_sum,
    check_same_shapes,
    global_value,
    rank_and_world,
)
from .ring import ring_logsumexp, ring_siglip_sum

__all__ = ["DistributedLoss", "distributed_index_loss", "distributed_siglip", "MODES"]

MODES = ("gather", "ring")


class _GlobalRows(TileMask):
    """Masks written for the concatenated batch, applied to this rank's rows: local row
    segments ``(local_start, local_end, global_start)`` map onto the global rows."""

    def __init__(self, masks: Sequence[TileMask], segments: Sequence[Tuple[int, int, int]], n_global: int) -> None:
        self.masks, self.segments, self.n_global = tuple(masks), tuple(segments), n_global

    def check(self, n_rows, n_cols, device):
        for m in self.masks:
            m.check(self.n_global, n_cols, device)

    def touches(self, r0, r1, c0, c1):
        return True

    def apply_(self, x, r0, r1, c0, c1):
        for ls, le, gs in self.segments:
            a, b = max(r0, ls), min(r1, le)
            if a >= b:
                continue
            sub = x[a - r0:b - r0]
            ga, gb = gs + (a - ls), gs + (b - ls)
            for m in self.masks:
                if m.touches(ga, gb, c0, c1):
                    m.apply_(sub, ga, gb, c0, c1)


def _layout(blocks: Sequence[Tensor], rank: int, world: int) -> Tuple[Tensor, List[Tuple[int, int, int]]]:
    """Global position of each local row of ``cat(blocks)`` when every block is gathered on
    its own and the gathered blocks are concatenated: (map, contiguous segments)."""
    maps, segments, local, before = [], [], 0, 0
    for b in blocks:
        n = b.shape[0]
        start = world * before + rank * n
        maps.append(torch.arange(start, start + n, device=b.device))
        segments.append((local, local + n, start))
        local, before = local + n, before + n
    return torch.cat(maps), segments


def _to_global(index: Optional[Tensor], col_map: Tensor) -> Optional[Tensor]:
    if index is None:
        return None
    return torch.where(index >= 0, col_map[index.clamp(min=0)], torch.full_like(index, -1))


def _count(mask: Tensor, group) -> Tensor:
    return all_reduce_sum(mask.sum().to(torch.float64), group)


def _scaled(q: Tensor, scale: Tensor) -> Tensor:
    s = scale.to(q.dtype)
    return q * (s[:, None] if s.dim() == 1 else s)


def _index_share(rows: IndexRows, reduction: str, mode: str, group) -> Tensor:
    """This rank's share ``world * sum(row losses) / rows over all ranks`` (+ the column
    direction when symmetric) of an index-target loss."""
    rank, world = rank_and_world(group)
    q, k = rows.anchors, rows.candidates
    n = q.shape[0]
    valid = rows.positives >= 0
    shift = rows.margin * rows.scale.to(q.dtype).expand(n) if rows.margin else None
    if mode == "gather":
        col_map, _ = _layout(rows.candidate_blocks, rank, world)
        row_map, segments = _layout(rows.anchor_blocks, rank, world)
        k_all = torch.cat([all_gather_with_grad(b, group) for b in rows.candidate_blocks])
        masks: List[TileMask] = []
        if rows.self_index is not None:
            masks.append(IndexMask(_to_global(rows.self_index, col_map)))
        if rows.masks:
            masks.append(_GlobalRows(rows.masks, segments, world * n))
        row_sum = index_target_loss(q, k_all, _to_global(rows.positives, col_map), masks=masks, scale=rows.scale,
                                    shift=shift, tile_size=rows.tile_size, reduction="sum")
    else:
        qs = _scaled(q, rows.scale)
        own = [IndexMask(rows.self_index)] if rows.self_index is not None else []
        if shift is not None:
            own.append(IndexMask(rows.positives))
        lse = ring_logsumexp(qs, k, group=group, own_masks=own, tile_size=rows.tile_size)
        pos = positive_logits(qs, k, rows.positives)
        lse = lse.to(pos.dtype)
        if shift is not None:
            pos = pos - shift.to(pos.dtype)
            lse = torch.logaddexp(lse, pos)
        else:
            check_denominators(lse, valid, "anchor row")
        row_sum = torch.where(valid, lse - pos, torch.zeros_like(pos)).sum()
    n_valid = _count(valid, group)
    if float(n_valid) == 0:
        raise ValueError("no anchor row on any rank has a positive")
    share = row_sum * world if reduction == "sum" else row_sum * (world / n_valid).to(row_sum.dtype)
    if not rows.symmetric:
        return share
    # column direction: each local candidate that is some local row's positive, against all anchors
    qs = _scaled(q, rows.scale)
    m = k.shape[0]
    cols = rows.positives[valid]
    pos = positive_logits(qs, k, rows.positives)
    col_pos = torch.zeros(m, dtype=pos.dtype, device=pos.device).index_add(0, cols, pos[valid])
    col_count = torch.bincount(cols, minlength=m)
    has = col_count > 0
    if mode == "gather":
        lse_c = tiled_logsumexp(k, all_gather_with_grad(qs, group), tile_size=rows.tile_size)[0]
    else:
        lse_c = ring_logsumexp(k, qs, group=group, tile_size=rows.tile_size)
    check_denominators(lse_c, has, "candidate column")
    col_terms = lse_c.to(pos.dtype) - col_pos / col_count.clamp(min=1).to(pos.dtype)
    col_sum = torch.where(has, col_terms, torch.zeros_like(col_terms)).sum()
    n_cols = _count(has, group)
    col_share = col_sum * world if reduction == "sum" else col_sum * (world / n_cols).to(col_sum.dtype)
    return 0.5 * (share + col_share)


def distributed_index_loss(qs: Tensor, k: Tensor, positives: Tensor, *, mode: str = "gather", group=None,
                           symmetric: bool = False, self_offset: Optional[int] = None,
                           tile_size: TileSize = None) -> Tensor:
    """The rank's share of an InfoNCE-family loss with one positive per row.

    ``qs`` (n, d) local anchors already scaled by 1 / temperature, ``k`` (m, d) local
    candidates, ``positives`` (n,) local column of each anchor's positive (-1: none),
    ``self_offset``: drop entry (i, i + self_offset) of the rank's own candidates.
    Returns ``world * sum(local row losses) / (valid rows over all ranks)`` (and the same
    for the column direction when ``symmetric``, the two averaged): the mean over ranks is
    the 1-rank loss on the concatenated batch.

    Example (one process: the plain loss)::

        import torch
        from contrastkit.scale import distributed_index_loss
        q, k = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), torch.randn(4, 8)
        distributed_index_loss(q / 0.1, torch.nn.functional.normalize(k, dim=-1), torch.arange(4))
    """
    self_index = None
    if self_offset is not None:
        self_index = torch.arange(qs.shape[0], device=qs.device) + self_offset
    rows = IndexRows([qs], [k], positives, torch.ones((), dtype=qs.dtype, device=qs.device), self_index=self_index,
                     symmetric=symmetric, tile_size=tile_size)
    return _index_share(rows, "mean", mode, group)


def distributed_siglip(x: Tensor, y: Tensor, temperature: Tensor, bias: Tensor, *, positives: Optional[Tensor] = None,
                       mode: str = "gather", group=None, tile_size: TileSize = None,
                       reduction: str = "mean") -> Tensor:
    """The rank's share of SigLIP over the whole batch: its ``n`` rows against every rank's
    candidates (``positives`` index its own block, default the diagonal), summed and
    divided by ``n`` (``reduction="mean"``), so that the mean over ranks is the 1-rank loss
    ``sum over all pairs / N``. ``x``, ``y`` prepared (normalised) local rows.

    Example (one process: the plain loss)::

        import torch
        from contrastkit.scale import distributed_siglip
        x, y = torch.randn(4, 8), torch.randn(4, 8)
        distributed_siglip(x, y, torch.tensor(0.1), torch.tensor(-10.0))
    """
    rank, world = rank_and_world(group)
    n, m = x.shape[0], y.shape[0]
    if positives is None:
        positives = torch.arange(n, device=x.device)
    t = temperature.to(x.dtype).reshape(())
    b = (bias if isinstance(bias, Tensor) else torch.tensor(float(bias), device=x.device)).to(x.dtype).reshape(())
    if mode == "gather":
        y_all = all_gather_with_grad(y, group)
        pos = torch.where(positives >= 0, positives + rank * m, positives)
        total = siglip(x, y_all, pos, temperature=t, bias=b, similarity="dot", tile_size=tile_size, reduction="sum")
    else:
        total = ring_siglip_sum(x, y, t, b, positives, group=group, tile_size=tile_size)
    return total * world if reduction == "sum" else total / n


class DistributedLoss(nn.Module):
    """Run any ``ck.losses`` objective across ranks: the whole-batch value on every rank and,
    after DDP's gradient averaging, the gradients of one process on the concatenated batch.

    The objective is called exactly as without this wrapper (same arguments, local rows);
    its :class:`~contrastkit.objectives.base.Work` says which arguments are per-row batch
    tensors (gathered), labels / teacher rows (gathered without gradient), indices
    (offset by the rank's start) and shared (a queue, passed as is). With one process (or
    torch.distributed not initialised) it is the objective itself. Every rank must pass
    the same local shapes; otherwise every rank raises the same ValueError (the shapes are
    exchanged first).

    Args:
        objective: a module with a ``work`` description (every ``ck.losses`` objective);
            its parameters (temperature, bias) stay in it.
        mode: ``"gather"`` (all-gather with grad) or ``"ring"`` (candidate blocks passed
            round; where ``objective.work.ring``: InfoNCE, MNRL, NT-Xent, SigLIP).
        group: process group (default: the world).

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.scale.DistributedLoss(ck.losses.InfoNCE(temperature=0.05, symmetric=True))
        loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))   # one process: the plain loss
    """

    def __init__(self, objective: nn.Module, *, mode: str = "gather", group=None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        work = getattr(objective, "work", None)
        if not isinstance(work, Work):
            raise ValueError(
                f"DistributedLoss needs an objective that describes its work (a ck.losses module, or any module "
                f"with a `work` property returning contrastkit.objectives.base.Work); {type(objective).__name__} "
                "has none"
            )
        if mode == "ring" and not work.ring:
            raise ValueError(f"{type(objective).__name__} offers no ring mode (its work has ring=False); "
                             "use mode='gather'")
        self.objective, self.mode, self.group = objective, mode, group
        self._signature = inspect.signature(objective.forward)

    def forward(self, *args, **kwargs) -> Tensor:
        obj = self.objective
        _, world = rank_and_world(self.group)
        if world == 1:
            return obj(*args, **kwargs)
        work: Work = obj.work
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(f"{type(obj).__name__}: {err}") from None
        reduction = getattr(obj, "reduction", "mean")
        local = work.local if reduction in ("mean", "sum") else None
        if local == "index" and work.symmetric and (work.margin or bound.arguments.get("masks")):
            local = None  # the column direction with a margin / masks: whole batch
        if local == "pairs" and bound.arguments.get("masks"):
            local = None  # masks index the concatenated batch: SigLIP on the whole batch
        if self.mode == "ring" and local is None:
            raise ValueError(f"{type(obj).__name__} with these settings (symmetric with a margin or masks, or "
                             f"reduction={reduction!r}) has no ring path; use mode='gather'")
        if local == "index":
            rows = obj.index_rows(*bound.args, **bound.kwargs)
            self._check_shapes({**{f"anchors[{i}]": b for i, b in enumerate(rows.anchor_blocks)},
                                **{f"candidates[{i}]": b for i, b in enumerate(rows.candidate_blocks)}})
            if self.mode == "ring" and rows.masks:
                raise ValueError("masks= are not offered in ring mode (they index the concatenated batch); "
                                 "use mode='gather'")
            return global_value(_index_share(rows, reduction, self.mode, self.group), self.group)
        if local == "pairs":
            x, y, positives, temperature, bias = obj.pair_rows(*bound.args, **bound.kwargs)
            self._check_shapes({"anchors": x, "candidates": y})
            share = distributed_siglip(x, y, temperature, bias, positives=positives, mode=self.mode,
                                       group=self.group, tile_size=getattr(obj, "tile_size", None),
                                       reduction=reduction)
            return global_value(share, self.group)
        whole = self._whole_batch(bound, work)
        return obj(*whole.args, **whole.kwargs)

    def _check_shapes(self, named) -> None:
        check_same_shapes(self.group, **{k: (v if isinstance(v, Tensor) else torch.zeros(0)) for k, v in named.items()})

    def _whole_batch(self, bound: inspect.BoundArguments, work: Work) -> inspect.BoundArguments:
        """Replace every per-row argument by its concatenation over ranks (see :class:`Work`)."""
        rank, _ = rank_and_world(self.group)
        params = self._signature.parameters
        rows = {r.lstrip("*") for r in work.rows}
        plain = set(work.labels) | set(work.frozen)
        described = rows | plain | set(work.index) | set(work.shared)
        named = {}
        for name, value in bound.arguments.items():
            if name in rows and params[name].kind == inspect.Parameter.VAR_POSITIONAL:
                named.update({f"{name}[{i}]": v for i, v in enumerate(value)})
            elif name in described - set(work.shared):
                named[name] = value
            elif isinstance(value, Tensor) or (name not in described and _holds_tensor(value)):
                raise ValueError(
                    f"{type(self.objective).__name__}.forward argument {name!r} is not described in its work "
                    "(rows / labels / frozen / index / shared): DistributedLoss cannot tell whether to gather it"
                )
        self._check_shapes(named)
        new = {}
        for name, value in bound.arguments.items():
            if value is None or name in work.shared:
                new[name] = value
            elif name in rows:
                if params[name].kind == inspect.Parameter.VAR_POSITIONAL:
                    new[name] = tuple(all_gather_with_grad(v, self.group) for v in value)
                else:
                    new[name] = all_gather_with_grad(value, self.group)
            elif name in plain:
                new[name] = all_gather_rows(value, self.group)
            elif name in work.index:
                target = bound.arguments.get(work.index[name])
                m = target.shape[0] if isinstance(target, Tensor) else 0
                offset = torch.where(value >= 0, value + rank * m, value)
                new[name] = all_gather_rows(offset, self.group)
            else:
                new[name] = value
        return inspect.BoundArguments(self._signature, new)


def _holds_tensor(value) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value)
