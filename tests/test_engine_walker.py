"""The one tile walker and what every engine Function gets from it: ``scale=`` (python
number, learnable 0-dim tensor, per-anchor (N,) tensor) with its exact gradient, in both
the direct and the stabilised regimes, against materialised float64 formulas; the SigLIP
overflow regression (temperatures 1e-4..1e-2, float32 and float64); the overflow-free
L2 normalisation; and the walker's own contract (every tile once, one reused buffer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import contrastkit as ck
from conftest import assert_rel_close, grads_of
from contrastkit.engine import (
    DiagonalMask,
    DifferentLabelMask,
    IndexMask,
    LabelMask,
    LSEStat,
    tiled_logsumexp,
    tiled_logsumexp_with_positives,
    tiled_multi_logsumexp,
)
from contrastkit.engine.neighbors import tiled_topk
from contrastkit.engine.normalize import l2_normalize
from contrastkit.engine.tiled_pairwise import IndexWeights, KernelStats, LabelWeights, tiled_pairwise
from contrastkit.engine.tiled_softplus import tiled_softplus_rows
from contrastkit.engine.tiles import Tiles, as_scale, stable_softplus

D64 = torch.float64
NEG = float("-inf")


def _scale(kind, n, gen, magnitude):
    """The three forms ``scale=`` takes, and the (N, 1) / scalar factor the reference uses."""
    if kind == "float":
        return float(magnitude), magnitude
    if kind == "scalar":
        s = torch.tensor(float(magnitude), dtype=D64, requires_grad=True)
        return s, s
    s = ((torch.rand(n, generator=gen, dtype=D64) + 0.5) * magnitude).requires_grad_()
    return s, s[:, None]


def _inputs(gen, n, m, d):
    q = torch.randn(n, d, generator=gen, dtype=D64, requires_grad=True)
    k = torch.randn(m, d, generator=gen, dtype=D64, requires_grad=True)
    return q, k


def _check_grads(out, ref, inputs, atol=0.0):
    for i, (a, b) in enumerate(zip(grads_of(out, inputs), grads_of(ref, inputs))):
        assert torch.isfinite(a).all(), f"input {i}"
        assert_rel_close(a, b, atol=atol, what=f"grad of input {i}")


# magnitude 0.3: every |X| <= 32, the direct regime; 30: the stabilised regime
MAGNITUDES = [0.3, 30.0]
SCALE_KINDS = ["float", "scalar", "row"]


# ----------------------------------------------------------------------------- the walker


def test_walker_visits_every_tile_once_into_one_reused_buffer():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 3, generator=gen), torch.randn(7, 3, generator=gen)
    s = torch.rand(10, generator=gen) + 0.5
    tiles = Tiles(q, k, masks=[DiagonalMask(1)], tile=(4, 3), scale=s)
    seen = torch.zeros(10, 7, dtype=torch.int64)
    full = torch.empty(10, 7)
    ptrs = set()
    for r0, r1, c0, c1, x in tiles:
        seen[r0:r1, c0:c1] += 1
        full[r0:r1, c0:c1] = x
        ptrs.add(x.data_ptr())
    assert torch.equal(seen, torch.ones_like(seen))
    assert ptrs == {tiles.buffers[0].data_ptr()}  # no tile got a fresh allocation
    want = (q * s[:, None]) @ k.T
    i = torch.arange(6)
    want[i, i + 1] = NEG
    assert torch.equal(torch.isinf(full), torch.isinf(want))
    assert_rel_close(full[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-6)
    assert tiles.logit_bound() >= float(want[torch.isfinite(want)].abs().max())


@pytest.mark.parametrize("tile", [1, (3, 4), (5, 2), None])
@pytest.mark.parametrize("self_offset", [None, 0, 2])
def test_tiled_topk_on_the_walker(tile, self_offset):
    gen = torch.Generator().manual_seed(13)
    q, k = torch.randn(11, 4, generator=gen, dtype=D64), torch.randn(9, 4, generator=gen, dtype=D64)
    vals, idx = tiled_topk(q, k, 3, self_offset=self_offset, tile_size=tile)
    s = q @ k.T
    if self_offset is not None:
        i = torch.arange(11)
        ok = i + self_offset < 9
        s[i[ok], i[ok] + self_offset] = NEG
    want_v, want_i = s.topk(3, dim=1)
    assert torch.equal(idx, want_i)
    assert_rel_close(vals, want_v)


def test_as_scale_forms_and_errors():
    q = torch.randn(4, 2)
    assert as_scale(None, 4, q) is None
    assert float(as_scale(2, 4, q)) == 2.0 and as_scale(2, 4, q).dtype == torch.float32
    assert as_scale(torch.ones(4), 4, q).shape == (4,)
    with pytest.raises(ValueError, match=r"scale must be a number, a scalar tensor or have shape \(4,\)"):
        as_scale(torch.ones(3), 4, q)
    with pytest.raises(ValueError, match="floating"):
        as_scale(torch.ones(4, dtype=torch.long), 4, q)
    with pytest.raises(ValueError, match="finite"):
        as_scale(float("inf"), 4, q)
    with pytest.raises(ValueError, match="number or a tensor"):
        as_scale("big", 4, q)
    with pytest.raises(ValueError, match=r"scale must be a number, a scalar tensor or have shape \(3,\)"):
        tiled_logsumexp(torch.randn(3, 2), torch.randn(5, 2), scale=torch.ones(2, 2))


# ----------------------------------------------------------------------------- scale= in each Function


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_tiled_logsumexp_scale(magnitude, kind, symmetric):
    gen = torch.Generator().manual_seed(1)
    n, m, d = 9, 12, 4
    q, k = _inputs(gen, n, m, d)
    s, sref = _scale(kind, n, gen, magnitude)
    inputs = [q, k] + ([s] if isinstance(s, torch.Tensor) else [])
    masks = [DiagonalMask(2), IndexMask(torch.randint(-1, m, (n, 2), generator=gen))]
    drop = torch.zeros(n, m, dtype=torch.bool)
    for mk in masks:
        x = torch.zeros(n, m, dtype=D64)
        mk.apply_(x, 0, n, 0, m)
        drop |= torch.isinf(x)
    wr, wc = torch.randn(n, generator=gen, dtype=D64), torch.randn(m, generator=gen, dtype=D64)
    for tile in (1, (4, 5), None):
        r, c = tiled_logsumexp(q, k, scale=s, masks=masks, symmetric=symmetric, tile_size=tile)
        x = (sref * q @ k.T).masked_fill(drop, NEG)
        rr, rc = torch.logsumexp(x, 1), torch.logsumexp(x, 0)
        assert_rel_close(r, rr, what="rows")
        out, ref = (r * wr).sum(), (rr * wr).sum()
        if symmetric:
            assert_rel_close(c, rc, what="cols")
            out, ref = out + (c * wc).sum(), ref + (rc * wc).sum()
        _check_grads(out, ref, inputs)


@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_tiled_logsumexp_with_positives_scale(kind):
    gen = torch.Generator().manual_seed(2)
    n, m, d = 7, 10, 3
    q, k = _inputs(gen, n, m, d)
    s, sref = _scale(kind, n, gen, 5.0)
    idx = torch.tensor([0, 3, -1, 9, 2, 2, 5])
    inputs = [q, k] + ([s] if isinstance(s, torch.Tensor) else [])
    lse, _, pos = tiled_logsumexp_with_positives(q, k, idx, scale=s, tile_size=(3, 4))
    x = sref * q @ k.T
    want_pos = torch.where(idx >= 0, x.gather(1, idx.clamp(min=0)[:, None]).squeeze(1), 0.0)
    assert_rel_close(pos, want_pos)
    _check_grads((lse - 2 * pos).sum(), (torch.logsumexp(x, 1) - 2 * want_pos).sum(), inputs)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
def test_tiled_multi_logsumexp_scale(magnitude, kind):
    gen = torch.Generator().manual_seed(3)
    n, m, d = 8, 11, 4
    q, k = _inputs(gen, n, m, d)
    y_r, y_c = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (m,), generator=gen)
    s, sref = _scale(kind, n, gen, magnitude)
    inputs = [q, k] + ([s] if isinstance(s, torch.Tensor) else [])
    stats = [LSEStat(1.5, (LabelMask(y_r, y_c),)), LSEStat(0.5), LSEStat(1.0, (DifferentLabelMask(y_r, y_c),))]
    w = torch.randn(3, n, generator=gen, dtype=D64)
    for tile in (1, (3, 4), None):
        out = tiled_multi_logsumexp(q, k, stats, masks=[DiagonalMask(0)], scale=s, tile_size=tile)
        x = sref * q @ k.T
        eye = torch.zeros(n, m, dtype=torch.bool)
        eye[torch.arange(n), torch.arange(n)] = True
        same = y_r[:, None] == y_c[None, :]
        ref = torch.stack([torch.logsumexp((1.5 * x).masked_fill(eye | same, NEG), 1),
                           torch.logsumexp((0.5 * x).masked_fill(eye, NEG), 1),
                           torch.logsumexp(x.masked_fill(eye | ~same, NEG), 1)])
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(out), fin)
        assert_rel_close(out[fin], ref[fin])
        _check_grads((torch.where(fin, out, 0) * w).sum(), (torch.where(fin, ref, 0) * w).sum(), inputs)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("kernel", ["linear", "student_t"])
def test_tiled_pairwise_scale(magnitude, kind, kernel):
    gen = torch.Generator().manual_seed(4)
    n, m, d = 7, 9, 3
    q, k = _inputs(gen, n, m, d)
    rb = torch.randn(n, generator=gen, dtype=D64, requires_grad=True)
    cb = torch.randn(m, generator=gen, dtype=D64, requires_grad=True)
    s, sref = _scale(kind, n, gen, magnitude)
    inputs = [q, k, rb, cb] + ([s] if isinstance(s, torch.Tensor) else [])
    lr, lc = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (m,), generator=gen)
    rs = torch.rand(n, generator=gen, dtype=D64)
    op = KernelStats(kernel, weights=LabelWeights(lr, lc, rs, self_offset=1), lse=True)
    weights = [torch.randn(m if i >= 2 else n, generator=gen, dtype=D64) for i in range(4)]
    for tile in (1, (3, 4), None):
        rows, cols = tiled_pairwise(q, k, op, row_bias=rb, col_bias=cb, masks=[DiagonalMask(0)], columns=True,
                                    scale=s, tile_size=tile)
        u = sref * q @ k.T + rb[:, None] + cb[None, :]
        x = u if kernel == "linear" else -torch.log1p((-2 * u).clamp(min=0))
        w = (lr[:, None] == lc[None, :]).to(D64) * rs[:, None]
        i = torch.arange(n)
        ok = i + 1 < m
        w[i[ok], i[ok] + 1] = 0
        eye = torch.zeros(n, m, dtype=torch.bool)
        eye[i, i] = True
        w = w.masked_fill(eye, 0)
        xm = x.masked_fill(eye, NEG)
        want = [(w * x).sum(1), torch.logsumexp(xm, 1), (w * x).sum(0), torch.logsumexp(xm, 0)]
        got = [rows[0], rows[1], cols[0], cols[1]]
        for a, b in zip(got, want):
            assert_rel_close(a, b)
        _check_grads(sum((a * c).sum() for a, c in zip(got, weights)),
                     sum((b * c).sum() for b, c in zip(want, weights)), inputs, atol=1e-13)


def test_tiled_pairwise_direct_and_stabilised_regimes_agree():
    """The same problem below and above the direct limit (a scale factor of 1e-3 keeps
    the logits bounded, 1.0 does not) agrees with the float64 formula in float32."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(40, 8, generator=gen) * 20, torch.randn(50, 8, generator=gen)
    cols = torch.randint(-1, 50, (40, 3), generator=gen)
    op = KernelStats("linear", weights=IndexWeights(cols, torch.full((40,), 1 / 3)), lse=True)
    for s in (1e-3, 1.0):
        rows, _ = tiled_pairwise(q, k, op, scale=s, tile_size=(16, 16))
        x = s * q.double() @ k.double().T
        assert_rel_close(rows[1], torch.logsumexp(x, 1), rtol=1e-5)


