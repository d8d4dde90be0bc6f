"""Gradient caching: any batch size with the activation memory of one chunk.

Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", RepL4NLP 2021, arXiv:2101.06983. One cached batch of :class:`GradCache`:

1. encode every input group (queries, documents, hard negatives...) in chunks
   under ``torch.no_grad()``, saving the RNG state (CPU and CUDA) before each chunk;
2. compute the objective on the concatenated, detached embeddings and back-propagate
   it to them: ``d loss / d embedding`` is cached (and any parameter of the loss,
   e.g. a learnable temperature, gets its gradient here);
3. re-encode each chunk with autograd, restoring its RNG state first so dropout
   draws the very same masks, and back-propagate the cached gradient slice.

Two ways to drive it, one implementation (:class:`_CachedBatch`): :meth:`GradCache.step`
runs all three; :meth:`GradCache.embed` runs step 1 and returns the embeddings, and the
caller's own ``loss.backward()`` runs steps 2 and 3 (an autograd node whose backward is the
re-encode), so any trainer that back-propagates a returned loss gets gradient caching.

The parameter gradients are those of a plain step that encodes the same chunks with
autograd (identical up to floating-point rounding); the activation memory is one
chunk's, the loss is the tiled engine's O(N + M). The RNG is left exactly where the
plain step would leave it.

Example::

    import torch, contrastkit as ck
    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
    gc = ck.scale.GradCache(enc, ck.losses.MultipleNegativesRanking(scale=20.0), chunk_size=32)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-5)
    queries = ["what do cats eat?", "how tall is mount everest?"]
    documents = ["cats eat meat and fish", "mount everest is 8,849 m high"]
    loss = gc.step(enc.tokenize(queries), enc.tokenize(documents))   # grads are in .grad
    torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
    opt.step(); opt.zero_grad()

    q, d = gc.embed(enc.tokenize(queries), enc.tokenize(documents))  # or: your own loss
    loss = ck.losses.InfoNCE(temperature=0.05)(q, d)
    loss.backward()                                                  # the cached re-encode
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


def _device_type(inputs: Inputs) -> str:
    if isinstance(inputs, Tensor):
        return inputs.device.type
    for v in inputs.values():
        if isinstance(v, Tensor):
            return v.device.type
    return "cpu"


def _upcast(t: Tensor) -> Tensor:
    """Half-precision embeddings (from autocast) are given to the objective in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _unpermute(embs: List[Tensor], plan: List[Tensor], group: int) -> Tensor:
    """Concatenate the chunks' embeddings and put the rows back in input order."""
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


def _backprop_slice(emb: Tensor, grad: Tensor, index: Tensor) -> None:
    """Back-propagate the cached gradient rows ``index`` into the graph of one chunk."""
    emb.backward(grad[index.to(grad.device)].to(emb.dtype))


class _Snapshot:
    """What the cached re-encode relies on, recorded right after the first pass: the
    encoders' parameters (identity and in-place version counter), every submodule's
    train/eval flag, and the version counters of the input tensors."""

    def __init__(self, modules: Sequence[nn.Module], inputs: Sequence[Inputs]) -> None:
        modules = [m for m in modules if isinstance(m, nn.Module)]  # a plain function has no state
        self.params = [(name, p, p._version) for m in modules for name, p in m.named_parameters()]
        self.modes = [(name, mod, mod.training) for m in modules for name, mod in m.named_modules()]
        self.tensors = []
        for g, inp in enumerate(inputs):
            items = [("", inp)] if isinstance(inp, Tensor) else list(inp.items())
            self.tensors += [(g, k, t, t._version) for k, t in items if isinstance(t, Tensor)]
        self.modules = list(modules)

    def check(self) -> None:
        now = [p for m in self.modules for _, p in m.named_parameters()]
        if len(now) != len(self.params) or any(a is not b for a, (_, b, _) in zip(now, self.params)):
            raise RuntimeError(
                "GradCache: the encoder's parameters were replaced between gc.embed() and loss.backward() "
                "(the cached re-encode would differentiate other weights); back-propagate before changing "
                "the model, then embed again")
        for name, p, version in self.params:
            if p._version != version:
                raise RuntimeError(
                    f"GradCache: encoder parameter {name!r} was modified in place (e.g. by optimizer.step() or "
                    "load_state_dict) between gc.embed() and loss.backward(); the cached re-encode would compute "
                    "gradients at other weights than the embeddings came from. Call loss.backward() before "
                    "optimizer.step(), and gc.embed() again for the next step")
        for name, mod, training in self.modes:
            if mod.training != training:
                raise RuntimeError(
                    f"GradCache: module {name or type(mod).__name__!r} switched to "
                    f"{'train' if mod.training else 'eval'} mode between gc.embed() and loss.backward(); the "
                    "re-encode must run in the mode the embeddings were computed in (dropout)")
        for g, key, t, version in self.tensors:
            if t._version != version:
                where = f"inputs[{g}]" + (f"[{key!r}]" if key else "")
                raise RuntimeError(f"GradCache: {where} was modified in place between gc.embed() and "
                                   "loss.backward(); the re-encode needs the inputs the embeddings came from")


