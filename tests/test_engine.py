"""The tiled engine against the materialised float64 formula: tiled_logsumexp (values and
gradients of q, k and the row / column biases), the masks, the positive terms, tile
choice, and the O(N + M) memory bound of the autograd graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_rel_close, grads_of, naive_lse
from contrastkit.engine import (
    DiagonalMask,
    DifferentLabelMask,
    IndexMask,
    LabelMask,
    TileMask,
    choose_tile,
    label_positive_logits,
    positive_logits,
    tiled_logsumexp,
)

D64 = torch.float64


# ----------------------------------------------------------------------------- strategies

@st.composite
def tile_sizes(draw, n, m):
    """Tile 1, tiles that do not divide N or M, tiles larger than N, (rows, cols) pairs, auto."""
    kind = draw(st.sampled_from(["one", "int", "big", "pair", "auto"]))
    if kind == "one":
        return 1
    if kind == "int":
        return draw(st.integers(2, max(2, max(n, m))))
    if kind == "big":
        return max(n, m) + draw(st.integers(1, 50))
    if kind == "pair":
        return (draw(st.integers(1, n + 3)), draw(st.integers(1, m + 3)))
    return None


@st.composite
def mask_specs(draw, n, m):
    """A list of engine masks and the dense bool matrix of the entries they drop."""
    masks, drop = [], torch.zeros(n, m, dtype=torch.bool)
    if draw(st.booleans()):
        off = draw(st.integers(-n, m))
        masks.append(DiagonalMask(off))
        for i in range(n):
            if 0 <= i + off < m:
                drop[i, i + off] = True
    if draw(st.booleans()):
        nc = draw(st.integers(1, 6))
        rl = torch.tensor(draw(st.lists(st.integers(0, nc), min_size=n, max_size=n)))
        cl = torch.tensor(draw(st.lists(st.integers(0, nc), min_size=m, max_size=m)))
        masks.append(LabelMask(rl, cl))
        drop |= rl[:, None] == cl[None, :]
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        cols = torch.tensor(draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=k, max_size=k),
                                          min_size=n, max_size=n)))
        masks.append(IndexMask(cols))
        for i in range(n):
            for c in cols[i].tolist():
                if c >= 0:
                    drop[i, c] = True
    return masks, drop


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=D64) * scale).requires_grad_()


# ----------------------------------------------------------------------------- tiled_logsumexp

@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tiled_lse_matches_naive_values_and_grads(data):
    n = data.draw(st.integers(1, 24), label="N")
    m = data.draw(st.integers(1, 30), label="M")
    d = data.draw(st.integers(1, 9), label="d")
    tile = data.draw(tile_sizes(n, m), label="tile")
    symmetric = data.draw(st.booleans(), label="symmetric")
    use_rb = data.draw(st.booleans(), label="row_bias")
    use_cb = data.draw(st.booleans(), label="col_bias")
    masks, drop = data.draw(mask_specs(n, m), label="masks")
    scale = data.draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]), label="logit scale")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    q, k = _randn(gen, n, d, scale=scale), _randn(gen, m, d)
    rb = _randn(gen, n, scale=3.0) if use_rb else None
    cb = _randn(gen, m, scale=3.0) if use_cb else None

    # the engine's scale= (1 / temperature): none, a number, a learnable scalar, one per row
    s_kind = data.draw(st.sampled_from(["none", "float", "scalar", "row"]), label="scale=")
    s = {"none": None, "float": 0.5, "scalar": torch.tensor(0.5, dtype=D64, requires_grad=True),
         "row": (torch.rand(n, generator=gen, dtype=D64) + 0.5).requires_grad_()}[s_kind]
    s_ref = {"none": 1.0, "float": 0.5, "scalar": s, "row": s[:, None] if s_kind == "row" else None}[s_kind]

    lse_r, lse_c = tiled_logsumexp(q, k, row_bias=rb, col_bias=cb, masks=masks, symmetric=symmetric,
                                   tile_size=tile, scale=s)
    ref_r, ref_c = naive_lse(q * s_ref, k, row_bias=rb, col_bias=cb, drop=drop)
    assert lse_r.dtype == D64 and lse_r.shape == (n,)
    # rows / columns with every entry dropped are -inf, exactly as the naive logsumexp says
    assert torch.equal(torch.isinf(lse_r), torch.isinf(ref_r))
    fin_r = torch.isfinite(ref_r)
    mag = 1.5 * float((q.detach() @ k.detach().T).abs().max()) + 10.0  # 1.5: the largest scale= drawn
    assert_rel_close(lse_r[fin_r], ref_r[fin_r], scale=mag, what="lse rows")
    if symmetric:
        assert lse_c is not None and lse_c.shape == (m,)
        assert torch.equal(torch.isinf(lse_c), torch.isinf(ref_c))
        fin_c = torch.isfinite(ref_c)
        assert_rel_close(lse_c[fin_c], ref_c[fin_c], scale=mag, what="lse cols")
    else:
        assert lse_c is None
        fin_c = None

    # gradients through a random linear functional of the finite outputs
    g_r = torch.randn(n, generator=gen, dtype=D64) * fin_r
    out = (torch.where(fin_r, lse_r, 0.0) * g_r).sum()
    ref = (torch.where(fin_r, ref_r, 0.0) * g_r).sum()
    if symmetric:
        g_c = torch.randn(m, generator=gen, dtype=D64) * fin_c
        out = out + (torch.where(fin_c, lse_c, 0.0) * g_c).sum()
        ref = ref + (torch.where(fin_c, ref_c, 0.0) * g_c).sum()
    names, inputs = zip(*[(nm, x) for nm, x in zip(["dq", "dk", "drow_bias", "dcol_bias", "dscale"],
                                                    (q, k, rb, cb, s)) if isinstance(x, torch.Tensor)])
    if not out.requires_grad:  # every row dropped: nothing to differentiate
        return
    got, want = grads_of(out, inputs), grads_of(ref, inputs)
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        assert_rel_close(a, b, what=name)


def test_tiled_lse_float32_and_bfloat16_accumulate_in_float32(rng):
    q = torch.randn(50, 16, generator=rng)
    k = torch.randn(70, 16, generator=rng)
    ref_r, ref_c = naive_lse(q.double(), k.double())
    r32, c32 = tiled_logsumexp(q, k, symmetric=True, tile_size=(7, 9))
    assert r32.dtype == torch.float32
    assert_rel_close(r32, ref_r, rtol=1e-5)
    assert_rel_close(c32, ref_c, rtol=1e-5)
    qb, kb = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    rb_, cb_ = tiled_logsumexp(qb, kb, symmetric=True, tile_size=8)
    assert rb_.dtype == torch.float32  # accumulated in float32, not bfloat16
    ref_rb, ref_cb = naive_lse(qb.detach().double(), kb.detach().double())
    assert_rel_close(rb_, ref_rb, rtol=1e-5)  # exact on the (bf16-rounded) inputs to fp32 precision
    assert_rel_close(cb_, ref_cb, rtol=1e-5)
    (rb_.sum() + cb_.sum()).backward()
    assert qb.grad.dtype == torch.bfloat16 and kb.grad.dtype == torch.bfloat16


def test_tiled_lse_huge_logits_do_not_overflow():
    # logits of order 1e4 (e.g. temperature 1e-4 folded into q): exp would overflow in any dtype
    q = torch.tensor([[100.0, 0.0], [0.0, 100.0], [70.0, 70.0]], dtype=D64, requires_grad=True)
    k = torch.tensor([[100.0, 1.0], [1.0, 100.0]], dtype=D64, requires_grad=True)
    lse_r, lse_c = tiled_logsumexp(q, k, symmetric=True, tile_size=1)
    ref_r, ref_c = naive_lse(q, k)
    assert_rel_close(lse_r, ref_r)
    assert_rel_close(lse_c, ref_c)
    got = grads_of(lse_r.sum() + lse_c.sum(), [q, k])
    want = grads_of(ref_r.sum() + ref_c.sum(), [q, k])
    for a, b in zip(got, want):
        assert_rel_close(a, b)
    q32, k32 = q.detach().float(), k.detach().float()
    r32, _ = tiled_logsumexp(q32, k32)
    assert torch.isfinite(r32).all()
    assert_rel_close(r32, ref_r, rtol=1e-6)


@pytest.mark.parametrize("dtype, spread, rtol", [(D64, 1000.0, 1e-9), (torch.float32, 100.0, 1e-5)])
@pytest.mark.parametrize("tile", [1, 3, (4, 7), None])
def test_far_apart_rows_and_columns(dtype, spread, rtol, tile):
    """Row / column biases far apart (|lse_row - lse_col| beyond any shortcut's safe range):
    values and gradients stay exact in both float64 and float32, symmetric or not."""
    gen = torch.Generator().manual_seed(7)
    n, m, d = 9, 11, 5
    q64 = torch.randn(n, d, generator=gen, dtype=D64) * 3
    k64 = torch.randn(m, d, generator=gen, dtype=D64)
    levels = torch.tensor([-1.0, 0.0, 1.0], dtype=D64) * spread
    rb64 = levels[torch.randint(0, 3, (n,), generator=gen)] + torch.randn(n, generator=gen, dtype=D64)
    cb64 = levels[torch.randint(0, 3, (m,), generator=gen)] + torch.randn(m, generator=gen, dtype=D64)
    gr = torch.randn(n, generator=gen, dtype=D64)
    gc = torch.randn(m, generator=gen, dtype=D64)
    ins = [x.to(dtype).requires_grad_() for x in (q64, k64, rb64, cb64)]
    ref_ins = [x.to(dtype).double().requires_grad_() for x in (q64, k64, rb64, cb64)]
    for symmetric in (False, True):
        lse_r, lse_c = tiled_logsumexp(ins[0], ins[1], row_bias=ins[2], col_bias=ins[3], symmetric=symmetric,
                                       tile_size=tile)
        ref_r, ref_c = naive_lse(ref_ins[0], ref_ins[1], row_bias=ref_ins[2], col_bias=ref_ins[3])
        assert_rel_close(lse_r, ref_r, rtol=rtol, what="rows")
        out, ref = (lse_r.double() * gr).sum(), (ref_r * gr).sum()
        if symmetric:
            assert_rel_close(lse_c, ref_c, rtol=rtol, what="cols")
            out, ref = out + (lse_c.double() * gc).sum(), ref + (ref_c * gc).sum()
        for name, a, b in zip(["dq", "dk", "drb", "dcb"], grads_of(out, ins), grads_of(ref, ref_ins)):
            assert torch.isfinite(a).all(), name
            assert_rel_close(a, b, rtol=10 * rtol, what=f"{name} symmetric={symmetric}")


def test_fully_masked_row_is_minus_inf_without_nan_gradient():
    q = torch.randn(3, 4, dtype=D64, requires_grad=True)
    k = torch.randn(3, 4, dtype=D64, requires_grad=True)
    idx = torch.tensor([[0, 1, 2], [-1, -1, -1], [2, -1, -1]])  # row 0 loses every column
    lse_r, lse_c = tiled_logsumexp(q, k, masks=[IndexMask(idx)], symmetric=True, tile_size=2)
    assert lse_r[0] == float("-inf") and torch.isfinite(lse_r[1:]).all()
    (lse_r[1:].sum() + lse_c.sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # "no gradient": the engine may flush masked terms to e^-700 instead of exactly 0
    assert float(q.grad[0].abs().max()) <= 1e-200


def test_single_entry_problem():
    q = torch.randn(1, 3, dtype=D64, requires_grad=True)
    k = torch.randn(1, 3, dtype=D64, requires_grad=True)
    lse_r, lse_c = tiled_logsumexp(q, k, symmetric=True)
    assert_rel_close(lse_r, (q @ k.T)[0])
    assert_rel_close(lse_c, (q @ k.T)[0])
    (lse_r.sum() + lse_c.sum()).backward()
    assert_rel_close(q.grad, 2 * k.detach())
    assert_rel_close(k.grad, 2 * q.detach())


# ----------------------------------------------------------------------------- masks

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), off=st.integers(-14, 14), tr=st.integers(1, 13),
       tc=st.integers(1, 13))
def test_diagonal_mask_drops_exactly_the_shifted_diagonal(n, m, off, tr, tc):
    mask = DiagonalMask(off)
    full = torch.zeros(n, m, dtype=D64)
    for r0 in range(0, n, tr):
        for c0 in range(0, m, tc):
            r1, c1 = min(n, r0 + tr), min(m, c0 + tc)
            tile = torch.zeros(r1 - r0, c1 - c0, dtype=D64)
            hit = mask.touches(r0, r1, c0, c1)
            if hit:
                mask.apply_(tile, r0, r1, c0, c1)
            else:
                assert not any(0 <= i + off < m and c0 <= i + off < c1 for i in range(r0, r1))
            full[r0:r1, c0:c1] = tile
    want = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        if 0 <= i + off < m:
            want[i, i + off] = True
    assert torch.equal(torch.isinf(full), want)


def test_label_and_index_masks_with_duplicate_labels_and_columns():
    rl = torch.tensor([0, 0, 1, 2])
    cl = torch.tensor([0, 1, 1, 0, 5])
    x = torch.zeros(4, 5)
    LabelMask(rl, cl).apply_(x, 0, 4, 0, 5)
    assert torch.equal(torch.isinf(x), rl[:, None] == cl[None, :])
    x = torch.zeros(4, 5)
    IndexMask(torch.tensor([[1, 1], [-1, -1], [4, 0], [3, -1]])).apply_(x, 0, 4, 0, 5)
    want = torch.zeros(4, 5, dtype=torch.bool)
    want[0, 1] = want[2, 4] = want[2, 0] = want[3, 3] = True
    assert torch.equal(torch.isinf(x), want)
    # a 1-D column vector is one dropped column per row
    x = torch.zeros(4, 5)
    IndexMask(torch.tensor([2, -1, 0, 4])).apply_(x, 0, 4, 0, 5)
    assert torch.isinf(x).sum() == 3 and torch.isinf(x[0, 2]) and torch.isinf(x[3, 4])


# ----------------------------------------------------------------------------- positive terms

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_positive_logits_gather(data):
    n, m, d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    idx = torch.tensor(data.draw(st.lists(st.integers(-1, m - 1), min_size=n, max_size=n)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q, k = _randn(gen, n, d), _randn(gen, m, d)
    got = positive_logits(q, k, idx)
    x = q @ k.T
    want = torch.where(idx >= 0, x.gather(1, idx.clamp(min=0)[:, None]).squeeze(1), 0.0)
    assert_rel_close(got, want)
    w = torch.randn(n, generator=gen, dtype=D64)
    for a, b in zip(grads_of((got * w).sum(), [q, k]), grads_of((want * w).sum(), [q, k])):
        assert_rel_close(a, b)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_label_positive_logits_mean_over_same_label(data):
    n, m, d = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6))
    rl = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)))
    cl = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=m, max_size=m)))
    off = data.draw(st.one_of(st.none(), st.integers(-n, m)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q, k = _randn(gen, n, d), _randn(gen, m, d)
    mean, count = label_positive_logits(q, k, rl, cl, self_offset=off)
    same = rl[:, None] == cl[None, :]
    if off is not None:
        for i in range(n):
            if 0 <= i + off < m:
                same[i, i + off] = False
    x = q @ k.T
    cnt = same.sum(1)
    want = torch.where(cnt > 0, (x * same).sum(1) / cnt.clamp(min=1), 0.0)
    assert torch.equal(count, cnt)
    assert_rel_close(mean, want, scale=1.0)
    w = torch.randn(n, generator=gen, dtype=D64)
    for a, b in zip(grads_of((mean * w).sum(), [q, k]), grads_of((want * w).sum(), [q, k])):
        assert_rel_close(a, b, scale=1e-12)


# ----------------------------------------------------------------------------- tile choice

def test_choose_tile_overrides_and_auto():
    cpu = torch.device("cpu")
    assert choose_tile(10, 20, 8, cpu, 4) == (4, 4)
    assert choose_tile(10, 20, 8, cpu, 64) == (10, 20)  # clipped to the problem
    assert choose_tile(10, 20, 8, cpu, (3, 7)) == (3, 7)
    assert choose_tile(10, 20, 8, cpu, [30, 2]) == (10, 2)
    tr, tc = choose_tile(100_000, 100_000, 256, cpu)
    assert 1 <= tr <= 100_000 and 1 <= tc <= 100_000
    assert tr * tc <= 1 << 22  # bounded: never an N x M buffer
    assert choose_tile(1, 1, 1, cpu) == (1, 1)


def test_auto_tile_cuda_keeps_small_problems_whole_and_large_ones_bounded():
    from contrastkit.engine.tiling import auto_tile

    free = 80 << 30
    # up to 2^24 logits: one tile on a GPU (launch-bound otherwise), 64 tiles on a CPU
    assert auto_tile(4096, 4096, free, gpu=True) == (4096, 4096)
    assert auto_tile(4096, 8192, free, gpu=True) == (2048, 8192)   # MNRL with a hard negative: 2 tiles
    assert auto_tile(4096, 4096, free, gpu=False) == (128, 2048)
    # large problems: 2^24 entries, 16,384 columns, as before
    for n in (65536, 262144):
        tr, tc = auto_tile(n, n, free, gpu=True)
        assert (tr, tc) == (1024, 16384) and tr * tc == 1 << 24
    # little free memory caps the tile whatever the device
    tr, tc = auto_tile(65536, 65536, 96 << 20, gpu=True)
    assert tr * tc <= (96 << 20) // (8 * 3 * 4)
    assert auto_tile(1, 1, free, gpu=True) == (1, 1)


# ----------------------------------------------------------------------------- memory bound

def test_autograd_graph_saves_only_linear_state():
    """Forward + backward of symmetric cosine InfoNCE on N = M = 4096 with 64 x 64 tiles:
    no tensor kept for backward may be N x M-sized; everything saved is O((N + M) d).
    (Memory, not time: no timing is asserted.)"""
    from contrastkit.functional import info_nce

    n = m = 4096
    d = 8
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=gen, requires_grad=True)
    b = torch.randn(m, d, generator=gen, requires_grad=True)
    t = torch.tensor(0.07, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    # 4096 small tiles: intra-op threads only add contention here (on a busy 2-core box
    # they made this 30x slower), and this test is about memory, so run it single-threaded
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = info_nce(a, b, temperature=t, symmetric=True, tile_size=64)
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert saved, "the hook saw nothing: the test is not measuring the graph"
    assert max(saved) <= max(n, m) * d, f"a saved tensor has {max(saved)} elements (N*M = {n * m})"
    assert sum(saved) <= 32 * (n + m) * (d + 1), f"{sum(saved)} saved elements is not O((N + M) d)"
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and torch.isfinite(t.grad)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), offset=st.integers(-14, 14),
       tr=st.integers(1, 12), tc=st.integers(1, 12))
def test_tile_diagonal_is_exactly_the_shifted_diagonal_inside_each_tile(n, m, offset, tr, tc):
    from contrastkit.engine.masks import tile_diagonal

    full = torch.zeros(n, m)
    for r0 in range(0, n, tr):
        for c0 in range(0, m, tc):
            r1, c1 = min(n, r0 + tr), min(m, c0 + tc)
            tile = full[r0:r1, c0:c1]                    # a view: fill_ writes through
            cells = tile_diagonal(tile, offset, r0, r1, c0, c1)
            if cells is not None:
                cells.fill_(1.0)
    want = torch.zeros(n, m)
    for i in range(n):
        if 0 <= i + offset < m:
            want[i, i + offset] = 1.0
    assert torch.equal(full, want)


# ------------------------------------------------------------------ TileMask.drops (one cell per row)

class _DenseOnly(TileMask):
    """A mask that only implements apply_: TileMask.drops' default (the tile probe) answers."""

    def __init__(self, dense):
        self.dense = dense

    def apply_(self, x, r0, r1, c0, c1):
        x.masked_fill_(self.dense[r0:r1, c0:c1], float("-inf"))


def _dense_of(mask, n, m):
    x = torch.zeros(n, m)
    mask.apply_(x, 0, n, 0, m)
    return torch.isinf(x)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 300), kind=st.sampled_from(["diag", "label", "different", "index",
                                                                          "dense"]),
       seed=st.integers(0, 2**16), near=st.booleans())
