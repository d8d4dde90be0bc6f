"""Measuring one forward + backward in a fresh process: time, peak extra memory,
and the machine's GEMM rate in the same run (so ratios, not seconds, are compared).

Memory is the resident set: the kernel's high-water mark is reset right before the
measured run and read after it, minus the resident size at the start (inputs already
allocated); glibc is told to map large blocks so that freed memory leaves the
resident set. Each measurement runs in its own subprocess so that peaks do not mix and an
out-of-memory failure of the naive formula cannot take the benchmark down; the
subprocess gets an address-space limit so that it fails cleanly instead of
driving the machine into the OOM killer.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional

import psutil
import torch

__all__ = ["gemm_rate", "measure_in_subprocess", "run_json_subprocess", "peak_rss_bytes", "worker_main"]


def gemm_rate(dim: int, device: str = "cpu", size: int = 2048, min_seconds: float = 0.5) -> float:
    """The machine's float32 matmul rate (FLOP/s): the best of repeated size x dim x size
    products into a reused output, over at least ``min_seconds`` (the rate swings from
    run to run, so the worker measures it before and after the loss and keeps the best)."""
    a = torch.randn(size, dim, device=device)
    b = torch.randn(size, dim, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b.T, out=out)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b.T, out=out)
        _sync(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2.0 * size * size * dim / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (bytes); what ``bench step`` reports."""
    return _max_rss()


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux: clear_refs 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """Resident high-water mark since the last reset (VmHWM), else the process's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _max_rss()


def _run_once(fn, inputs, tile, device):
    """One forward + backward; returns (seconds, loss value)."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None
    _sync(device)
    start = time.perf_counter()
    loss = fn(*inputs, tile)
    loss.backward()
    _sync(device)
    return time.perf_counter() - start, float(loss.detach())


def worker_main(spec: Dict) -> Dict:
    """Run one (objective, method, n) measurement in this process; return a dict."""
    from .loss_cases import CASES, make_inputs

    device = spec.get("device", "cpu")
    case = CASES[spec["objective"]]
    fn = {"ours": case.ours, "naive": case.naive, "peer": case.peer}[spec["method"]]
    if fn is None:
        raise ValueError(f"objective {spec['objective']!r} has no {spec['method']} implementation")
    n, dim, tile = spec["n"], spec["dim"], spec.get("tile")
    tile = tuple(tile) if isinstance(tile, list) else tile
    out = {"objective": spec["objective"], "method": spec["method"], "n": n, "dim": dim, "device": device}
    # warm up threads / kernels on a small problem, then measure the real one
    _run_once(fn, make_inputs(min(n, 256), dim, 1, device), None, device)
    out["gemm_flops"] = gemm_rate(dim, device)
    inputs = make_inputs(n, dim, 0, device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
        exact = _reset_peak_rss()
        peak_before = 0 if exact else _max_rss()
    try:
        first, out["loss"] = _run_once(fn, inputs, tile, device)
        times = [first]
        if device.startswith("cuda"):
            out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            # with the high-water mark reset this is the run's own peak; otherwise an upper bound
            out["peak_extra_bytes"] = max(0, max(_peak_rss(), peak_before) - base)
            out["memory_method"] = "VmHWM reset" if exact else "ru_maxrss (upper bound)"
        budget = spec.get("repeat_budget_s", 3.0)
        while sum(times) < budget and len(times) < spec.get("max_repeats", 5):
            times.append(_run_once(fn, inputs, tile, device)[0])
        out["seconds"] = min(times)
        out["repeats"] = len(times)
        out["status"] = "ok"
        out["gemm_flops"] = max(out["gemm_flops"], gemm_rate(dim, device))
    except (RuntimeError, MemoryError) as err:  # out of memory under the address-space limit
        out["status"] = "oom" if "memory" in str(err).lower() or isinstance(err, MemoryError) else "error"
        out["error"] = str(err).splitlines()[0][:200]
    return out


def run_json_subprocess(module_args: List[str], *, env: Optional[Mapping[str, str]] = None,
                        mem_limit_bytes: Optional[int] = None, timeout_s: Optional[float] = None) -> Dict:
    """Run ``python -m <module_args...>`` in a fresh interpreter (its own memory peak; an
    address-space limit when given, so that an out-of-memory run fails cleanly) and return
    the last JSON line it printed, or ``{"status": "timeout" | "oom" | "error", "error": ...}``.

    Example::

        from contrastkit.bench.measure import run_json_subprocess
        assert run_json_subprocess(["json.tool", "--help"])["status"] == "error"   # no JSON line
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", *module_args]

    def limit():  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit_bytes, mem_limit_bytes))

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env,
                              preexec_fn=limit if mem_limit_bytes else None)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"exceeded {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or "").strip().splitlines()
    err = " | ".join(tail[-3:]) if tail else f"no output (exit {proc.returncode})"
    status = "oom" if proc.returncode in (-9, 137) or "memory" in err.lower() else "error"
    return {"status": status, "error": err[:400]}


def measure_in_subprocess(spec: Dict, mem_limit_bytes: Optional[int] = None, timeout_s: float = 1800.0) -> Dict:
    """Run :func:`worker_main` in a fresh interpreter under an address-space limit."""
    # large blocks are mmap-ed and returned to the OS when freed, so the resident size
    # follows live memory instead of glibc's cached heap
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    out = run_json_subprocess(["contrastkit.bench.measure", json.dumps(spec)], env=env,
                              mem_limit_bytes=mem_limit_bytes, timeout_s=timeout_s)
    if "error" in out and "objective" not in out:
        return {**spec, **out}
    return out


if __name__ == "__main__":
    print(json.dumps(worker_main(json.loads(sys.argv[1]))), flush=True)