class _CachedBatch:
    """One gradient-cached batch: the plan of chunks, the RNG state before each chunk,
    the first pass without autograd and the replay with autograd. Both :meth:`GradCache.step`
    and :meth:`GradCache.embed` run through it (the single copy of the chunk / RNG logic)."""

    def __init__(self, gc: "GradCache", inputs: Sequence[Inputs]) -> None:
        self.gc = gc
        self.inputs: Optional[List[Inputs]] = list(inputs)
        self.plans = [gc.plan(inp) for inp in self.inputs]
        # autocast as the first pass sees it (the option, else the caller's), replayed in backward
        self.autocast = gc._autocast_setting(self.inputs[0])
        self.states: List[List[RandState]] = []
        self.kept: Dict[int, Tensor] = {}  # group -> last chunk's embeddings, with their graph
        self.snapshot: Optional[_Snapshot] = None
        self.done = False

    def keeps_last(self, group: int) -> bool:
        return self.gc.keep_last and not _is_ddp(self.gc.encoder_for(group))

    def encode(self, group: int, index: Tensor) -> Tensor:
        return self.gc.encode(group, self.inputs[group], index, autocast=self.autocast)

    def first_pass(self, record: bool) -> List[Tensor]:
        """Every group's embeddings (rows in input order, half precision upcast), encoded
        chunk by chunk without autograd; with ``record`` the RNG state before each chunk is
        kept and, with ``keep_last``, the last chunk of each group keeps its graph."""
        reps = []
        for g, plan in enumerate(self.plans):
            keep = record and self.keeps_last(g)
            states, embs = [], []
            for c, idx in enumerate(plan):
                if record:
                    states.append(RandState())
                if keep and c == len(plan) - 1:
                    with torch.enable_grad():
                        self.kept[g] = self.encode(g, idx)
                    embs.append(self.kept[g].detach())
                else:
                    with torch.no_grad():
                        embs.append(self.encode(g, idx))
            self.states.append(states)
            reps.append(_upcast(_unpermute(embs, plan, g)))
        if record:
            modules = list({id(m): m for m in (self.gc.encoder_for(g) for g in range(len(self.plans)))}.values())
            self.snapshot = _Snapshot(modules, self.inputs)
        return reps

    def replay(self, grads: Sequence[Optional[Tensor]]) -> None:
        """Back-propagate ``grads`` (d loss / d embeddings of each group, None for a group the
        loss did not use) into the encoders: through the kept last chunks, then by re-encoding
        every other chunk with autograd after restoring its RNG state. The RNG is restored to
        its state at the call (the replay draws nothing as far as the caller can tell)."""
        if self.done:
            raise RuntimeError(
                "GradCache: these embeddings were already back-propagated once; the cached re-encode ran "
                "and its inputs were released. Call gc.embed() again for another backward (retain_graph "
                "cannot replay a gradient-cached encoder)")
        self.snapshot.check()
        self.done = True
        outer = RandState()
        try:
            for g, emb in list(self.kept.items()):  # free each kept graph as soon as it is used
                del self.kept[g]
                if grads[g] is not None and emb.requires_grad:
                    _backprop_slice(emb, grads[g], self.plans[g][-1])
                del emb
            last_of = self._last_chunks(grads)
            with torch.enable_grad():
                for g, plan in enumerate(self.plans):
                    if grads[g] is None:
                        continue
                    module = self.gc.encoder_for(g)
                    for c, idx in enumerate(plan):
                        if c == len(plan) - 1 and self.keeps_last(g):
                            continue
                        self.states[g][c].restore()
                        sync = not _is_ddp(module) or (g, c) in last_of
                        with (contextlib.nullcontext() if sync else module.no_sync()):
                            emb = self.encode(g, idx)
                            if emb.requires_grad:
                                _backprop_slice(emb, grads[g], idx)
        finally:
            outer.restore()
            self.inputs, self.states, self.kept = None, [], {}

    def _last_chunks(self, grads: Sequence[Optional[Tensor]]) -> set:
        """(group, chunk) of the last chunk each distinct encoder re-encodes (DDP syncs there)."""
        last: Dict[int, tuple] = {}
        for g, plan in enumerate(self.plans):
            if plan and grads[g] is not None:
                last[id(self.gc.encoder_for(g))] = (g, len(plan) - 1)
        return set(last.values())


