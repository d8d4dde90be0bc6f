"""Gradient caching: any batch size with the activation memory of one chunk.

Gao et al. 2021 ("Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"). One training step of :class:`GradCache`:

1. encode every input group (queries, documents, hard negatives...) in chunks
   under ``torch.no_grad()``, saving the RNG state (CPU and CUDA) before each chunk;
2. compute the objective on the concatenated, detached embeddings and back-propagate
   it to them: ``d loss / d embedding`` is cached (and any parameter of the loss,
   e.g. a learnable temperature, gets its gradient here);
3. re-encode each chunk with autograd, restoring its RNG state first so dropout
   draws the very same masks, and back-propagate the cached gradient slice.

The parameter gradients are those of a plain step that encodes the same chunks with
autograd (identical up to floating-point rounding); the activation memory is one
chunk's, the loss is the tiled engine's O(N + M). The RNG is left exactly where the
plain step would leave it.

Example::

    import contrastkit as ck
    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
    gc = ck.scale.GradCache(enc, ck.losses.MultipleNegativesRanking(scale=20.0), chunk_size=32)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-5)
    loss = gc.step(enc.tokenize(queries), enc.tokenize(documents))   # grads are in .grad
    torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["GradCache", "RandState", "select_rows", "plan_chunks", "default_embed"]

Inputs = Union[Tensor, Mapping[str, Tensor]]


class RandState:
    """The CPU RNG state and, when CUDA is in use, every CUDA device's RNG state.

    ``RandState()`` captures; ``.restore()`` puts it back (so dropout replays)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda = torch.cuda.get_rng_state_all()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _batch_size(inputs: Inputs, where: str) -> int:
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError(f"{where} is a 0-d tensor; inputs need a batch dimension")
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        sizes = {k: int(v.shape[0]) for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes:
            raise ValueError(f"{where} is a mapping without tensors")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{where}: tensors disagree on the batch size: {sizes}")
        return next(iter(sizes.values()))
    raise ValueError(f"{where} must be a Tensor or a mapping of tensors (e.g. a tokenizer's output), "
                     f"got {type(inputs).__name__}")


def _lengths(inputs: Inputs) -> Tensor:
    """Tokens per row: the attention mask's count, else the padded width (1 for 1-d)."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask.ne(0).sum(1).cpu()
        ids = inputs.get("input_ids")
        t = ids if isinstance(ids, Tensor) else next(v for v in inputs.values() if isinstance(v, Tensor))
    else:
        t = inputs
    width = int(t.shape[1]) if t.dim() >= 2 else 1
    return torch.full((int(t.shape[0]),), width, dtype=torch.long)


def plan_chunks(inputs: Inputs, *, chunk_size: Optional[int] = None, chunk_tokens: Optional[int] = None,
                sort_by_length: bool = False) -> List[Tensor]:
    """Split the rows of ``inputs`` into chunks: a list of row-index tensors.

    ``chunk_size`` rows each, or (``chunk_tokens``) as many rows as keep
    ``rows x longest length in the chunk`` within the token budget (a longer single
    row gets a chunk of its own). ``sort_by_length`` orders rows by length first
    (longest first) so that chunks pad little; embeddings are put back in order.
    """
    n = _batch_size(inputs, "inputs")
    order = torch.arange(n)
    lengths = None
    if sort_by_length or chunk_tokens is not None:
        lengths = _lengths(inputs)
    if sort_by_length:
        order = torch.sort(lengths, descending=True, stable=True).indices
    if chunk_tokens is None:
        c = int(chunk_size or n)
        return [order[i:i + c] for i in range(0, n, c)]
    chunks, start, longest = [], 0, 0
    for pos in range(n):
        ln = int(lengths[order[pos]])
        new_longest = max(longest, ln)
        if pos > start and new_longest * (pos - start + 1) > chunk_tokens:
            chunks.append(order[start:pos])
            start, new_longest = pos, ln
        longest = new_longest
    chunks.append(order[start:n])
    return chunks


def select_rows(inputs: Inputs, index: Tensor, *, trim_padding: bool = True) -> Inputs:
    """Rows ``index`` of a tensor or of every tensor of a mapping; with ``trim_padding``
    and an ``attention_mask``, trailing columns that are padding in every selected row
    are cut (exact for models that honour the attention mask)."""
    if isinstance(inputs, Tensor):
        return inputs.index_select(0, index.to(inputs.device))
    n = _batch_size(inputs, "inputs")
    out: Dict[str, Any] = {}
    for k, v in inputs.items():
        out[k] = v.index_select(0, index.to(v.device)) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v
    mask = out.get("attention_mask")
    if trim_padding and isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] > 0:
        used = mask.ne(0).any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        if width < mask.shape[1]:
            full = mask.shape[1]
            out = {k: (v[:, :width] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == full else v)
                   for k, v in out.items()}
    return out


def default_embed(module: nn.Module, inputs: Inputs) -> Tensor:
    """``module(**inputs)`` for a mapping, ``module(inputs)`` for a tensor; the output must
    be an (n, d) tensor (or a mapping with ``"sentence_embedding"``, as sentence-transformers
    returns)."""
    out = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
    if isinstance(out, Mapping) and "sentence_embedding" in out:
        out = out["sentence_embedding"]
    if not isinstance(out, Tensor):
        raise ValueError(
            f"the encoder returned {type(out).__name__}, not an embedding tensor; wrap a bare transformer in "
            "ck.models.TextEncoder (pooling) or pass embed_fn="
        )
    return out


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


class GradCache:
    """Gradient-cached training step for one shared encoder or two towers and any objective.

    Args:
        encoder: encodes input group 0 (queries / anchors), and every group when
            ``doc_encoder`` is None (shared towers).
        loss_fn: any callable on the embeddings, e.g. a ``ck.losses`` module; it is
            called as ``loss_fn(*embeddings, *loss_args, **loss_kwargs)`` and must return
            a scalar. Wrap it in :class:`contrastkit.scale.DistributedLoss` for many
            processes: the cached (local) embeddings are what is gathered.
        doc_encoder: encodes groups 1, 2, ... (documents, hard negatives): two towers.
        chunk_size: rows per chunk (default 32).
        chunk_tokens: instead, a budget of padded tokens per chunk (rows x longest row).
        sort_by_length: chunk rows sorted by length (less padding; order is restored).
        trim_padding: cut the all-padding trailing columns of each chunk (needs an
            ``attention_mask``).
        autocast_dtype: e.g. ``torch.bfloat16``: run the encoder passes under
            ``torch.autocast`` (the loss is computed in float32 on upcast embeddings).
        embed_fn: ``embed_fn(module, chunk_inputs) -> (n, d)``; default :func:`default_embed`.
        keep_last: encode the last chunk of each group with autograd in the first pass and
            back-propagate through that graph instead of re-encoding it (saves one chunk's
            forward per group; a batch of one chunk costs a plain step). Activation memory
            is then that of one plain step at ``chunk_size`` rows per group. Off for a
            ``DistributedDataParallel`` encoder.

    :meth:`step` leaves the gradients in ``.grad`` (accumulating, like ``backward``);
    clip and step the optimiser afterwards. ``last_embeddings`` holds the detached
    embeddings of the last step (e.g. to push to a memory queue).

    A ``DistributedDataParallel`` encoder is handled: all but its last chunk run under
    ``no_sync()`` so gradients are all-reduced once. Parameters outside it (a learnable
    temperature in ``loss_fn``) must be averaged by the caller
    (:func:`contrastkit.scale.average_gradients`).

    Example::

        gc = GradCache(query_tower, ck.losses.InfoNCE(temperature=0.05), doc_encoder=doc_tower,
                       chunk_tokens=4096, sort_by_length=True, autocast_dtype=torch.bfloat16)
        loss = gc.step(q_batch, d_batch)
        loss = gc.step(q_batch, d_batch, extra_candidates=queue)   # MoCo-style queue
    """

    def __init__(self, encoder: nn.Module, loss_fn: Callable[..., Tensor], *, doc_encoder: Optional[nn.Module] = None,
                 chunk_size: Optional[int] = 32, chunk_tokens: Optional[int] = None, sort_by_length: bool = False,
                 trim_padding: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                 embed_fn: Callable[[nn.Module, Inputs], Tensor] = default_embed, keep_last: bool = True) -> None:
        if chunk_tokens is not None:
            if int(chunk_tokens) < 1:
                raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens!r}")
            chunk_tokens = int(chunk_tokens)
        elif chunk_size is None or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16 or torch.float16, got {autocast_dtype!r}")
        self.encoder, self.doc_encoder, self.loss_fn = encoder, doc_encoder, loss_fn
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.chunk_tokens = chunk_tokens
        self.sort_by_length, self.trim_padding = bool(sort_by_length), bool(trim_padding)
        self.autocast_dtype = autocast_dtype
        self.embed_fn = embed_fn
        self.keep_last = bool(keep_last)
        self.last_embeddings: List[Tensor] = []

    # -- pieces (public so a reference step can use the very same chunks) --------
    def encoder_for(self, group: int) -> nn.Module:
        """The module that encodes input group ``group``."""
        return self.encoder if group == 0 or self.doc_encoder is None else self.doc_encoder

    def plan(self, inputs: Inputs) -> List[Tensor]:
        """Row-index chunks of one input group (see :func:`plan_chunks`)."""
        return plan_chunks(inputs, chunk_size=self.chunk_size, chunk_tokens=self.chunk_tokens,
                           sort_by_length=self.sort_by_length)

    def chunk(self, inputs: Inputs, index: Tensor) -> Inputs:
        """The inputs of one chunk (rows ``index``, padding trimmed)."""
        return select_rows(inputs, index, trim_padding=self.trim_padding)

    def _autocast(self, inputs: Inputs):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        t = inputs if isinstance(inputs, Tensor) else next(v for v in inputs.values() if isinstance(v, Tensor))
        return torch.autocast(device_type=t.device.type, dtype=self.autocast_dtype)

    def encode(self, group: int, inputs: Inputs, index: Tensor) -> Tensor:
        """Embeddings of one chunk of one group (autograd as the caller's mode says)."""
        sub = self.chunk(inputs, index)
        with self._autocast(sub):
            return self.embed_fn(self.encoder_for(group), sub)

    # -- the step --------------------------------------------------------------
    def step(self, *inputs: Inputs, extra_candidates: Optional[Tensor] = None, extra_group: int = 1,
             loss_args: Sequence[Any] = (), loss_kwargs: Optional[Dict[str, Any]] = None) -> Tensor:
        """One gradient-cached forward/backward; returns the (detached) loss.

        Args:
            inputs: one entry per input group (tensor or tokenizer mapping, all groups
                with the same or differing numbers of rows, as the objective wants).
            extra_candidates: detached extra rows (a memory queue) appended after the
                embeddings of group ``extra_group`` (default 1, the candidates) before
                the objective sees them; they get no gradient. For MNRL pass a queue as
                a hard-negative tensor through ``loss_args`` instead.
            loss_args, loss_kwargs: passed to ``loss_fn`` after the embeddings (labels...).
        """
        if not inputs:
            raise ValueError("GradCache.step needs at least one input group")
        for g, inp in enumerate(inputs):
            _batch_size(inp, f"inputs[{g}]")
        if extra_candidates is not None and not 0 <= extra_group < len(inputs):
            raise ValueError(f"extra_group={extra_group} but there are {len(inputs)} input groups")
        plans = [self.plan(inp) for inp in inputs]
        states: List[List[RandState]] = []
        reps: List[Tensor] = []
        kept: Dict[int, Tensor] = {}  # group -> last chunk's embeddings, with their graph
        # 1. encode without autograd, remembering the RNG state before each chunk
        #    (the last chunk of each group keeps its graph when keep_last)
        for g, (inp, plan) in enumerate(zip(inputs, plans)):
            keep = self.keep_last and not _is_ddp(self.encoder_for(g))
            st, embs = [], []
            for c, idx in enumerate(plan):
                st.append(RandState())
                if keep and c == len(plan) - 1:
                    with torch.enable_grad():
                        kept[g] = self.encode(g, inp, idx)
                    embs.append(kept[g].detach())
                else:
                    with torch.no_grad():
                        embs.append(self.encode(g, inp, idx))
            states.append(st)
            reps.append(self._unpermute(embs, plan, g))
        after = RandState()
        # 2. the objective on the detached embeddings; cache d loss / d embedding
        leaves = [r.detach().float().requires_grad_() if r.dtype in (torch.float16, torch.bfloat16)
                  else r.detach().requires_grad_() for r in reps]
        args = list(leaves)
        if extra_candidates is not None:
            extra = extra_candidates.detach().to(dtype=args[extra_group].dtype, device=args[extra_group].device)
            args[extra_group] = torch.cat([args[extra_group], extra])
        with torch.enable_grad():
            loss = self.loss_fn(*args, *loss_args, **(loss_kwargs or {}))
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar tensor (use reduction='mean' or 'sum')")
            loss.backward()
        grads = [leaf.grad for leaf in leaves]
        # 3. back-propagate through the kept last chunks (freeing them first), then re-encode
        #    every other chunk with autograd (same RNG) and back-propagate its gradient slice
        for g, emb in list(kept.items()):
            if grads[g] is not None:
                idx = plans[g][-1]
                emb.backward(grads[g][idx.to(grads[g].device)].to(emb.dtype))
            del kept[g], emb
        last_of = self._last_chunks(plans)
        with torch.enable_grad():
            for g, (inp, plan) in enumerate(zip(inputs, plans)):
                if grads[g] is None:
                    continue
                module = self.encoder_for(g)
                for c, idx in enumerate(plan):
                    if self.keep_last and not _is_ddp(module) and c == len(plan) - 1:
                        continue
                    states[g][c].restore()
                    sync = (g, c) in last_of or not _is_ddp(module)
                    with (contextlib.nullcontext() if sync else module.no_sync()):
                        emb = self.encode(g, inp, idx)
                        emb.backward(grads[g][idx.to(grads[g].device)].to(emb.dtype))
        after.restore()
        self.last_embeddings = [leaf.detach() for leaf in leaves]
        return loss.detach()

    __call__ = step

    def _unpermute(self, embs: List[Tensor], plan: List[Tensor], group: int) -> Tensor:
        for e in embs:
            if not isinstance(e, Tensor) or e.dim() != 2:
                raise ValueError(f"the encoder of group {group} must return (n, d) embeddings, got "
                                 f"{tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__}")
        cat = torch.cat(embs)
        order = torch.cat(plan).to(cat.device)
        if bool((order == torch.arange(len(order), device=cat.device)).all()):
            return cat
        out = torch.empty_like(cat)
        out[order] = cat
        return out

    def _last_chunks(self, plans: List[List[Tensor]]) -> set:
        """(group, chunk) of the last chunk each distinct encoder runs (DDP syncs there)."""
        last: Dict[int, tuple] = {}
        for g, plan in enumerate(plans):
            if plan:
                last[id(self.encoder_for(g))] = (g, len(plan) - 1)
        return set(last.values())
