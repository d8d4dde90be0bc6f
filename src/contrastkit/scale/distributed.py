"""Many processes: every rank's anchors against every rank's candidates, exact gradients.

Each rank computes the loss of its own anchors against the candidates of all ranks
(the tiled engine walks them), so no rank ever forms more than its own rows of the
logit matrix. Two ways to see the other ranks' candidates:

- ``mode="gather"``: an autograd-aware all_gather (:func:`all_gather_with_grad`); the
  backward sums the candidate gradients of all ranks and hands each rank its slice.
  The rank's own block starts at column ``rank * local_rows``.
- ``mode="ring"``: candidate blocks travel rank to rank (``isend``/``irecv``, the
  next block in flight while the current one is computed); each rank holds its own
  rows plus two blocks in transit, never the gathered matrix. The backward sends the
  blocks round again with their gradient accumulators (:func:`ring_logsumexp`).

Scaling (the part libraries get wrong): rank r returns
``L_r = world * (sum of its row losses) / (rows with a positive, over all ranks)``.
Averaged over ranks this is the 1-rank loss of the concatenated batch, and with
DistributedDataParallel's gradient *averaging* every parameter gradient, a learnable
temperature included, equals the 1-rank gradient. Report ``mean_over_ranks(loss)``.

Example (``torchrun --nproc-per-node 2 train.py``)::

    dist.init_process_group("gloo")
    loss_fn = ck.scale.DistributedLoss(ck.losses.InfoNCE(temperature=0.05, learn_temperature=True))
    model = DDP(TwoThings(encoder, loss_fn))            # or average_gradients(...) by hand
    loss = loss_fn(encoder(q_local), encoder(d_local))  # local batch, same size on every rank
    loss.backward()
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine import DiagonalMask, positive_logits, tiled_logsumexp
from ..engine.tiling import TileSize
from ..engine.validation import check_index
from ..objectives.common import prepare, scale_rows
from ..objectives.info_nce import InfoNCE
from ..objectives.mnrl import MultipleNegativesRanking, _flatten_negatives
from ..objectives.ntxent import NTXent
from ..objectives.siglip import SigLIP, siglip

__all__ = [
    "DistributedLoss",
    "all_gather_with_grad",
    "ring_logsumexp",
    "distributed_siglip",
    "check_same_shapes",
    "average_gradients",
    "mean_over_ranks",
    "rank_and_world",
]

MODES = ("gather", "ring")


def rank_and_world(group=None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def check_same_shapes(group=None, **named: Tensor) -> None:
    """Exchange the shapes and dtypes of ``named`` tensors and raise the same ValueError on
    every rank when they differ (instead of a collective that hangs or mis-sizes).

    Example::

        check_same_shapes(anchors=q, candidates=k)
    """
    rank, world = rank_and_world(group)
    if world == 1:
        return
    rows = []
    for x in named.values():
        dims = list(x.shape)[:3] + [-1] * (3 - min(3, x.dim()))
        code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 9
        rows.append([x.dim(), *dims, code])
    mine = torch.tensor(rows, dtype=torch.long)
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


def _block_lse(q: Tensor, k: Tensor, self_offset: Optional[int], own: bool, tile_size: TileSize) -> Tensor:
    masks = [DiagonalMask(self_offset)] if (own and self_offset is not None) else []
    return tiled_logsumexp(q, k, masks=masks, tile_size=tile_size)[0]


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
    def forward(ctx, q, k, group, self_offset, tile_size):
        qd, lse = q.detach(), None
        for s, cur in _ring_blocks(k, group, tag=0):
            l = _block_lse(qd, cur, self_offset, s == 0, tile_size)
            lse = l if lse is None else torch.logaddexp(lse, l)
        ctx.save_for_backward(q, k, lse)
        ctx.group, ctx.self_offset, ctx.tile_size = group, self_offset, tile_size
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, lse = ctx.saved_tensors
        group, self_offset, tile_size = ctx.group, ctx.self_offset, ctx.tile_size
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = torch.zeros_like(q) if need_q else None
        g = g.detach()

        def block_grad(s, cur):
            with torch.enable_grad():
                qq = q.detach().requires_grad_(True)
                kk = cur.detach().requires_grad_(True)
                l = _block_lse(qq, kk, self_offset, s == 0, tile_size)
                # d lse / d lse_block = exp(lse_block - lse): the block's share of the row
                w = torch.where(torch.isfinite(l), (l - lse.to(l.dtype)).exp(), torch.zeros_like(l)) * g.to(l.dtype)
                gq, gk = torch.autograd.grad(l, (qq, kk), grad_outputs=w, allow_unused=True)
            if dq is not None and gq is not None:
                dq.add_(gq)
            return gk

        dk = _ring_block_gradients(k, group, (1, 2), block_grad)
        return dq, dk if need_k else None, None, None, None


def ring_logsumexp(q: Tensor, k: Tensor, *, group=None, self_offset: Optional[int] = None,
                   tile_size: TileSize = None) -> Tensor:
    """Row log-sum-exp of ``q`` (local rows) against the ``k`` rows of every rank, passing
    candidate blocks round a ring; differentiable in ``q`` and ``k`` (each rank gets the
    sum over ranks of the gradient for its own ``k``).

    ``self_offset``: drop entry (i, i + self_offset) of the rank's *own* block (self
    similarity). Each block is walked by the tiled engine; the backward recomputes it.

    Example: ``lse = ring_logsumexp(q / t, k)   # == logsumexp(q/t @ all_gather(k).T, 1)``
    """
    _, world = rank_and_world(group)
    if world == 1:
        return _block_lse(q, k, self_offset, True, tile_size)
    return _RingLSE.apply(q, k, group, self_offset, tile_size)


def _siglip_block(x, y, temperature, bias, positives, tile_size) -> Tensor:
    return siglip(x, y, temperature=temperature, bias=bias, positives=positives, similarity="dot",
                  tile_size=tile_size, reduction="sum")


class _RingSigLIP(torch.autograd.Function):
    """Sum of SigLIP's pairwise terms of the local rows against every rank's candidates,
    the candidate blocks passed round the ring; the backward recomputes each block and
    sends its candidate gradient on with it, so it ends at its owner."""

    @staticmethod
    def forward(ctx, x, y, temperature, bias, group, tile_size):
        own = torch.arange(x.shape[0], device=x.device)
        none = torch.full_like(own, -1)
        total = None
        for s, cur in _ring_blocks(y, group, tag=3):
            part = _siglip_block(x.detach(), cur, temperature.detach(), bias.detach(), own if s == 0 else none,
                                 tile_size)
            total = part if total is None else total + part
        ctx.save_for_backward(x, y, temperature, bias)
        ctx.group, ctx.tile_size = group, tile_size
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, temperature, bias = ctx.saved_tensors
        group, tile_size = ctx.group, ctx.tile_size
        own = torch.arange(x.shape[0], device=x.device)
        none = torch.full_like(own, -1)
        dx, dt, db = torch.zeros_like(x), torch.zeros_like(temperature), torch.zeros_like(bias)

        def block_grad(s, cur):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in (x, cur, temperature, bias)]
                part = _siglip_block(*leaves, own if s == 0 else none, tile_size)
                gx, gy, gt, gb = torch.autograd.grad(part, leaves, grad_outputs=g, allow_unused=True)
            for acc, grad in ((dx, gx), (dt, gt), (db, gb)):
                if grad is not None:
                    acc.add_(grad)
            return gy

        dy = _ring_block_gradients(y, group, (4, 5), block_grad)
        return dx, dy, dt, db, None, None


def distributed_siglip(x: Tensor, y: Tensor, temperature: Tensor, bias: Tensor, *, mode: str = "gather",
                       group=None, tile_size: TileSize = None) -> Tensor:
    """The rank's share of SigLIP over the whole batch: its ``n`` rows against every rank's
    candidates (its positives in its own block), summed and divided by ``n``, so that the
    mean over ranks is the 1-rank loss ``sum over all pairs / N``.

    ``x``, ``y`` prepared (normalised) local rows; ``temperature`` and ``bias`` tensors."""
    rank, world = rank_and_world(group)
    n = x.shape[0]
    t = temperature.to(x.dtype).reshape(())
    b = (bias if isinstance(bias, Tensor) else torch.tensor(float(bias))).to(x.dtype).reshape(())
    if world == 1 or mode == "gather":
        y_all = all_gather_with_grad(y, group)
        total = _siglip_block(x, y_all, t, b, torch.arange(n, device=x.device) + rank * n, tile_size)
    else:
        total = _RingSigLIP.apply(x, y, t, b, group, tile_size)
    return total / n


def _lse_all(q: Tensor, k: Tensor, mode: str, group, self_offset: Optional[int], tile_size: TileSize) -> Tensor:
    if mode == "ring":
        return ring_logsumexp(q, k, group=group, self_offset=self_offset, tile_size=tile_size)
    rank, world = rank_and_world(group)
    k_all = all_gather_with_grad(k, group)
    # the rank's own candidates are columns rank * m ... (rank + 1) * m - 1 of k_all
    off = None if self_offset is None else self_offset + rank * k.shape[0]
    return _block_lse(q, k_all, off, True, tile_size)


def _global_count(n: Tensor, group) -> Tensor:
    _, world = rank_and_world(group)
    n = n.detach().to(torch.float64).reshape(1).clone()
    if world > 1:
        dist.all_reduce(n, group=group)
    return n[0]


def _check_finite(lse: Tensor, valid: Tensor, what: str) -> None:
    bad = valid & ~torch.isfinite(lse)
    if bool(bad.any()):
        raise ValueError(f"{what} {int(bad.nonzero()[0])} has every candidate masked out of the denominator")


def distributed_index_loss(qs: Tensor, k: Tensor, positives: Tensor, *, mode: str = "gather", group=None,
                           symmetric: bool = False, self_offset: Optional[int] = None,
                           tile_size: TileSize = None) -> Tensor:
    """The rank's share of an InfoNCE-family loss with one positive per row.

    ``qs`` (n, d) local anchors already scaled by 1 / temperature, ``k`` (m, d) local
    candidates, ``positives`` (n,) local column of each anchor's positive (-1: none).
    Returns ``world * sum(local row losses) / (valid rows over all ranks)`` (and the same
    for the column direction when ``symmetric``, the two averaged), so that the mean over
    ranks equals the 1-rank loss on the concatenated batch.
    """
    rank, world = rank_and_world(group)
    valid = positives >= 0
    lse = _lse_all(qs, k, mode, group, self_offset, tile_size)
    _check_finite(lse, valid, "anchor row")
    pos = positive_logits(qs, k, positives)
    row_sum = torch.where(valid, lse.to(pos.dtype) - pos, torch.zeros_like(pos)).sum()
    n_valid = _global_count(valid.sum(), group)
    if n_valid == 0:
        raise ValueError("no anchor row on any rank has a positive")
    rows = row_sum * (world / n_valid).to(row_sum.dtype)
    if not symmetric:
        return rows
    # column direction: each local candidate that is some local row's positive, against all anchors
    m = k.shape[0]
    cols = positives[valid]
    col_pos = torch.zeros(m, dtype=pos.dtype, device=pos.device).index_add(0, cols, pos[valid])
    col_count = torch.bincount(cols, minlength=m)
    has = col_count > 0
    lse_c = _lse_all(k, qs, mode, group, None, tile_size)
    _check_finite(lse_c, has, "candidate column")
    col_terms = lse_c.to(pos.dtype) - col_pos / col_count.clamp(min=1).to(pos.dtype)
    col_sum = torch.where(has, col_terms, torch.zeros_like(col_terms)).sum()
    n_cols = _global_count(has.sum(), group)
    return 0.5 * (rows + col_sum * (world / n_cols).to(col_sum.dtype))


class DistributedLoss(nn.Module):
    """Run a ``ck.losses`` objective across ranks: local anchors vs all ranks' candidates.

    Supports :class:`~contrastkit.losses.InfoNCE` (``forward(anchors, candidates,
    positives=None)``; ``positives`` index the *local* candidates),
    :class:`~contrastkit.losses.MultipleNegativesRanking` (``forward(anchors, positives,
    *hard_negatives)``), :class:`~contrastkit.losses.NTXent` (``forward(z1, z2)``) and
    :class:`~contrastkit.losses.SigLIP` (``forward(x, y)``: the exact whole-batch SigLIP,
    each rank's pairs against every rank's candidates), with
    their temperature (learnable or not), similarity and symmetric settings. With one
    process (or torch.distributed not initialised) it equals the wrapped objective.

    Every rank must pass the same local batch size and dimension; otherwise every rank
    raises the same ValueError (shapes are exchanged first).

    Args:
        objective: the loss module (its parameters, e.g. the temperature, stay in it).
        mode: ``"gather"`` (all_gather with grad) or ``"ring"`` (blocks passed round).
        group: process group (default: the world).

    Example::

        loss_fn = DistributedLoss(ck.losses.InfoNCE(temperature=0.05, symmetric=True), mode="ring")
        loss = loss_fn(img_emb_local, txt_emb_local)
        print(float(mean_over_ranks(loss)))    # the 1-rank loss of the whole batch
    """

    def __init__(self, objective: nn.Module, *, mode: str = "gather", group=None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(objective, (InfoNCE, MultipleNegativesRanking, NTXent, SigLIP)):
            raise ValueError(
                f"DistributedLoss supports InfoNCE, MultipleNegativesRanking, NTXent and SigLIP, got "
                f"{type(objective).__name__}; for another objective gather candidates with "
                "all_gather_with_grad and scale the loss as distributed_index_loss does"
            )
        self.objective, self.mode, self.group = objective, mode, group

    def forward(self, *args: Tensor, positives: Optional[Tensor] = None) -> Tensor:
        obj = self.objective
        tile = getattr(obj, "tile_size", None)
        if isinstance(obj, InfoNCE):
            if len(args) == 3 and positives is None:
                args, positives = args[:2], args[2]
            if len(args) != 2:
                raise ValueError(f"InfoNCE takes (anchors, candidates[, positives]), got {len(args)} tensors")
            q, k = prepare(obj.similarity, anchors=args[0], candidates=args[1])
            check_same_shapes(self.group, anchors=q, candidates=k)
            n, m = q.shape[0], k.shape[0]
            if positives is None:
                if m < n:
                    raise ValueError(f"default diagonal positives need at least as many candidates as anchors "
                                     f"per rank, got N={n}, M={m}")
                positives = torch.arange(n, device=q.device)
            positives = check_index("positives", positives, n, m, q.device)
            qs = scale_rows(q, obj.temperature())
            return distributed_index_loss(qs, k, positives, mode=self.mode, group=self.group,
                                          symmetric=obj.symmetric, tile_size=tile)
        if positives is not None:
            raise ValueError(f"{type(obj).__name__} takes no positives= argument")
        if isinstance(obj, SigLIP):
            if len(args) != 2:
                raise ValueError("SigLIP takes (x, y)")
            x, y = prepare(obj.similarity, x=args[0], y=args[1])
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"x and y must hold the same number of rows per rank, got {x.shape[0]} and "
                                 f"{y.shape[0]}")
            check_same_shapes(self.group, x=x, y=y)
            return distributed_siglip(x, y, obj.temperature(), obj.bias, mode=self.mode, group=self.group,
                                      tile_size=tile)
        if isinstance(obj, MultipleNegativesRanking):
            if len(args) < 2:
                raise ValueError("MultipleNegativesRanking takes (anchors, positives, *hard_negatives)")
            negs = _flatten_negatives(args[0], args[2:])
            named = {"anchors": args[0], "positives": args[1]}
            named.update({f"hard_negatives[{h}]": t for h, t in enumerate(negs)})
            prepared = prepare(obj.similarity, **named)
            a, p = prepared[0], prepared[1]
            if a.shape[0] != p.shape[0]:
                raise ValueError(f"anchors and positives must have the same number of rows, got "
                                 f"{a.shape[0]} and {p.shape[0]}")
            k = torch.cat(prepared[1:]) if len(prepared) > 2 else p
            check_same_shapes(self.group, anchors=a, candidates=k)
            qs = scale_rows(a, 1.0 / obj.scale)
            idx = torch.arange(a.shape[0], device=a.device)
            return distributed_index_loss(qs, k, idx, mode=self.mode, group=self.group,
                                          symmetric=obj.symmetric, tile_size=tile)
        # NTXent: the rank's 2n views against all ranks' views, self left out
        if len(args) != 2:
            raise ValueError("NTXent takes (z1, z2)")
        a, b = prepare(obj.similarity, z1=args[0], z2=args[1])
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"z1 and z2 must hold the same number of samples, got {a.shape[0]} and {b.shape[0]}")
        check_same_shapes(self.group, z1=a, z2=b)
        n = a.shape[0]
        z = torch.cat([a, b])
        idx = torch.arange(n, device=z.device)
        zs = scale_rows(z, obj.temperature())
        return distributed_index_loss(zs, z, torch.cat([idx + n, idx]), mode=self.mode, group=self.group,
                                      self_offset=0, tile_size=tile)


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
    """The mean of a (detached) tensor over ranks: the whole batch's loss from each
    rank's :class:`DistributedLoss` value."""
    _, world = rank_and_world(group)
    y = x.detach().clone()
    if world > 1:
        dist.all_reduce(y, group=group)
        y /= world
    return y