# ----------------------------------------------------------------------------- SigLIP's softplus


def _naive_siglip_rows(q, k, s, b, positives):
    u = s * q @ k.T + b[:, None]
    z = -torch.ones_like(u)
    rows = (positives >= 0).nonzero().squeeze(1)
    z[rows, positives[rows]] = 1.0
    return -F.logsigmoid(z * u).sum(1)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("positives", [None, "diag", "index"])
def test_tiled_softplus_rows_scale_and_positives(magnitude, kind, positives):
    gen = torch.Generator().manual_seed(6)
    n, m, d = 8, 11, 4
    q, k = _inputs(gen, n, m, d)
    b = torch.randn(n, generator=gen, dtype=D64, requires_grad=True)
    s, sref = _scale(kind, n, gen, magnitude)
    inputs = [q, k, b] + ([s] if isinstance(s, torch.Tensor) else [])
    idx = {None: None, "diag": torch.arange(n), "index": torch.tensor([3, -1, 0, 10, 4, 4, -1, 1])}[positives]
    w = torch.randn(n, generator=gen, dtype=D64)
    for tile in (1, (3, 4), None):
        got = tiled_softplus_rows(q, k, row_bias=b, scale=s, positives=idx, tile_size=tile,
                                  masks=[DiagonalMask(2)])
        u = sref * q @ k.T + b[:, None]
        i = torch.arange(n)
        ok = i + 2 < m
        keep = torch.ones(n, m, dtype=D64)
        keep[i[ok], i[ok] + 2] = 0
        if idx is None:
            want = (F.softplus(u, threshold=1000.0) * keep).sum(1)
        else:
            z = -torch.ones_like(u)
            has = (idx >= 0).nonzero().squeeze(1)
            z[has, idx[has]] = 1.0
            keep[has, idx[has]] = 1.0  # the positive cell counts even where the extra mask sits
            want = (-F.logsigmoid(z * u) * keep).sum(1)
        assert_rel_close(got, want)
        _check_grads((got * w).sum(), (want * w).sum(), inputs, atol=1e-13)


