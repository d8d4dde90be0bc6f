"""GradCache: a cached step gives the parameter gradients of a plain full-batch step.

The encoder is a tiny BertModel built from a config (no download) with dropout
active, in float64. With dropout the plain reference encodes the same chunks with
autograd (the only way two runs can draw the same masks); without dropout it is one
forward of the whole batch.

The hook mode (``gc.embed(...)`` + the caller's ``loss.backward()``) is held to the same
gradients as ``step()`` and the plain step, for 1, 2 and 3 input groups, and its misuse
(second backward, encoder changed before the backward) must raise. A 2-process gloo run
checks it with a DDP-wrapped encoder re-encoded inside the backward.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import contrastkit as ck
from contrastkit.models import TextEncoder
from contrastkit.scale import GradCache

from conftest import assert_rel_close


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(dropout: float = 0.1, seed: int = 0, dtype=torch.float64) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(dtype)
    enc = TextEncoder(model=model, pooling="mean", normalize=False)
    enc.train()
    return enc


def token_batch(n: int, max_len: int = 12, seed: int = 1) -> dict:
    """Right-padded ids with varied lengths (so padding trimming and token chunks matter)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    ids = torch.randint(1, 60, (n, max_len), generator=g)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def grads(*modules):
    out = []
    for m in modules:
        for name, p in m.named_parameters():
            if p.requires_grad:
                out.append((name, None if p.grad is None else p.grad.detach().clone()))
    return out


def zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def reference_step(gc: GradCache, *inputs, extra=None, extra_group=1, loss_args=()):
    """Plain step: the same chunks encoded *with* autograd, one loss, one backward."""
    embs = []
    for g, inp in enumerate(inputs):
        plan = gc.plan(inp)
        parts = [gc.encode(g, inp, idx) for idx in plan]
        cat = torch.cat(parts)
        order = torch.cat(plan)
        full = torch.empty_like(cat)
        full[order] = cat
        embs.append(full.float() if full.dtype == torch.bfloat16 else full)
    if extra is not None:
        embs[extra_group] = torch.cat([embs[extra_group], extra])
    loss = gc.loss_fn(*embs, *loss_args)
    loss.backward()
    return loss.detach()


def compare(loss_a, ga, loss_b, gb, rtol=1e-10):
    """Loss and every gradient; a gradient is compared relative to its own largest entry or,
    for one that is 0 in exact arithmetic (attention key biases), to the largest gradient
    entry of the model."""
    assert_rel_close(loss_a, loss_b, rtol=rtol, what="loss")
    assert len(ga) == len(gb)
    top = max(float(b.abs().max()) for _, b in gb if b is not None)
    for (name, a), (_, b) in zip(ga, gb):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, rtol=rtol, atol=rtol * 1e-3 * top, what=name)


@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("chunk", [3, 4, 5, 12])
def test_cached_equals_plain_with_dropout(chunk, keep_last):
    enc = tiny_bert(0.1)
    loss_fn = ck.losses.InfoNCE(temperature=0.1, learn_temperature=True).double()
    q, d = token_batch(12, seed=1), token_batch(12, seed=2)
    gc = GradCache(enc, loss_fn, chunk_size=chunk, keep_last=keep_last)

    torch.manual_seed(7)
    loss_ref = reference_step(gc, q, d)
    g_ref, rng_ref = grads(enc, loss_fn), torch.get_rng_state()
    zero(enc, loss_fn)

    torch.manual_seed(7)
    loss = gc.step(q, d)
    compare(loss, grads(enc, loss_fn), loss_ref, g_ref)
    assert torch.equal(torch.get_rng_state(), rng_ref), "the RNG must end where the plain step leaves it"
    assert grads(loss_fn)[0][1] is not None and float(grads(loss_fn)[0][1].abs()) > 0

    # gradient clipping afterwards sees the same gradients
    n1 = torch.nn.utils.clip_grad_norm_(list(enc.parameters()) + list(loss_fn.parameters()), 0.01)
    g_clip = grads(enc, loss_fn)
    zero(enc, loss_fn)
    torch.manual_seed(7)
    reference_step(gc, q, d)
    n2 = torch.nn.utils.clip_grad_norm_(list(enc.parameters()) + list(loss_fn.parameters()), 0.01)
    assert_rel_close(n1, n2, rtol=1e-10, what="grad norm")
    compare(loss, g_clip, loss, grads(enc, loss_fn))


