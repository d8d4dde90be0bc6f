"""contrastkit.training.allocator: when the glibc allocator is tuned, and that it takes effect."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from contrastkit.training.allocator import malloc_tuning_blocker, tune_malloc_for

LINUX_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("environ, system, libc, expected", [
    ({}, "Linux", "glibc", None),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, "Linux", "glibc", None),
    ({}, "Darwin", "", "not Linux with glibc"),
    ({}, "Linux", "musl", "not Linux with glibc"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "Linux", "glibc", "jemalloc is preloaded"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "Linux", "glibc", "tcmalloc is preloaded"),
    ({"MALLOC_ARENA_MAX": "2"}, "Linux", "glibc", "already sets MALLOC_ARENA_MAX"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}, "Linux", "glibc", "glibc.malloc tunables"),
])
def test_blocker_respects_the_users_choice(environ, system, libc, expected):
    got = malloc_tuning_blocker(environ, system, libc)
    if expected is None:
        assert got is None
    else:
        assert expected in got


def test_only_cpu_runs_that_ask_are_tuned():
    assert tune_malloc_for("cpu", enabled=False) is None
    assert tune_malloc_for("cuda", enabled=True) is None
    assert tune_malloc_for("cuda:1") is None


# A fresh interpreter each: the setting is process-wide and made once. mallinfo2().hblkhd is
# the bytes glibc holds in separate mmap'd blocks: a 64 MiB tensor is one such block by
# default, and none once tuned.
_PROBE = """
import ctypes, sys, torch
from contrastkit.training.allocator import tune_malloc_for
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
note = tune_malloc_for("cpu", enabled=sys.argv[1] == "on")
again = tune_malloc_for("cpu", enabled=sys.argv[1] == "on")
x = torch.empty(64 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd >> 20, note == again, note)
"""


def _probe(mode, env=None):
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.update(env or {})
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=environ,
                         check=True).stdout.split(maxsplit=2)
    return int(out[0]), out[1] == "True", out[2].strip()


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's mallopt / mallinfo2: Linux with glibc only")
def test_tuning_keeps_large_blocks_out_of_mmap():
    mapped, _, note = _probe("off")
    assert mapped >= 64 and note == "None"
    mapped, same, note = _probe("on")
    assert mapped < 64, note
    assert same and note.startswith("host allocator: freed memory kept")
    mapped, _, note = _probe("on", {"MALLOC_ARENA_MAX": "4"})
    assert mapped >= 64 and "already sets MALLOC_ARENA_MAX" in note