def test_siglip_noisy_pair_does_not_overflow():
    """The regression of issue 7: a positive pair with logit -110 at temperature 0.01."""
    x = torch.tensor([[1.0, 0.0]], requires_grad=True)
    y = torch.tensor([[-1.0, 0.0]])
    loss = ck.functional.siglip(x, y, temperature=0.01, bias=-10.0)
    assert float(loss.detach()) == pytest.approx(110.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("temperature", [1e-4, 1e-3, 1e-2])
def test_siglip_small_temperatures_match_float64_reference(dtype, temperature):
    """Cosine logits up to +-1e4: values and gradients (x, y, temperature, bias) against the
    float64 formula -log sigmoid(z u), in float32 and float64."""
    gen = torch.Generator().manual_seed(8)
    n, d = 12, 6
    x64 = torch.randn(n, d, generator=gen, dtype=D64)
    y64 = torch.randn(n, d, generator=gen, dtype=D64)
    y64[:4] = -x64[:4]  # noisy positive pairs: their logit is about -1/temperature
    ins = [x64.to(dtype).requires_grad_(), y64.to(dtype).requires_grad_(),
           torch.tensor(temperature, dtype=dtype, requires_grad=True), torch.tensor(-10.0, dtype=dtype,
                                                                                   requires_grad=True)]
    ref = [t.detach().double().requires_grad_() for t in ins]
    got = ck.functional.siglip(ins[0], ins[1], temperature=ins[2], bias=ins[3], tile_size=(5, 7))
    xn, yn = F.normalize(ref[0], dim=-1), F.normalize(ref[1], dim=-1)
    want = _naive_siglip_rows(xn, yn, 1 / ref[2], ref[3].expand(n), torch.arange(n)).sum() / n
    assert torch.isfinite(got)
    rtol = 1e-9 if dtype == D64 else 1e-5
    assert_rel_close(got.double(), want, rtol=rtol)
    for i, (a, b) in enumerate(zip(grads_of(got, ins), grads_of(want, ref))):
        assert torch.isfinite(a).all(), f"input {i}"
        # float32: the logits themselves are rounded at 1e4 / 2^24 ~ 6e-4 absolute
        assert_rel_close(a.double(), b, rtol=rtol if dtype == D64 else 2e-3, atol=0 if dtype == D64 else 1e-3,
                         what=f"grad {i}")


def test_stable_softplus_every_magnitude():
    for dtype in (torch.float32, D64):
        u = torch.tensor([-1e30, -1e4, -110.0, -20.0, 0.0, 20.0, 110.0, 1e4, 1e30], dtype=dtype)
        got = stable_softplus(u)
        ud = u.double()
        want = torch.where(ud > 0, ud + torch.log1p(torch.exp(-ud)), torch.log1p(torch.exp(ud)))
        assert torch.isfinite(got).all()
        assert_rel_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=1e-300)


