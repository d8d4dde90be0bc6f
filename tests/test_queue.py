"""MemoryQueue (FIFO ring buffer of detached embeddings / labels) and MomentumEncoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import contrastkit as ck
from contrastkit.negatives import MemoryQueue, MomentumEncoder
from objective_checks import assert_rel_close

D64 = torch.float64


def _reference_fifo(batches, size):
    rows = torch.cat(batches)
    return rows[-size:]


@pytest.mark.parametrize("sizes", [[3], [2, 2, 2, 2], [7], [1, 9, 2], [4, 4], [5, 1, 1, 1, 1, 1, 1]])
def test_fifo_order_and_wraparound(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    q = MemoryQueue(5, 3, with_labels=True)
    seen, seen_y = [], []
    for b in sizes:
        x = torch.randn(b, 3, generator=g)
        y = torch.randint(0, 100, (b,), generator=g)
        q.enqueue(x, labels=y)
        seen.append(x)
        seen_y.append(y)
        want = _reference_fifo(seen, 5)
        assert torch.equal(q.candidates(), want)
        assert torch.equal(q.labels(), _reference_fifo(seen_y, 5))
        assert len(q) == want.shape[0]
    assert q.full == (sum(sizes) >= 5)


def test_empty_queue():
    q = MemoryQueue(4, 6)
    assert q.candidates().shape == (0, 6) and len(q) == 0
    # an empty queue is a valid (no-op) set of extra candidates
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    assert_rel_close(ck.functional.info_nce(a, torch.cat([b, q.candidates()]), temperature=0.1),
                     ck.functional.info_nce(a, b, temperature=0.1))
    assert_rel_close(ck.functional.dcl(a, b, temperature=0.1, extra_candidates=q.candidates()),
                     ck.functional.dcl(a, b, temperature=0.1))


def test_detached_and_follows_device_dtype():
    q = MemoryQueue(8, 4)
    x = torch.randn(3, 4, dtype=D64, requires_grad=True)
    q.enqueue(x * 2)
    c = q.candidates()
    assert c.dtype == D64 and not c.requires_grad
    assert_rel_close(c, 2 * x.detach())
    x.data.zero_()
    assert c.abs().sum() > 0  # a copy, not a view of the input


def test_errors():
    q = MemoryQueue(8, 4)
    with pytest.raises(ValueError, match="4-dimensional embeddings, got dimension 5"):
        q.enqueue(torch.randn(2, 5))
    with pytest.raises(ValueError, match="must have shape"):
        q.enqueue(torch.randn(4))
    with pytest.raises(ValueError, match="keeps no labels"):
        q.enqueue(torch.randn(2, 4), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="keeps no labels"):
        q.labels()
    with pytest.raises(ValueError, match="NaN"):
        q.enqueue(torch.full((2, 4), float("nan")))
    ql = MemoryQueue(8, 4, with_labels=True)
    with pytest.raises(ValueError, match="pass labels="):
        ql.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ql.enqueue(torch.randn(2, 4), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        ql.enqueue(torch.randn(2, 4), labels=torch.zeros(2))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            MemoryQueue(bad, 4)
    # a queue of another dimension used as candidates: the objective names the mismatch
    with pytest.raises(ValueError, match="different embedding dimensions"):
        ck.functional.dcl(torch.randn(3, 5), torch.randn(3, 5), temperature=0.1,
                          extra_candidates=MemoryQueue(4, 4).candidates())


def test_state_dict_roundtrip():
    g = torch.Generator().manual_seed(0)
    q = MemoryQueue(6, 3, with_labels=True)
    for b in (4, 5):
        q.enqueue(torch.randn(b, 3, generator=g, dtype=D64), labels=torch.randint(0, 9, (b,), generator=g))
    state = q.state_dict()
    assert set(state) == {"features", "label_buffer", "ptr", "count"}
    r = MemoryQueue(6, 3, with_labels=True)
    r.load_state_dict(state)
    assert torch.equal(r.candidates(), q.candidates()) and r.candidates().dtype == D64
    assert torch.equal(r.labels(), q.labels())
    # it goes on exactly where the original was
    x, y = torch.randn(2, 3, dtype=D64), torch.tensor([1, 2])
    q.enqueue(x, labels=y)
    r.enqueue(x, labels=y)
    assert torch.equal(r.candidates(), q.candidates())
    with pytest.raises(ValueError, match=r"shape \(6, 3\).*\(5, 3\)"):
        MemoryQueue(5, 3, with_labels=True).load_state_dict(state)
    # a saved and reloaded module inside a bigger model
    holder = nn.Module()
    holder.queue = q
    buf = __import__("io").BytesIO()
    torch.save(holder.state_dict(), buf)
    buf.seek(0)
    h2 = nn.Module()
    h2.queue = MemoryQueue(6, 3, with_labels=True)
    h2.load_state_dict(torch.load(buf))
    assert torch.equal(h2.queue.candidates(), q.candidates())


def test_reset():
    q = MemoryQueue(3, 2)
    q.enqueue(torch.randn(5, 2))
    q.reset()
    assert len(q) == 0 and q.candidates().shape == (0, 2)


def test_queue_as_info_nce_negatives_equals_concatenation():
    g = torch.Generator().manual_seed(4)
    q = MemoryQueue(32, 8)
    q.enqueue(torch.randn(20, 8, generator=g, dtype=D64))
    a = torch.randn(6, 8, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(6, 8, generator=g, dtype=D64, requires_grad=True)
    loss = ck.functional.info_nce(a, torch.cat([b, q.candidates()]), temperature=0.07, tile_size=5)
    x = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(
        torch.cat([b, q.candidates()]), dim=-1).T / 0.07
    ref = (torch.logsumexp(x, 1) - x.diagonal()).mean()
    assert_rel_close(loss, ref)


def _moco_algorithm_1(q, k, queue, t):
    """He et al. 2020, Algorithm 1 (normalised q, k as in the paper):
    l_pos = bmm(q, k), l_neg = mm(q, queue^T), logits = cat([l_pos, l_neg]) / t, CE to label 0."""
    q, k, queue = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k, queue))
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    logits = torch.cat([l_pos, l_neg], 1) / t
    return torch.nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("tile", [None, 3, 7])
def test_queue_info_nce_is_moco_published_formula(tile):
    """The queue path uses only the own key and the queue (MoCo), not the other in-batch keys."""
    g = torch.Generator().manual_seed(5)
    queue = MemoryQueue(32, 8)
    queue.enqueue(torch.randn(20, 8, generator=g, dtype=D64))
    a = torch.randn(6, 8, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(6, 8, generator=g, dtype=D64, requires_grad=True)
    got = queue.info_nce(a, b, temperature=0.07, tile_size=tile)
    want = _moco_algorithm_1(a, b, queue.candidates(), 0.07)
    assert_rel_close(got, want, rtol=1e-12)
    for x, y in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(want, (a, b))):
        assert_rel_close(x, y, rtol=1e-10)
    # the unmasked concatenation is a different loss (other in-batch keys as negatives) ...
    plain = ck.functional.info_nce(a, torch.cat([b, queue.candidates()]), temperature=0.07)
    assert abs(float(plain.detach()) - float(want.detach())) > 1e-3
    # ... which in_batch_negatives=True asks for explicitly (cross-batch memory)
    assert_rel_close(queue.info_nce(a, b, temperature=0.07, in_batch_negatives=True), plain, rtol=1e-12)
    # with an empty queue only the own key is left: every row's loss is 0
    empty = MemoryQueue(4, 8)
    assert abs(float(empty.info_nce(a, b, temperature=0.07).detach())) < 1e-12
    cands, masks = queue.keys_and_queue(b)
    assert cands.shape == (26, 8) and len(masks) == 1


def test_momentum_encoder():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = MomentumEncoder(net, momentum=0.9)
    assert all(not p.requires_grad for p in ema.parameters())
    assert not any(k.startswith("online") for k in ema.state_dict())
    before = [p.clone() for p in ema.ema.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net.train()
    net(torch.randn(8, 4))  # moves the batch-norm running stats
    ema.update()
    for b, p, o in zip(before, ema.ema.parameters(), net.parameters()):
        assert torch.allclose(p, 0.9 * b + 0.1 * o)
    assert torch.equal(ema.ema[1].running_mean, net[1].running_mean)
    ema.update(momentum=0.0)
    for p, o in zip(ema.ema.parameters(), net.parameters()):
        assert torch.equal(p, o)
    out = ema(torch.randn(5, 4))
    assert out.shape == (5, 3) and not out.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        ema.update(1.5)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(net, momentum=-0.1)
    with pytest.raises(ValueError, match="nn.Module"):
        MomentumEncoder(lambda x: x)


def test_moco_style_step():
    """A query encoder trained against keys from its EMA copy and a queue."""
    torch.manual_seed(1)
    enc = nn.Linear(6, 4)
    key_enc = MomentumEncoder(enc, momentum=0.99)
    queue = MemoryQueue(16, 4)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    for _ in range(5):
        x = torch.randn(8, 6)
        q, k = enc(x + 0.01 * torch.randn_like(x)), key_enc(x)
        loss = queue.info_nce(q, k, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        key_enc.update()
        queue.enqueue(k)
    assert len(queue) == 16 and torch.isfinite(loss)
