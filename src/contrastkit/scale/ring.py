"""Ring passing: candidate blocks travel rank to rank (``isend``/``irecv``, the next block
in flight while the current one is computed); each rank holds its own rows plus two
blocks in transit, never the gathered matrix. The backward sends the blocks round again
with their gradient accumulators, so each rank ends with the sum over ranks of the
gradients for its own candidates.

- :func:`ring_logsumexp`: row log-sum-exp of local anchors against every rank's candidates.
- :func:`ring_siglip_sum`: the sum of SigLIP's pairwise terms of local anchors against
  every rank's candidates (positives in the rank's own block).

Example (under ``torchrun``; with one process it is the local log-sum-exp)::

    import torch
    from contrastkit.scale.ring import ring_logsumexp
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    lse = ring_logsumexp(q / 0.1, k)      # == logsumexp(q / 0.1 @ all_gather(k).T, 1)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import DiagonalMask, TileMask, tiled_logsumexp
from ..engine.tiling import TileSize
from ..objectives.siglip import siglip
from .collectives import rank_and_world

__all__ = ["ring_logsumexp", "ring_siglip_sum"]


def _neighbours(group) -> Tuple[int, int, int, int]:
    rank, world = rank_and_world(group)
    to_, from_ = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        to_, from_ = dist.get_global_rank(group, to_), dist.get_global_rank(group, from_)
    return rank, world, to_, from_


def _exchange(send: Tensor, to_: int, from_: int, group, tag: int):
    """Post the send of ``send`` to the next rank and the receive from the previous one."""
    buf = torch.empty_like(send)
    reqs = [dist.isend(send, to_, group=group, tag=tag), dist.irecv(buf, from_, group=group, tag=tag)]
    return buf, reqs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _block_lse(q: Tensor, k: Tensor, masks: Sequence[TileMask], tile_size: TileSize) -> Tensor:
    return tiled_logsumexp(q, k, masks=list(masks), tile_size=tile_size)[0]


def _ring_blocks(k: Tensor, group, tag: int):
    """Yield ``(step, block)``: the rank's own ``k`` first, then each other rank's as it
    arrives round the ring; the next block is already in flight while one is used."""
    _, world, to_, from_ = _neighbours(group)
    cur = k.detach().contiguous()
    for s in range(world):
        reqs = None
        if s < world - 1:
            nxt, reqs = _exchange(cur, to_, from_, group, tag=tag)
        yield s, cur
        if reqs is not None:
            _wait(reqs)
            cur = nxt


def _ring_block_gradients(k: Tensor, group, tags: Tuple[int, int], block_grad) -> Tensor:
    """Walk the blocks of ``k`` round the ring again for a backward: ``block_grad(step,
    block)`` returns this rank's gradient for the block it holds (or None); that gradient
    joins the block's accumulator, which travels one step behind the block, so that each
    rank ends with the sum over ranks of the gradients for its own ``k``."""
    _, world, to_, from_ = _neighbours(group)
    acc_in, acc_reqs, in_flight = None, None, []
    for s, cur in _ring_blocks(k, group, tags[0]):
        gk = block_grad(s, cur)
        gk = torch.zeros_like(cur) if gk is None else gk
        if s > 0:
            _wait(acc_reqs)
            gk = acc_in + gk
        if world > 1:
            acc_in, acc_reqs = _exchange(gk.contiguous(), to_, from_, group, tag=tags[1])
            in_flight.append(gk)  # keep the sent buffer alive until its send completes
        else:
            acc_in = gk
    if world > 1:
        _wait(acc_reqs)
    return acc_in


class _RingLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, group, own_masks, tile_size):
        qd, lse = q.detach(), None
        for s, cur in _ring_blocks(k, group, tag=0):
            l = _block_lse(qd, cur, own_masks if s == 0 else (), tile_size)
            lse = l if lse is None else torch.logaddexp(lse, l)
        ctx.save_for_backward(q, k, lse)
        ctx.group, ctx.own_masks, ctx.tile_size = group, own_masks, tile_size
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, lse = ctx.saved_tensors
        group, own_masks, tile_size = ctx.group, ctx.own_masks, ctx.tile_size
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = torch.zeros_like(q) if need_q else None
        g = g.detach()

        def block_grad(s, cur):
            with torch.enable_grad():
                qq = q.detach().requires_grad_(True)
                kk = cur.detach().requires_grad_(True)
                l = _block_lse(qq, kk, own_masks if s == 0 else (), tile_size)
                # d lse / d lse_block = exp(lse_block - lse): the block's share of the row
                w = torch.where(torch.isfinite(l), (l - lse.to(l.dtype)).exp(), torch.zeros_like(l)) * g.to(l.dtype)
                gq, gk = torch.autograd.grad(l, (qq, kk), grad_outputs=w, allow_unused=True)
            if dq is not None and gq is not None:
                dq.add_(gq)
            return gk

        dk = _ring_block_gradients(k, group, (1, 2), block_grad)
        return dq, dk if need_k else None, None, None, None


def ring_logsumexp(q: Tensor, k: Tensor, *, group=None, self_offset: Optional[int] = None,
                   own_masks: Sequence[TileMask] = (), tile_size: TileSize = None) -> Tensor:
    """Row log-sum-exp of ``q`` (local rows) against the ``k`` rows of every rank, passing
    candidate blocks round a ring; differentiable in ``q`` and ``k`` (each rank gets the
    sum over ranks of the gradient for its own ``k``).

    ``own_masks`` drop entries of the rank's *own* block (self similarity, the positive);
    ``self_offset`` is shorthand for ``own_masks=[DiagonalMask(self_offset)]``. Each block
    is walked by the tiled engine; the backward recomputes it.

    Example: ``lse = ring_logsumexp(q / t, k)   # == logsumexp(q/t @ all_gather(k).T, 1)``
    """
    masks = tuple(own_masks) + ((DiagonalMask(self_offset),) if self_offset is not None else ())
    _, world = rank_and_world(group)
    if world == 1:
        return _block_lse(q, k, masks, tile_size)
    return _RingLSE.apply(q, k, group, masks, tile_size)


def _siglip_block(x, y, temperature, bias, positives, tile_size) -> Tensor:
    return siglip(x, y, positives, temperature=temperature, bias=bias, similarity="dot",
                  tile_size=tile_size, reduction="sum")


class _RingSigLIP(torch.autograd.Function):
    """Sum of SigLIP's pairwise terms of the local rows against every rank's candidates,
    the candidate blocks passed round the ring; the backward recomputes each block and
    sends its candidate gradient on with it, so it ends at its owner."""

    @staticmethod
    def forward(ctx, x, y, temperature, bias, positives, group, tile_size):
        none = torch.full_like(positives, -1)
        total = None
        for s, cur in _ring_blocks(y, group, tag=3):
            part = _siglip_block(x.detach(), cur, temperature.detach(), bias.detach(),
                                 positives if s == 0 else none, tile_size)
            total = part if total is None else total + part
        ctx.save_for_backward(x, y, temperature, bias, positives)
        ctx.group, ctx.tile_size = group, tile_size
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, temperature, bias, positives = ctx.saved_tensors
        group, tile_size = ctx.group, ctx.tile_size
        none = torch.full_like(positives, -1)
        dx, dt, db = torch.zeros_like(x), torch.zeros_like(temperature), torch.zeros_like(bias)

        def block_grad(s, cur):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in (x, cur, temperature, bias)]
                part = _siglip_block(*leaves, positives if s == 0 else none, tile_size)
                gx, gy, gt, gb = torch.autograd.grad(part, leaves, grad_outputs=g, allow_unused=True)
            for acc, grad in ((dx, gx), (dt, gt), (db, gb)):
                if grad is not None:
                    acc.add_(grad)
            return gy

        dy = _ring_block_gradients(y, group, (4, 5), block_grad)
        return dx, dy, dt, db, None, None, None


def ring_siglip_sum(x: Tensor, y: Tensor, temperature: Tensor, bias: Tensor, positives: Tensor, *,
                    group=None, tile_size: TileSize = None) -> Tensor:
    """Sum over the local rows ``x`` (prepared) of SigLIP's terms against every rank's ``y``
    blocks; ``positives`` index the rank's own block (-1: none). Differentiable in x, y,
    temperature and bias (0-d tensors)."""
    _, world = rank_and_world(group)
    if world == 1:
        return _siglip_block(x, y, temperature, bias, positives, tile_size)
    return _RingSigLIP.apply(x, y, temperature, bias, positives, group, tile_size)
