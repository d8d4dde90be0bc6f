"""Two gloo processes on CPU (spawned here): after DDP averaging, the loss and every
parameter gradient (temperature included) equal those of one process on the
concatenated batch, in gather and ring mode; with gradient caching too; and ranks that
disagree on the batch size get a ValueError, not a hang.

All cases run in one spawn (process start-up dominates the time).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import contrastkit as ck
from contrastkit.engine import IndexMask
from contrastkit.objectives.base import Objective
from contrastkit.scale import DistributedLoss, GradCache, average_gradients, mean_over_ranks

from conftest import assert_rel_close

WORLD = 2
N_LOCAL = 5  # rows per rank
DIM_IN, DIM = 6, 4


class Model(nn.Module):
    """Encoder(s) and the loss in one module, so DDP averages the temperature too."""

    def __init__(self, objective, mode=None, two_towers=False, build=None):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Sequential(nn.Linear(DIM_IN, 8), nn.Tanh(), nn.Linear(8, DIM)).double()
        self.d = nn.Sequential(nn.Linear(DIM_IN, 8), nn.Tanh(), nn.Linear(8, DIM)).double() if two_towers else None
        self.loss = objective.double()
        self.dist_loss = DistributedLoss(self.loss, mode=mode) if mode else None
        self.build = build or (lambda embs, extra: (embs, {}))

    def forward(self, xs, extra):
        embs = [self.q(xs[0])] + [(self.d or self.q)(x) for x in xs[1:]]
        args, kwargs = self.build(embs, extra)
        return (self.dist_loss or self.loss)(*args, **kwargs)


def _views(embs, extra):            # (N, V, d) from the V input groups
    return [torch.stack(embs, 1)], {}


def _labelled_views(embs, extra):
    return [torch.stack(embs, 1), extra["labels"]], {}


def _global_masks(embs, extra):     # false negatives, in the coordinates of the concatenated batch
    cols = torch.tensor([[3, -1], [7, 2], [-1, -1], [0, 9], [5, 5], [1, -1], [8, 4], [-1, 6], [2, 3], [6, -1]])
    return embs, {"masks": [IndexMask(cols)]}


L = ck.losses
# name: (class, factory, input groups, two towers, build (embeddings, per-row extras) -> args, kwargs)
CASES = {
    "infonce": (L.InfoNCE, lambda: L.InfoNCE(temperature=0.3, learn_temperature=True), 2, False, None),
    "infonce_margin": (L.InfoNCE, lambda: L.InfoNCE(temperature=0.1, margin=0.3, learn_temperature=True), 2, False, None),
    "infonce_masks": (L.InfoNCE, lambda: L.InfoNCE(temperature=0.2), 2, False, _global_masks),
    "clip_two_towers": (L.InfoNCE, lambda: L.InfoNCE(temperature=0.2, learn_temperature=True, symmetric=True), 2, True, None),
    "clip_margin": (L.InfoNCE, lambda: L.InfoNCE(temperature=0.2, symmetric=True, margin=0.2, learn_temperature=True),
                    2, True, None),
    "mnrl_hard_negatives": (L.MultipleNegativesRanking, lambda: L.MultipleNegativesRanking(scale=5.0), 3, False, None),
    "mnrl_symmetric": (L.MultipleNegativesRanking,
                       lambda: L.MultipleNegativesRanking(temperature=0.2, symmetric=True, learn_temperature=True),
                       2, False, None),
    "mnrl_masks": (L.MultipleNegativesRanking, lambda: L.MultipleNegativesRanking(scale=5.0), 2, False, _global_masks),
    "ntxent": (L.NTXent, lambda: L.NTXent(temperature=0.5, learn_temperature=True), 2, False, None),
    "ntxent_margin": (L.NTXent, lambda: L.NTXent(temperature=0.5, margin=0.25, learn_temperature=True), 2, False, None),
    "siglip_two_towers": (L.SigLIP, lambda: L.SigLIP(temperature=0.3, bias=-2.0, learn_temperature=True), 2, True, None),
    "siglip_masks": (L.SigLIP, lambda: L.SigLIP(temperature=0.3, bias=-2.0, learn_temperature=True), 2, True,
                     _global_masks),
    "cwcl": (L.CWCL, lambda: L.CWCL(temperature=0.2, learn_temperature=True), 2, True, None),
    "cwcl_symmetric": (L.CWCL, lambda: L.CWCL(temperature=0.2, symmetric=True), 2, True, None),
    "icon_labels": (L.ICon, lambda: L.ICon(temperature=0.3, learn_temperature=True), 1, False,
                    lambda e, x: ([e[0], x["labels"]], {})),
    "icon_teacher_knn": (L.ICon, lambda: L.ICon(kernel="student_t", neighbors=3), 1, False,
                         lambda e, x: ([e[0]], {"teacher": x["teacher"]})),
    "multiview": (L.MultiViewInfoNCE, lambda: L.MultiViewInfoNCE(temperature=0.3, learn_temperature=True), 3, False,
                  _views),
    "multiview_joint": (L.MultiViewInfoNCE, lambda: L.MultiViewInfoNCE(temperature=0.3, aggregation="joint"), 3, False,
                        _views),
    "alignment": (L.Alignment, lambda: L.Alignment(alpha=1.5), 2, False, None),
    "uniformity": (L.Uniformity, lambda: L.Uniformity(t=2.0), 1, False, None),
    "align_uniform": (L.AlignUniform, lambda: L.AlignUniform(uniformity_weight=0.5), 2, True, None),
    "supcon": (L.SupCon, lambda: L.SupCon(temperature=0.2, learn_temperature=True), 2, False, _labelled_views),
    "supcon_in_margin": (L.SupCon, lambda: L.SupCon(temperature=0.2, variant="in", margin=0.2, learn_temperature=True),
                         2, False, _labelled_views),
    "dcl_two_view": (L.DCL, lambda: L.DCL(temperature=0.3, two_view=True, learn_temperature=True), 2, False, None),
    "dcl_retrieval": (L.DCL, lambda: L.DCL(temperature=0.3), 2, True, None),
    "dcl_masks": (L.DCL, lambda: L.DCL(temperature=0.3, learn_temperature=True), 2, True, _global_masks),
    "dclw_two_view": (L.DCLW, lambda: L.DCLW(temperature=0.3, sigma=0.5, two_view=True), 2, False, None),
    "debiased": (L.DebiasedContrastive,
                 lambda: L.DebiasedContrastive(temperature=0.5, tau_plus=0.1, two_view=True, learn_temperature=True),
                 2, False, None),
    "hard_negative": (L.HardNegativeContrastive,
                      lambda: L.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1), 2, True, None),
    "hard_negative_masks": (L.HardNegativeContrastive,
                            lambda: L.HardNegativeContrastive(temperature=0.5, beta=1.0, tau_plus=0.1), 2, True,
                            _global_masks),
}


def ring_offered(name):
    obj = CASES[name][1]()
    w = obj.work
    return w.ring and not (w.symmetric and w.margin) and CASES[name][4] is not _global_masks


def batch(groups: int):
    g = torch.Generator().manual_seed(42)
    xs = [torch.randn(WORLD * N_LOCAL, DIM_IN, generator=g, dtype=torch.float64) for _ in range(groups)]
    extra = {"labels": torch.randint(0, 3, (WORLD * N_LOCAL,), generator=g),
             "teacher": torch.randn(WORLD * N_LOCAL, 5, generator=g, dtype=torch.float64)}
    return xs, extra


def reference(name):
    _, factory, groups, towers, build = CASES[name]
    model = Model(factory(), None, towers, build)
    xs, extra = batch(groups)
    loss = model(xs, extra)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def local(xs, rank):
    return [x[rank * N_LOCAL:(rank + 1) * N_LOCAL] for x in xs]


def run_case(name, mode, rank):
    _, factory, groups, towers, build = CASES[name]
    model = Model(factory(), mode, towers, build)
    ddp = nn.parallel.DistributedDataParallel(model)
    xs, extra = batch(groups)
    loss = ddp(local(xs, rank), {k: v[rank * N_LOCAL:(rank + 1) * N_LOCAL] for k, v in extra.items()})
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def run_grad_cache(mode, rank):
    """GradCache + DistributedLoss: the cached local embeddings are what is gathered."""
    model = Model(ck.losses.InfoNCE(temperature=0.3, learn_temperature=True), mode)
    gc = GradCache(model.q, model.dist_loss, chunk_size=2)  # 2 does not divide 5
    loss = gc.step(*local(batch(2)[0], rank))
    average_gradients(model)
    return float(mean_over_ranks(loss)), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in CASES:
            for mode in ("gather", "ring") if ring_offered(name) else ("gather",):
                results[(name, mode)] = run_case(name, mode, rank)
        for mode in ("gather", "ring"):
            results[("grad_cache", mode)] = run_grad_cache(mode, rank)
        # ranks disagree on the local batch size: every rank raises, nobody hangs
        for mode in ("gather", "ring"):
            loss_fn = DistributedLoss(ck.losses.InfoNCE(), mode=mode)
            n = 4 if rank == 0 else 3
            try:
                loss_fn(torch.randn(n, DIM), torch.randn(n, DIM))
                results[("mismatch", mode)] = "no error"
            except ValueError as err:
                results[("mismatch", mode)] = str(err)
        # ... or on the dimension
        try:
            DistributedLoss(ck.losses.InfoNCE())(torch.randn(3, 4 + rank), torch.randn(3, 4 + rank))
            results[("mismatch_dim", "gather")] = "no error"
        except ValueError as err:
            results[("mismatch_dim", "gather")] = str(err)
        dist.barrier()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(worker, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
        deadline = 240.0
        import time

        t0 = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - t0 > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("2-rank workers did not finish (hang?)")
        res = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r in res:
        assert "error" not in r, r.get("error")
    return res


def test_every_objective_has_a_case():
    """A new objective in ck.losses gets the 2-rank test or this fails."""
    objectives = {getattr(ck.losses, n) for n in ck.losses.__all__}
    objectives = {c for c in objectives if isinstance(c, type) and issubclass(c, Objective) and c is not Objective}
    covered = {case[0] for case in CASES.values()}
    assert objectives - covered == set(), f"no 2-rank case for {sorted(c.__name__ for c in objectives - covered)}"
    assert len(objectives) >= 15


PAIRS = [(n, m) for n in CASES for m in (("gather", "ring") if ring_offered(n) else ("gather",))]


@pytest.mark.parametrize("name,mode", PAIRS + [("grad_cache", "gather"), ("grad_cache", "ring")])
def test_two_ranks_equal_one_rank(two_rank_results, name, mode):
    """Every rank returns the whole-batch loss; after DDP averaging every parameter gradient
    (encoders, learnable temperature and bias) equals one process on the concatenated batch."""
    ref_loss, ref_grads = reference("infonce" if name == "grad_cache" else name)
    for rank, res in enumerate(two_rank_results):
        loss, g = res[(name, mode)]
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (rank, loss, ref_loss)
        assert set(g) == set(ref_grads), (set(g) ^ set(ref_grads))
        for k in ref_grads:
            # atol: gradients that are 0 in exact arithmetic (a bias under a translation-invariant kernel)
            assert_rel_close(g[k], ref_grads[k], rtol=1e-10, what=f"rank {rank} {k}", atol=1e-15)
    if name != "grad_cache" and CASES[name][1]().temperature is not None and \
            CASES[name][1]().temperature.learnable:
        assert any(k.endswith("log_scale") for k in ref_grads), "the learnable temperature must get a gradient"


def test_margin_is_kept_single_process():
    """The defect of issue 7: DistributedLoss dropped InfoNCE's margin (6.03 vs 8.82)."""
    torch.manual_seed(0)
    q, d = torch.randn(16, 8), torch.randn(16, 8)
    for obj in (ck.losses.InfoNCE(temperature=0.1, margin=0.3), ck.losses.NTXent(temperature=0.1, margin=0.3)):
        for mode in ("gather", "ring"):
            assert float(DistributedLoss(obj, mode=mode)(q, d)) == float(obj(q, d))


def test_ring_refused_where_not_offered():
    with pytest.raises(ValueError, match="offers no ring mode"):
        DistributedLoss(ck.losses.SupCon(), mode="ring")


@pytest.mark.parametrize("mode", ["gather", "ring"])
def test_mismatched_batch_raises_on_every_rank(two_rank_results, mode):
    for res in two_rank_results:
        msg = res[("mismatch", mode)]
        assert "ranks disagree" in msg and "rank 0: (4, 4)" in msg and "rank 1: (3, 4)" in msg, msg


def test_mismatched_dimension_raises(two_rank_results):
    for res in two_rank_results:
        assert "ranks disagree" in res[("mismatch_dim", "gather")]


def test_single_process_is_the_objective():
    torch.manual_seed(0)
    q, k = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    obj = ck.losses.InfoNCE(temperature=0.1, symmetric=True)
    for mode in ("gather", "ring"):
        assert_rel_close(DistributedLoss(obj, mode=mode)(q, k), obj(q, k), rtol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        DistributedLoss(obj, mode="tree")
    with pytest.raises(ValueError, match="describes its work"):
        DistributedLoss(nn.MSELoss())