# ----------------------------------------------------------------------------- temperature sweep, every Function


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("temperature", [1e-4, 1e-3, 1e-2])
def test_every_function_at_small_temperatures(dtype, temperature):
    """Unit vectors at scale 1 / temperature (logits up to 1e4) through each Function with a
    learnable scale: finite and equal to the float64 formula (float32 to its rounding)."""
    gen = torch.Generator().manual_seed(9)
    n, d = 10, 5
    q64 = F.normalize(torch.randn(n, d, generator=gen, dtype=D64), dim=-1)
    k64 = F.normalize(torch.randn(n, d, generator=gen, dtype=D64), dim=-1)
    s64 = torch.tensor(1 / temperature, dtype=D64)
    rtol = 1e-9 if dtype == D64 else 1e-5
    q, k = q64.to(dtype).requires_grad_(), k64.to(dtype).requires_grad_()
    s = s64.to(dtype).requires_grad_()
    qr, kr, sr = (t.detach().double().requires_grad_() for t in (q, k, s))
    eye = torch.eye(n, dtype=torch.bool)

    def x():
        return sr * qr @ kr.T

    cases = {
        "lse": (lambda: torch.cat(tiled_logsumexp(q, k, scale=s, symmetric=True, tile_size=4)).sum(),
                lambda: torch.logsumexp(x(), 1).sum() + torch.logsumexp(x(), 0).sum()),
        "multi": (lambda: tiled_multi_logsumexp(q, k, [LSEStat(1.0), LSEStat(0.5)], masks=[DiagonalMask()],
                                                scale=s, tile_size=4).sum(),
                  lambda: torch.logsumexp(x().masked_fill(eye, NEG), 1).sum()
                  + torch.logsumexp((0.5 * x()).masked_fill(eye, NEG), 1).sum()),
        "pairwise": (lambda: tiled_pairwise(q, k, KernelStats(lse=True), scale=s, tile_size=4)[0].sum(),
                     lambda: torch.logsumexp(x(), 1).sum()),
        "softplus": (lambda: tiled_softplus_rows(q, k, scale=s, row_bias=torch.full((n,), -10.0, dtype=dtype),
                                                 positives=torch.arange(n), tile_size=4).sum(),
                     lambda: -F.logsigmoid(torch.where(eye, 1.0, -1.0).to(D64) * (x() - 10.0)).sum()),
    }
    for name, (fn, ref_fn) in cases.items():
        got, want = fn(), ref_fn()
        assert torch.isfinite(got), name
        assert_rel_close(got.double(), want, rtol=rtol, what=name)
        ga, gb = grads_of(got, [q, k, s]), grads_of(want, [qr, kr, sr])
        for i, (a, b) in enumerate(zip(ga, gb)):
            assert torch.isfinite(a).all(), f"{name} grad {i}"
            # float32 logits near 1e4 carry ~1e-3 absolute rounding: compare against the gradient's scale
            tol = rtol if dtype == D64 else 2e-3
            assert_rel_close(a.double(), b, rtol=tol, atol=tol * float(b.abs().max()), what=f"{name} grad {i}")