def test_dropout_really_replays():
    """Without restoring the RNG the re-encoded chunks would differ: check the test can fail."""
    enc = tiny_bert(0.3)
    q = token_batch(6)
    torch.manual_seed(0)
    a = enc(**q)
    b = enc(**q)
    assert not torch.allclose(a, b), "dropout must be active for the replay tests to mean anything"


@pytest.mark.parametrize("chunk", [4, 5])
def test_cached_equals_one_forward_without_dropout(chunk):
    enc = tiny_bert(0.0)
    loss_fn = ck.losses.InfoNCE(temperature=0.1, symmetric=True).double()
    q, d = token_batch(10, seed=3), token_batch(10, seed=4)
    loss_ref = loss_fn(enc(**q), enc(**d))  # one forward of the whole batch
    loss_ref.backward()
    g_ref = grads(enc)
    zero(enc)
    loss = GradCache(enc, loss_fn, chunk_size=chunk)(q, d)
    compare(loss, grads(enc), loss_ref.detach(), g_ref, rtol=1e-9)


def test_two_towers_token_chunks_sorted_mnrl_hard_negatives():
    q_enc, d_enc = tiny_bert(0.1, seed=0), tiny_bert(0.1, seed=1)
    loss_fn = ck.losses.MultipleNegativesRanking(scale=10.0)
    q, d, n = token_batch(11, seed=5), token_batch(11, seed=6), token_batch(11, seed=7)
    gc = GradCache(q_enc, loss_fn, doc_encoder=d_enc, chunk_tokens=30, sort_by_length=True)
    plans = [gc.plan(x) for x in (q, d, n)]
    assert all(len(p) > 2 for p in plans)
    for x, p in zip((q, d, n), plans):  # the token budget holds: rows x longest row
        lengths = x["attention_mask"].sum(1)
        for idx in p:
            assert len(idx) == 1 or len(idx) * int(lengths[idx].max()) <= 30
    torch.manual_seed(3)
    loss_ref = reference_step(gc, q, d, n)
    g_ref = grads(q_enc, d_enc)
    zero(q_enc, d_enc)
    torch.manual_seed(3)
    loss = gc.step(q, d, n)
    compare(loss, grads(q_enc, d_enc), loss_ref, g_ref)
    assert all(g is not None for _, g in grads(d_enc) if True)


def test_memory_queue_extra_candidates():
    enc = tiny_bert(0.1)
    loss_fn = ck.losses.InfoNCE(temperature=0.2).double()
    q, d = token_batch(9, seed=8), token_batch(9, seed=9)
    queue = torch.randn(20, 16, dtype=torch.float64)
    gc = GradCache(enc, loss_fn, chunk_size=4)
    torch.manual_seed(5)
    loss_ref = reference_step(gc, q, d, extra=queue)
    g_ref = grads(enc)
    zero(enc)
    torch.manual_seed(5)
    loss = gc.step(q, d, extra_candidates=queue)
    compare(loss, grads(enc), loss_ref, g_ref)
    # the queue changes the loss (it is really in the denominator)
    torch.manual_seed(5)
    assert float(gc.step(q, d)) < float(loss)
    assert [tuple(e.shape) for e in gc.last_embeddings] == [(9, 16), (9, 16)]


def test_bfloat16_autocast():
    enc = tiny_bert(0.1, dtype=torch.float32)
    loss_fn = ck.losses.InfoNCE(temperature=0.1)
    q, d = token_batch(10, seed=10), token_batch(10, seed=11)
    gc = GradCache(enc, loss_fn, chunk_size=4, autocast_dtype=torch.bfloat16)
    torch.manual_seed(2)
    loss_ref = reference_step(gc, q, d)
    g_ref = grads(enc)
    zero(enc)
    torch.manual_seed(2)
    loss = gc.step(q, d)
    # same bf16 computation on both sides; only the float32 accumulation order may differ
    compare(loss, grads(enc), loss_ref, g_ref, rtol=1e-5)
    # and close to the float32 step
    zero(enc)
    torch.manual_seed(2)
    loss32 = GradCache(enc, loss_fn, chunk_size=4)(q, d)
    assert abs(float(loss32) - float(loss)) < 0.05 * abs(float(loss32))