def test_mask_drops_answers_each_rows_cell_as_the_dense_mask(n, m, kind, seed, near):
    g = torch.Generator().manual_seed(seed)
    if kind == "diag":
        mask = DiagonalMask(int(torch.randint(-3, 4, (), generator=g)))
    elif kind in ("label", "different"):
        y_r, y_c = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
        mask = (LabelMask if kind == "label" else DifferentLabelMask)(y_r, y_c)
    elif kind == "index":
        mask = IndexMask(torch.randint(-1, m, (n, 3), generator=g))
    else:
        mask = _DenseOnly(torch.rand(n, m, generator=g) < 0.3)
    # asked cells: near the diagonal (positives) or anywhere, some rows without one (-1)
    cols = (torch.arange(n) + torch.randint(-2, 3, (n,), generator=g)).clamp(0, m - 1) if near else \
        torch.randint(0, m, (n,), generator=g)
    cols[torch.rand(n, generator=g) < 0.2] = -1
    want = _dense_of(mask, n, m)[torch.arange(n), cols.clamp(min=0)] & (cols >= 0)
    assert torch.equal(mask.drops(cols), want)
    assert torch.equal(TileMask.drops(mask, cols), want)   # the generic probe agrees with the override


def test_mask_drops_probe_spans_column_tiles_and_row_blocks():
    # more than one 256-row block and one 4096-column tile: cells scattered over 9000 columns
    g = torch.Generator().manual_seed(0)
    n, m = 600, 9000
    idx = torch.randint(-1, m, (n, 2), generator=g)
    cols = torch.where(torch.rand(n, generator=g) < 0.5, idx[:, 0], torch.randint(0, m, (n,), generator=g))
    mask = IndexMask(idx)
    want = (idx == cols[:, None]).any(1) & (cols >= 0)
    assert bool(want.any()) and not bool(want.all())
    assert torch.equal(TileMask.drops(mask, cols), want) and torch.equal(mask.drops(cols), want)
