"""Collectives with autograd, and the helpers every multi-process path shares.

- :func:`all_gather_with_grad`: concatenate a tensor of every rank (rank order); the
  backward sums the gradients of all ranks and hands each rank its slice.
- :func:`all_gather_rows`: the same without gradient (labels, teacher embeddings).
- :func:`global_value`: a rank's share of a loss turned into the whole-batch value on
  every rank, its gradient left as the share's.
- :func:`check_same_shapes`, :func:`average_gradients`, :func:`mean_over_ranks`,
  :func:`rank_and_world`.

Example (under ``torchrun``; with one process every function is the identity)::

    import torch, contrastkit as ck
    k = torch.randn(4, 8)
    k_all = ck.scale.all_gather_with_grad(k)         # (world * 4, 8)
"""

from __future__ import annotations

from typing import Iterable, List, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "rank_and_world",
    "check_same_shapes",
    "all_gather_with_grad",
    "all_gather_rows",
    "all_reduce_sum",
    "global_value",
    "average_gradients",
    "mean_over_ranks",
]


def rank_and_world(group=None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]


def check_same_shapes(group=None, **named: Tensor) -> None:
    """Exchange the shapes and dtypes of ``named`` tensors and raise the same ValueError on
    every rank when they differ (instead of a collective that hangs or mis-sizes).

    Example::

        import torch
        from contrastkit.scale import check_same_shapes
        q, k = torch.randn(4, 8), torch.randn(4, 8)
        check_same_shapes(anchors=q, candidates=k)   # one process: nothing to compare
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return
    rows = []
    for x in named.values():
        dims = list(x.shape)[:3] + [-1] * (3 - min(3, x.dim()))
        code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 9
        rows.append([x.dim(), *dims, code])
    mine = torch.tensor(rows, dtype=torch.long).reshape(len(rows), 5)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    for i, name in enumerate(named):
        seen = {tuple(e[i].tolist()) for e in everyone}
        if len(seen) > 1:
            desc = ", ".join(
                f"rank {r}: {tuple(d for d in e[i, 1:4].tolist() if d >= 0)[:int(e[i, 0])]} "
                f"{_DTYPES[int(e[i, 4])] if int(e[i, 4]) < len(_DTYPES) else 'other'}"
                for r, e in enumerate(everyone)
            )
            raise ValueError(f"ranks disagree on the shape or dtype of {name} ({desc}); every rank must "
                             "pass the same local batch size and embedding dimension")


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        rank, world = rank_and_world(group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate ``x`` (n, ...) of every rank (rank order) with autograd: the gradient
    a rank gets for its ``x`` is the sum over all ranks of their gradients for its rows.

    Every rank must pass the same shape (see :func:`check_same_shapes`).
    Example: ``k_all = all_gather_with_grad(k)  # (world * n, d)``
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    return _AllGather.apply(x, group)


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """Concatenate ``x`` (n, ...) of every rank (rank order), without gradient (labels,
    frozen teacher embeddings). Example: ``y_all = all_gather_rows(labels)``"""
    _, world = rank_and_world(group)
    if world == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum of a detached tensor over ranks (a copy; the input is left alone)."""
    _, world = rank_and_world(group)
    y = x.detach().clone()
    if world > 1:
        dist.all_reduce(y, group=group)
    return y


def global_value(share: Tensor, group=None) -> Tensor:
    """``share`` is this rank's part of a loss scaled so that the mean over ranks is the
    whole-batch loss (and DDP's gradient averaging gives the 1-process gradients). Return
    that mean on every rank, with the gradient of ``share`` (the rest is detached)."""
    _, world = rank_and_world(group)
    if world == 1:
        return share
    mean = all_reduce_sum(share, group) / world
    return share + (mean - share).detach()


def _params(params: Union[nn.Module, Iterable]) -> List[Tensor]:
    if isinstance(params, nn.Module):
        return list(params.parameters())
    out = []
    for p in params:
        out.extend(p.parameters() if isinstance(p, nn.Module) else [p])
    return out


def average_gradients(params: Union[nn.Module, Iterable], group=None) -> None:
    """All-reduce and average ``.grad`` over ranks (what DDP does), for parameters DDP does
    not own (a loss's learnable temperature) or a loop without DDP. Parameters without a
    gradient are treated as zero on that rank, so every rank makes the same calls.

    Example: ``average_gradients([encoder, loss_fn])``
    """
    _, world = rank_and_world(group)
    if world == 1:
        return
    for p in _params(params):
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad /= world


def mean_over_ranks(x: Tensor, group=None) -> Tensor:
    """The mean of a (detached) tensor over ranks. :class:`~contrastkit.scale.DistributedLoss`
    already returns the whole-batch value on every rank, so this is the identity on it."""
    _, world = rank_and_world(group)
    y = x.detach().clone()
    if world > 1:
        dist.all_reduce(y, group=group)
        y /= world
    return y