class _CachedEncode(torch.autograd.Function):
    """Autograd node of :meth:`GradCache.embed`: forward is the first pass (no graph kept
    but the ``keep_last`` chunks'); backward receives every group's gradient at once and
    replays the encoders with them (a reentrant backward, as torch's reentrant checkpoint)."""

    @staticmethod
    def forward(ctx, batch: _CachedBatch, anchor: Tensor):  # noqa: D401 - autograd signature
        ctx.set_materialize_grads(False)
        ctx.batch = batch
        return tuple(batch.first_pass(record=True))

    @staticmethod
    def backward(ctx, *grads):
        ctx.batch.replay(grads)
        return None, None


class GradCache:
    """Gradient caching for one shared encoder or two towers and any objective, in two modes.

    * ``gc.step(q, d, ...)``: encode, compute ``loss_fn``, back-propagate; returns the loss.
    * ``embs = gc.embed(q, d, ...)``: the embeddings only, as tensors that require grad; the
      caller computes any loss on them and calls ``loss.backward()`` as usual. That backward
      re-encodes each chunk with autograd (RNG restored, so dropout replays) and
      back-propagates the cached gradient slice into the encoder: the same code serves a
      plain training loop, a sentence-transformers loss
      (:class:`contrastkit.integrations.sentence_transformers.CachedLoss`) or a Lightning
      ``training_step``. ``step()`` is exactly ``embed`` + ``loss_fn`` + ``backward``.

    Args:
        encoder: encodes input group 0 (queries / anchors), and every group when
            ``doc_encoder`` is None (shared towers). A list / tuple / ``nn.ModuleList`` of
            modules gives one encoder per input group (the same module may appear twice).
        loss_fn: for :meth:`step` (optional for :meth:`embed`): any callable on the
            embeddings, e.g. a ``ck.losses`` module, called as
            ``loss_fn(*embeddings, *loss_args, **loss_kwargs)``, returning a scalar. Wrap it in
            :class:`contrastkit.scale.DistributedLoss` for many processes: the cached (local)
            embeddings are what is gathered.
        doc_encoder: encodes groups 1, 2, ... (documents, hard negatives): two towers.
            Not with a list of encoders.
        chunk_size: rows per chunk (default 32).
        chunk_tokens: instead, a budget of padded tokens per chunk (rows x longest row).
        sort_by_length: chunk rows sorted by length (less padding; order is restored).
        trim_padding: cut the all-padding trailing columns of each chunk (needs an
            ``attention_mask``).
        autocast_dtype: e.g. ``torch.bfloat16``: run the encoder passes under
            ``torch.autocast`` (the embeddings are upcast to float32 for the loss). Without
            it, an autocast region around ``embed()`` is recorded and replayed in backward.
        embed_fn: ``embed_fn(module, chunk_inputs) -> (n, d)``; default :func:`default_embed`.
        keep_last: encode the last chunk of each group with autograd in the first pass and
            back-propagate through that graph instead of re-encoding it (saves one chunk's
            forward per group; a batch of one chunk costs a plain step). Activation memory
            is then that of one plain step at ``chunk_size`` rows per group (held from
            ``embed()`` to ``backward()`` in the hook mode). Off for a
            ``DistributedDataParallel`` encoder.

    Gradients accumulate in ``.grad`` (like ``backward``); clip and step the optimiser
    afterwards. ``last_embeddings`` holds the detached embeddings of the last :meth:`step`
    (e.g. to push to a memory queue).

    Contract of the hook mode: call ``backward()`` (not ``torch.autograd.grad``: the
    re-encode accumulates into ``.grad``) once, before the encoder changes. Changing a
    parameter in place (``optimizer.step()``), replacing one, switching train/eval or
    modifying the inputs in place between ``embed()`` and ``backward()``, or a second
    backward (``retain_graph=True``), raises a ``RuntimeError`` saying which.

    A ``DistributedDataParallel`` encoder is handled: all but its last chunk run under
    ``no_sync()`` so gradients are all-reduced once. Parameters outside it (a learnable
    temperature in ``loss_fn``) must be averaged by the caller
    (:func:`contrastkit.scale.average_gradients`).

    Example::

        import torch, contrastkit as ck
        from contrastkit.scale import GradCache

        class Tower(torch.nn.Module):             # a toy text encoder: mean of token embeddings
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(1000, 32)
            def forward(self, input_ids, attention_mask):
                m = attention_mask.unsqueeze(-1).float()
                return (self.emb(input_ids) * m).sum(1) / m.sum(1)

        def tokens(n, length):                    # what a tokenizer returns
            return {"input_ids": torch.randint(0, 1000, (n, length)),
                    "attention_mask": torch.ones(n, length, dtype=torch.long)}

        query_tower, doc_tower = Tower(), Tower()
        optimizer = torch.optim.AdamW([*query_tower.parameters(), *doc_tower.parameters()])
        q_batch, d_batch, negatives_batch = tokens(64, 16), tokens(64, 128), tokens(64, 128)
        queue = torch.randn(256, 32)

        gc = GradCache(query_tower, ck.losses.InfoNCE(temperature=0.05), doc_encoder=doc_tower,
                       chunk_tokens=4096, sort_by_length=True, autocast_dtype=torch.bfloat16)
        loss = gc.step(q_batch, d_batch)
        loss = gc.step(q_batch, d_batch, extra_candidates=queue)   # MoCo-style queue

        q, d, n = gc.embed(q_batch, d_batch, negatives_batch)      # hook mode
        loss = ck.losses.MultipleNegativesRanking(scale=20.0)(q, d, n)
        loss.backward()                                            # re-encodes, chunk by chunk
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, encoder: Union[nn.Module, Sequence[nn.Module]], loss_fn: Optional[Callable[..., Tensor]] = None, *,
                 doc_encoder: Optional[nn.Module] = None, chunk_size: Optional[int] = 32,
                 chunk_tokens: Optional[int] = None, sort_by_length: bool = False, trim_padding: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None,
                 embed_fn: Callable[[nn.Module, Inputs], Tensor] = default_embed, keep_last: bool = True) -> None:
        if chunk_tokens is not None:
            if int(chunk_tokens) < 1:
                raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens!r}")
            chunk_tokens = int(chunk_tokens)
        elif chunk_size is None or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16 or torch.float16, got {autocast_dtype!r}")
        self.encoders: Optional[List[nn.Module]] = None
        if isinstance(encoder, (list, tuple, nn.ModuleList)):
            if doc_encoder is not None:
                raise ValueError("give one encoder per input group (a list) or encoder + doc_encoder, not both")
            if len(encoder) == 0 or not all(isinstance(m, nn.Module) or callable(m) for m in encoder):
                raise ValueError("encoder as a list needs one module per input group")
            self.encoders = list(encoder)
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
        if self.encoders is not None:
            if not 0 <= group < len(self.encoders):
                raise ValueError(f"input group {group} has no encoder: {len(self.encoders)} encoders were given "
                                 "(one per input group)")
            return self.encoders[group]
        return self.encoder if group == 0 or self.doc_encoder is None else self.doc_encoder

    def plan(self, inputs: Inputs) -> List[Tensor]:
        """Row-index chunks of one input group (see :func:`plan_chunks`)."""
        return plan_chunks(inputs, chunk_size=self.chunk_size, chunk_tokens=self.chunk_tokens,
                           sort_by_length=self.sort_by_length)

    def chunk(self, inputs: Inputs, index: Tensor) -> Inputs:
        """The inputs of one chunk (rows ``index``, padding trimmed)."""
        return select_rows(inputs, index, trim_padding=self.trim_padding)

    def _autocast_setting(self, inputs: Inputs) -> tuple:
        """(device type, enabled, dtype): ``autocast_dtype`` if set, else the caller's autocast."""
        dev = _device_type(inputs)
        if self.autocast_dtype is not None:
            return dev, True, self.autocast_dtype
        try:
            return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        except (RuntimeError, TypeError):  # a device type autocast does not know
            return dev, False, None

    def encode(self, group: int, inputs: Inputs, index: Tensor, *, autocast: Optional[tuple] = None) -> Tensor:
        """Embeddings of one chunk of one group (autograd as the caller's mode says), under
        ``autocast`` = (device type, enabled, dtype), default :meth:`_autocast_setting`."""
        sub = self.chunk(inputs, index)
        dev, enabled, dtype = autocast if autocast is not None else self._autocast_setting(sub)
        if enabled or (dtype is not None and torch.is_autocast_enabled(dev)):
            ctx = torch.autocast(device_type=dev, dtype=dtype, enabled=enabled)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return self.embed_fn(self.encoder_for(group), sub)

    def _check_inputs(self, inputs: Sequence[Inputs], where: str) -> None:
        if not inputs:
            raise ValueError(f"GradCache.{where} needs at least one input group")
        for g, inp in enumerate(inputs):
            _batch_size(inp, f"inputs[{g}]")

    # -- hook mode ---------------------------------------------------------------
    def embed(self, *inputs: Inputs) -> tuple:
        """Embeddings of every input group, one (n_g, d) tensor per group, in input order.

        With autograd enabled they require grad and carry one autograd node: the caller's
        ``loss.backward()`` hands it ``d loss / d embeddings`` of every group at once, and it
        re-encodes each chunk with autograd (RNG and autocast as in the first pass) and
        back-propagates the slice into the encoders' ``.grad``. Under ``torch.no_grad()``
        (evaluation) the chunked embeddings are returned without any of that.
        Half-precision embeddings (autocast) are returned in float32.

        Example::

            import torch, contrastkit as ck
            encoder, objective = torch.nn.Linear(16, 8), ck.losses.InfoNCE(temperature=0.05)
            gc = ck.scale.GradCache(encoder, chunk_size=4)
            q_batch, d_batch = torch.randn(10, 16), torch.randn(10, 16)
            q, d = gc.embed(q_batch, d_batch)
            loss = objective(q, d)
            loss.backward()          # the encoder's gradients of the whole batch
            plain = torch.nn.Linear(16, 8)
            plain.load_state_dict(encoder.state_dict())
            objective(plain(q_batch), plain(d_batch)).backward()    # the same, without chunks
            assert torch.allclose(encoder.weight.grad, plain.weight.grad, atol=1e-5)
        """
        self._check_inputs(inputs, "embed")
        batch = _CachedBatch(self, inputs)
        if not torch.is_grad_enabled():
            return tuple(batch.first_pass(record=False))
        anchor = torch.empty(0, requires_grad=True)  # makes the outputs part of the graph
        return _CachedEncode.apply(batch, anchor)

    # -- the step ----------------------------------------------------------------
    def step(self, *inputs: Inputs, extra_candidates: Optional[Tensor] = None, extra_group: int = 1,
             loss_args: Sequence[Any] = (), loss_kwargs: Optional[Dict[str, Any]] = None) -> Tensor:
        """One gradient-cached forward/backward (:meth:`embed`, ``loss_fn``, ``backward``);
        returns the detached loss.

        Args:
            inputs: one entry per input group (tensor or tokenizer mapping, all groups
                with the same or differing numbers of rows, as the objective wants).
            extra_candidates: detached extra rows (a memory queue) appended after the
                embeddings of group ``extra_group`` (default 1, the candidates) before
                the objective sees them; they get no gradient. For MNRL pass a queue as
                a hard-negative tensor through ``loss_args`` instead.
            loss_args, loss_kwargs: passed to ``loss_fn`` after the embeddings (labels...).
        """
        if self.loss_fn is None:
            raise ValueError("GradCache.step needs loss_fn (GradCache(encoder, loss_fn)); "
                             "or use gc.embed(...) and back-propagate your own loss")
        self._check_inputs(inputs, "step")
        if extra_candidates is not None and not 0 <= extra_group < len(inputs):
            raise ValueError(f"extra_group={extra_group} but there are {len(inputs)} input groups")
        with torch.enable_grad():
            embs = self.embed(*inputs)
            args = list(embs)
            if extra_candidates is not None:
                extra = extra_candidates.detach().to(dtype=args[extra_group].dtype, device=args[extra_group].device)
                args[extra_group] = torch.cat([args[extra_group], extra])
            loss = self.loss_fn(*args, *loss_args, **(loss_kwargs or {}))
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar tensor (use reduction='mean' or 'sum')")
            loss.backward()
        self.last_embeddings = [e.detach() for e in embs]
        return loss.detach()

    __call__ = step