def test_plain_tensor_inputs_and_errors():
    lin = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    loss_fn = ck.losses.InfoNCE(temperature=0.5)
    ref = loss_fn(lin(x), lin(y))
    ref.backward()
    g_ref = grads(lin)
    zero(lin)
    loss = GradCache(lin, loss_fn, chunk_size=2).step(x, y)
    compare(loss, grads(lin), ref.detach(), g_ref, rtol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(lin, loss_fn, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        GradCache(lin, loss_fn, chunk_tokens=0)
    with pytest.raises(ValueError, match="embedding tensor"):
        GradCache(lambda **kw: (1, 2), loss_fn).step({"input_ids": torch.ones(3, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="batch size"):
        GradCache(lin, loss_fn).step({"a": torch.ones(3, 2), "b": torch.ones(4, 2)})
    with pytest.raises(ValueError, match="scalar"):
        GradCache(lin, lambda a, b: (a * b).sum(1)).step(x, y)


# --- hook mode: gc.embed(...) + the caller's loss.backward() ---------------------------

def hook_step(gc: GradCache, *inputs, loss_args=()):
    """The hook mode as a user writes it: embeddings, own loss, plain backward."""
    embs = gc.embed(*inputs)
    assert all(e.requires_grad for e in embs)
    loss = gc.loss_fn(*embs, *loss_args)
    loss.backward()
    return loss.detach()


HOOK_CASES = {
    # name: (groups, rows, chunking, two towers, objective factory, labels?)
    "1 group supcon": (1, 12, {"chunk_size": 5}, False,
                       lambda: ck.losses.SupCon(temperature=0.1, learn_temperature=True).double(), True),
    "2 groups shared": (2, 11, {"chunk_size": 4}, False,
                        lambda: ck.losses.InfoNCE(temperature=0.1, learn_temperature=True).double(), False),
    "2 groups towers": (2, 10, {"chunk_size": 3}, True,
                        lambda: ck.losses.InfoNCE(temperature=0.2, symmetric=True).double(), False),
    "3 groups towers mnrl": (3, 10, {"chunk_size": 4}, True,
                             lambda: ck.losses.MultipleNegativesRanking(scale=10.0), False),
    "3 groups shared tokens": (3, 9, {"chunk_tokens": 30, "sort_by_length": True}, False,
                               lambda: ck.losses.MultipleNegativesRanking(scale=20.0), False),
    "3 groups 3 encoders": (3, 7, {"chunk_size": 3}, 3,
                            lambda: ck.losses.MultipleNegativesRanking(scale=10.0), False),
}


@pytest.mark.parametrize("case,keep_last", [(c, True) for c in HOOK_CASES] + [
    ("1 group supcon", False), ("2 groups towers", False), ("3 groups towers mnrl", False)])
def test_hook_mode_equals_step_and_plain_step(case, keep_last):
    """Three ways, one gradient: a plain step (the same chunks with autograd), step(), and
    embed() + the caller's backward; float64, dropout active, uneven chunks."""
    groups, rows, chunking, towers, factory, labelled = HOOK_CASES[case]
    q_enc = tiny_bert(0.1, seed=0)
    d_enc = tiny_bert(0.1, seed=1) if towers else None
    n_enc = tiny_bert(0.1, seed=2) if towers == 3 else None
    loss_fn = factory()
    mods = [m for m in (q_enc, d_enc, n_enc, loss_fn) if m is not None]
    inputs = [token_batch(rows, seed=20 + g) for g in range(groups)]
    loss_args = (torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0][:rows]),) if labelled else ()
    if towers == 3:  # one encoder per input group
        gc = GradCache([q_enc, d_enc, n_enc], loss_fn, keep_last=keep_last, **chunking)
    else:
        gc = GradCache(q_enc, loss_fn, doc_encoder=d_enc, keep_last=keep_last, **chunking)
    assert any(len(idx) != len(gc.plan(inputs[0])[0]) for idx in gc.plan(inputs[0])), "chunks must be uneven"

    results = []
    for run in (lambda: reference_step(gc, *inputs, loss_args=loss_args),
                lambda: gc.step(*inputs, loss_args=loss_args),
                lambda: hook_step(gc, *inputs, loss_args=loss_args)):
        zero(*mods)
        torch.manual_seed(11)
        loss = run()
        results.append((loss, grads(*mods), torch.get_rng_state()))
    (loss_ref, g_ref, rng_ref), (loss_s, g_s, rng_s), (loss_h, g_h, rng_h) = results
    compare(loss_s, g_s, loss_ref, g_ref)
    compare(loss_h, g_h, loss_ref, g_ref)
    compare(loss_h, g_h, loss_s, g_s, rtol=1e-12)
    assert torch.equal(rng_s, rng_ref) and torch.equal(rng_h, rng_ref), "the RNG must end where a plain step leaves it"
    assert all(g is not None for _, g in grads(q_enc) if True)
    for enc in (d_enc, n_enc):
        if enc is not None:
            assert any(g is not None and float(g.abs().max()) > 0 for _, g in grads(enc))


def test_hook_mode_without_replay_would_differ():
    """The check above can fail: re-encoding without restoring the RNG (dropout masks drawn
    anew) gives other gradients."""
    enc = tiny_bert(0.3)
    loss_fn = ck.losses.InfoNCE(temperature=0.1).double()
    q, d = token_batch(8, seed=30), token_batch(8, seed=31)
    gc = GradCache(enc, loss_fn, chunk_size=3, keep_last=False)
    torch.manual_seed(4)
    reference_step(gc, q, d)
    g_ref = grads(enc)
    zero(enc)
    original = ck.scale.RandState.restore
    try:
        ck.scale.RandState.restore = lambda self: None  # a replay that forgets the RNG
        torch.manual_seed(4)
        hook_step(gc, q, d)
    finally:
        ck.scale.RandState.restore = original
    worst = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(grads(enc), g_ref) if a is not None)
    assert worst > 1e-6


def test_hook_mode_several_groups_partial_use_and_accumulation():
    """A loss that leaves one group unused back-propagates the others; two embed() calls
    before one backward accumulate like two plain steps (gradient accumulation)."""
    enc = tiny_bert(0.1)
    loss_fn = ck.losses.InfoNCE(temperature=0.1).double()
    q, d, n = token_batch(7, seed=40), token_batch(7, seed=41), token_batch(7, seed=42)
    gc = GradCache(enc, loss_fn, chunk_size=3)
    torch.manual_seed(1)
    loss_ref = reference_step(gc, q, d)
    g_ref = grads(enc)
    zero(enc)
    torch.manual_seed(1)
    eq, ed, en = gc.embed(q, d, n)
    loss = loss_fn(eq, ed)
    loss.backward()
    compare(loss.detach(), grads(enc), loss_ref, g_ref)

    # accumulation: 0.5 * (batch A) + 0.5 * (batch B) in one backward == two plain steps
    q2, d2 = token_batch(5, seed=43), token_batch(5, seed=44)
    zero(enc)
    torch.manual_seed(2)
    reference_step(GradCache(enc, lambda a, b: 0.5 * loss_fn(a, b), chunk_size=3), q, d)
    reference_step(GradCache(enc, lambda a, b: 0.5 * loss_fn(a, b), chunk_size=3), q2, d2)
    g_ref = grads(enc)
    zero(enc)
    torch.manual_seed(2)
    a = gc.embed(q, d)
    b = gc.embed(q2, d2)
    (0.5 * loss_fn(*a) + 0.5 * loss_fn(*b)).backward()
    compare(loss, grads(enc), loss, g_ref)


def test_hook_mode_no_grad_is_plain_inference():
    enc = tiny_bert(0.1)
    enc.eval()
    q = token_batch(7, seed=50)
    gc = GradCache(enc, chunk_size=3)
    with torch.no_grad():
        (e,) = gc.embed(q)
        full = enc(**q)
    assert not e.requires_grad
    assert_rel_close(e, full, rtol=1e-10, what="embeddings")


def test_hook_mode_bfloat16_option_and_callers_autocast():
    """autocast_dtype=bf16, or the caller's own autocast region around embed(): the
    backward (outside any autocast) must replay the encoder under the same autocast."""
    enc = tiny_bert(0.1, dtype=torch.float32)
    loss_fn = ck.losses.InfoNCE(temperature=0.1)
    q, d = token_batch(10, seed=60), token_batch(10, seed=61)
    gc16 = GradCache(enc, loss_fn, chunk_size=4, autocast_dtype=torch.bfloat16)
    torch.manual_seed(2)
    loss_ref = gc16.step(q, d)
    g_ref = grads(enc)

    zero(enc)
    torch.manual_seed(2)
    embs = gc16.embed(q, d)
    assert all(e.dtype == torch.float32 for e in embs)
    loss = loss_fn(*embs)
    loss.backward()
    compare(loss.detach(), grads(enc), loss_ref, g_ref, rtol=1e-6)

    gc = GradCache(enc, loss_fn, chunk_size=4)
    zero(enc)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embs = gc.embed(q, d)
    loss = loss_fn(*embs)
    loss.backward()  # outside the autocast region
    compare(loss.detach(), grads(enc), loss_ref, g_ref, rtol=1e-6)

    # the float32 gradients are not those (so the comparison above can fail)
    zero(enc)
    torch.manual_seed(2)
    gc.step(q, d)
    worst = max(float((a - b).abs().max() / b.abs().max()) for (_, a), (_, b) in zip(grads(enc), g_ref)
                if a is not None and float(b.abs().max()) > 0)
    assert worst > 1e-4


def test_hook_mode_misuse_raises():
    enc = tiny_bert(0.1)
    loss_fn = ck.losses.InfoNCE(temperature=0.1).double()
    q, d = token_batch(6, seed=70), token_batch(6, seed=71)
    gc = GradCache(enc, loss_fn, chunk_size=4)

    # a second backward through the same embeddings
    a, b = gc.embed(q, d)
    loss = (a * b).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()

    # the optimiser stepped between embed() and backward()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    a, b = gc.embed(q, d)
    opt.step()
    with pytest.raises(RuntimeError, match="modified in place.*optimizer.step"):
        loss_fn(a, b).backward()

    # train / eval switched
    a, b = gc.embed(q, d)
    enc.eval()
    with pytest.raises(RuntimeError, match="switched to eval mode"):
        loss_fn(a, b).backward()
    enc.train()

    # a parameter replaced
    a, b = gc.embed(q, d)
    lin = enc.model.embeddings.word_embeddings
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced"):
        loss_fn(a, b).backward()

    # the inputs changed in place
    a, b = gc.embed(q, d)
    d["input_ids"][0, 0] = 5
    with pytest.raises(RuntimeError, match=r"inputs\[1\]\['input_ids'\] was modified in place"):
        loss_fn(a, b).backward()

    with pytest.raises(ValueError, match="needs loss_fn"):
        GradCache(enc).step(q, d)
    with pytest.raises(ValueError, match="at least one input group"):
        gc.embed()
    with pytest.raises(ValueError, match="input group 2 has no encoder"):
        GradCache([enc, enc]).embed(q, d, q)
    with pytest.raises(ValueError, match="not both"):
        GradCache([enc, enc], doc_encoder=enc)


# --- hook mode with a DistributedDataParallel encoder (2 gloo processes) -----------------

DDP_WORLD, DDP_ROWS, DDP_IN, DDP_DIM = 2, 5, 6, 4


def _ddp_encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DDP_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, DDP_DIM)).double()


