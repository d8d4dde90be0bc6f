"""Keep freed host memory in the process: glibc ``mallopt`` settings for CPU training.

A transformer's forward and backward passes allocate and free tensors of tens to hundreds
of megabytes at every batch. glibc serves each such block with a fresh ``mmap`` and gives
it back with ``munmap`` when freed, so every batch page-faults and zero-fills its
activations again. Keeping freed memory in the heap instead is what the CPU performance
guides do by preloading jemalloc or tcmalloc; on glibc the same effect comes from three
``mallopt`` calls, made at run time:

- ``M_MMAP_MAX = 0``: large blocks come from the heap, not from their own mappings;
- ``M_TRIM_THRESHOLD = 16 GiB``: the heap's free top is not handed back to the system;
- ``M_TOP_PAD = 1 GiB``: the heap grows in large steps.

Measured on this project's 2-core AMX CPU (``docs/benchmarks.md``, "Host allocator and
token-count batches"): the default main job's first bfloat16 corpus encode 132 -> 120 s and
the whole run 462 -> 441 s. The cost: the process's resident memory
stays at its peak until it exits, which suits a training or evaluation run, not a
long-lived server. :func:`tune_malloc` does nothing where it cannot help or where the user
has already chosen: on anything but Linux with glibc, when a ``MALLOC_*`` environment
variable or a ``glibc.malloc`` tunable is set, or when another allocator (jemalloc, tcmalloc, mimalloc) is preloaded.
``contrastkit train`` / ``eval`` / ``mine`` call it for CPU runs unless
``train.tune_malloc: false`` (``--no-tune-malloc`` for eval and mine).

Example::

    # not run: it retunes the calling process's allocator for good (tests/test_allocator.py runs it in a subprocess)
    from contrastkit.training.allocator import tune_malloc
    print(tune_malloc())   # what it did, or why it did nothing
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Callable, Mapping, Optional

__all__ = ["MALLOPT_SETTINGS", "tune_malloc", "tune_malloc_for", "malloc_tuning_blocker"]

# glibc's malloc.h parameter numbers
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
MALLOPT_SETTINGS = (("M_MMAP_MAX", _M_MMAP_MAX, 0),
                    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 16 << 30),
                    ("M_TOP_PAD", _M_TOP_PAD, 1 << 30))
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_done: Optional[str] = None


def malloc_tuning_blocker(environ: Optional[Mapping[str, str]] = None, system: Optional[str] = None,
                          libc: Optional[str] = None) -> Optional[str]:
    """Why :func:`tune_malloc` would leave the allocator alone here (None: it would tune it).
    The arguments default to this process's environment, ``platform.system()`` and
    ``platform.libc_ver()[0]``."""
    environ = os.environ if environ is None else environ
    system = platform.system() if system is None else system
    libc = platform.libc_ver()[0] if libc is None else libc
    if system != "Linux" or libc != "glibc":
        return f"not Linux with glibc ({system}, {libc or 'unknown C library'})"
    preload = environ.get("LD_PRELOAD", "")
    other = [name for name in _OTHER_ALLOCATORS if name in preload]
    if other:
        return f"{other[0]} is preloaded (LD_PRELOAD)"
    chosen = sorted(k for k in environ if k.startswith("MALLOC_"))
    if chosen:
        return f"the environment already sets {chosen[0]}"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "the environment already sets glibc.malloc tunables (GLIBC_TUNABLES)"
    return None


def tune_malloc() -> str:
    """Apply :data:`MALLOPT_SETTINGS` to this process's glibc allocator (once; later calls
    return the first call's message). Returns a one-line description of what was done, or of
    why nothing was (see the module doc); never raises for an unsupported platform."""
    global _done
    if _done is not None:
        return _done
    why_not = malloc_tuning_blocker()
    if why_not is not None:
        _done = f"host allocator left as it is: {why_not}"
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        failed = [name for name, param, value in MALLOPT_SETTINGS if libc.mallopt(param, value) != 1]
    except (OSError, AttributeError) as exc:
        _done = f"host allocator left as it is: mallopt unavailable ({exc})"
        return _done
    if failed:
        _done = f"host allocator: mallopt refused {', '.join(failed)}"
    else:
        _done = "host allocator: freed memory kept in the process (glibc mallopt; train.tune_malloc)"
    return _done


def tune_malloc_for(device, enabled: bool = True, say: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """:func:`tune_malloc` when ``enabled`` and ``device`` (a str or ``torch.device``) is the
    CPU; None otherwise (a CUDA run's activations are not on the host). ``say``, when given,
    receives the message. What the command-line entry points call with their
    ``train.tune_malloc`` / ``--no-tune-malloc`` setting."""
    import torch

    if not enabled or torch.device(device).type != "cpu":
        return None
    note = tune_malloc()
    if say is not None:
        say(note)
    return note