# ----------------------------------------------------------------------------- L2 normalisation


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_l2_normalize_huge_tiny_and_zero_rows(dtype):
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(5, 7, generator=gen, dtype=D64)
    mags = torch.tensor([1e20, 1e-20, 1.0, 3e30, 1e-30], dtype=D64)
    x = (base * mags[:, None]).to(dtype)
    x = torch.cat([x, torch.zeros(1, 7, dtype=dtype)]).requires_grad_()
    y = l2_normalize(x)
    xd = x.detach().double()
    nrm = xd.norm(dim=1, keepdim=True)
    want = torch.where(nrm > 0, xd / nrm.clamp_min(1e-300), 0.0)  # float64 has the range for these
    assert torch.isfinite(y).all()
    assert_rel_close(y.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-14)
    assert torch.allclose(y[:5].double().norm(dim=1), torch.ones(5, dtype=D64), rtol=1e-6)
    assert torch.equal(y[5], torch.zeros(7, dtype=dtype))  # documented: an all-zero row stays 0
    g = torch.randn(6, 7, generator=gen, dtype=D64)
    (y.double() * g).sum().backward()
    yw = want[:5]
    want_dx = (g[:5] - yw * (yw * g[:5]).sum(1, keepdim=True)) / nrm[:5]
    assert torch.isfinite(x.grad).all()
    for i in range(5):  # each row on its own scale (1e-20 .. 1e20)
        assert_rel_close(x.grad[i].double(), want_dx[i], rtol=1e-5 if dtype == torch.float32 else 1e-12,
                         what=f"row {i}")
    assert_rel_close(x.grad[5].double(), g[5] / 1e-12, rtol=1e-6)  # zero row: g / eps, as F.normalize


def test_l2_normalize_equals_f_normalize_on_ordinary_rows():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(20, 9, generator=gen, dtype=D64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(20, 9, generator=gen, dtype=D64)
    y, y2 = l2_normalize(x), F.normalize(x2, dim=-1)
    assert_rel_close(y, y2, rtol=1e-14)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    assert_rel_close(x.grad, x2.grad, rtol=1e-12)


def test_info_nce_with_huge_embeddings_is_not_log_m():
    """float32 embeddings of magnitude 1e20 used to normalise to zero rows (loss = log M)."""
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    want = ck.functional.info_nce(a.double(), b.double(), temperature=0.1)
    got = ck.functional.info_nce(a * 1e20, b * 1e20, temperature=0.1)
    assert_rel_close(got.double(), want, rtol=1e-5)