def _ddp_batch():
    g = torch.Generator().manual_seed(42)
    return [torch.randn(DDP_WORLD * DDP_ROWS, DDP_IN, generator=g, dtype=torch.float64) for _ in range(3)]


def _ddp_worker(rank, port, out_dir):
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=DDP_WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        local = [x[rank * DDP_ROWS:(rank + 1) * DDP_ROWS] for x in _ddp_batch()]
        loss_fn = ck.scale.DistributedLoss(ck.losses.MultipleNegativesRanking(scale=5.0))
        for mode in ("embed", "step"):
            enc = _ddp_encoder()
            ddp = torch.nn.parallel.DistributedDataParallel(enc)
            gc = GradCache(ddp, loss_fn, chunk_size=2)  # 2 + 2 + 1 rows: no_sync but for the last chunk
            if mode == "embed":
                loss = loss_fn(*gc.embed(*local))
                loss.backward()
            else:
                loss = gc.step(*local)
            results[mode] = (float(ck.scale.mean_over_ranks(loss.detach())),
                             {k: p.grad.clone() for k, p in enc.named_parameters()})
        dist.barrier()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_hook_mode_with_ddp_encoder_two_ranks(tmp_path):
    """A DDP-wrapped encoder re-encoded inside the backward (all-reduced once, at its last
    chunk) with negatives from both ranks: after DDP averaging the gradients equal one
    process on the concatenated batch, in the embed() mode and in step()."""
    import os
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=DDP_WORLD, join=False,
                             start_method="spawn")
    t0 = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t0 > 240:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-rank workers did not finish (hang?)")
    res = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(DDP_WORLD)]
    for r in res:
        assert "error" not in r, r["error"]

    enc = _ddp_encoder()
    ref = ck.losses.MultipleNegativesRanking(scale=5.0)(*[enc(x) for x in _ddp_batch()])
    ref.backward()
    ref_value = float(ref.detach())
    ref_grads = {k: p.grad for k, p in enc.named_parameters()}
    for rank, r in enumerate(res):
        for mode in ("embed", "step"):
            loss, g = r[mode]
            assert abs(loss - ref_value) <= 1e-12 * abs(ref_value), (rank, mode, loss, ref_value)
            for k in ref_grads:
                assert_rel_close(g[k], ref_grads[k], rtol=1e-10, atol=1e-15, what=f"rank {rank} {mode} {k}")
