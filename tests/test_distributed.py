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
from contrastkit.scale import DistributedLoss, GradCache, average_gradients, mean_over_ranks

from conftest import assert_rel_close

WORLD = 2
N_LOCAL = 5  # rows per rank
DIM_IN, DIM = 6, 4


class Model(nn.Module):
    """Encoder(s) and the loss in one module, so DDP averages the temperature too."""

    def __init__(self, objective, mode=None, two_towers=False):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Sequential(nn.Linear(DIM_IN, 8), nn.Tanh(), nn.Linear(8, DIM)).double()
        self.d = nn.Sequential(nn.Linear(DIM_IN, 8), nn.Tanh(), nn.Linear(8, DIM)).double() if two_towers else None
        self.loss = objective.double()
        self.dist_loss = DistributedLoss(self.loss, mode=mode) if mode else None

    def forward(self, *xs):
        embs = [self.q(xs[0])] + [(self.d or self.q)(x) for x in xs[1:]]
        return (self.dist_loss or self.loss)(*embs)


CASES = {
    # name: (objective factory, inputs per row group, two towers)
    "infonce": (lambda: ck.losses.InfoNCE(temperature=0.3, learn_temperature=True), 2, False),
    "clip_two_towers": (lambda: ck.losses.InfoNCE(temperature=0.2, learn_temperature=True, symmetric=True), 2, True),
    "mnrl_hard_negatives": (lambda: ck.losses.MultipleNegativesRanking(scale=5.0), 3, False),
    "mnrl_symmetric": (lambda: ck.losses.MultipleNegativesRanking(scale=5.0, symmetric=True), 2, False),
    "ntxent": (lambda: ck.losses.NTXent(temperature=0.5, learn_temperature=True), 2, False),
    "siglip_two_towers": (lambda: ck.losses.SigLIP(temperature=0.3, bias=-2.0, learnable=True), 2, True),
}


def batch(groups: int):
    g = torch.Generator().manual_seed(42)
    return [torch.randn(WORLD * N_LOCAL, DIM_IN, generator=g, dtype=torch.float64) for _ in range(groups)]


def reference(name):
    factory, groups, towers = CASES[name]
    model = Model(factory(), None, towers)
    xs = batch(groups)
    loss = model(*xs)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def local(xs, rank):
    return [x[rank * N_LOCAL:(rank + 1) * N_LOCAL] for x in xs]


def run_case(name, mode, rank):
    factory, groups, towers = CASES[name]
    model = Model(factory(), mode, towers)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = ddp(*local(batch(groups), rank))
    loss.backward()
    return float(mean_over_ranks(loss)), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def run_grad_cache(mode, rank):
    """GradCache + DistributedLoss: the cached local embeddings are what is gathered."""
    model = Model(ck.losses.InfoNCE(temperature=0.3, learn_temperature=True), mode)
    gc = GradCache(model.q, model.dist_loss, chunk_size=2)  # 2 does not divide 5
    loss = gc.step(*local(batch(2), rank))
    average_gradients(model)
    return float(mean_over_ranks(loss)), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in CASES:
            for mode in ("gather", "ring"):
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


@pytest.mark.parametrize("mode", ["gather", "ring"])
@pytest.mark.parametrize("name", list(CASES) + ["grad_cache"])
def test_two_ranks_equal_one_rank(two_rank_results, name, mode):
    ref_loss, ref_grads = reference("infonce" if name == "grad_cache" else name)
    for rank, res in enumerate(two_rank_results):
        loss, g = res[(name, mode)]
        assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (rank, loss, ref_loss)
        assert set(g) == set(ref_grads), (set(g) ^ set(ref_grads))
        for k in ref_grads:
            assert_rel_close(g[k], ref_grads[k], rtol=1e-10, what=f"rank {rank} {k}")
    temp = [k for k in ref_grads if k.endswith("log_scale")]
    if CASES.get(name, (None, None, None))[0] is not None and "mnrl" not in name:
        assert temp, "the learnable temperature must get a gradient"


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
    with pytest.raises(ValueError, match="supports"):
        DistributedLoss(nn.MSELoss())
