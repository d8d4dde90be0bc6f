"""How big a tile of the logit matrix the engine walks at a time.

A tile of ``rows x cols`` logits is the only N x M-shaped buffer that ever exists
(two or three of them in the backward pass). On a CPU the default tile is about two
million entries (1,024 rows x 2,048 columns, 8 MB in float32): big enough that the
matmuls dominate the Python overhead, small enough for any machine's memory. On CUDA it
is about 16.8 million entries (64 MB in float32): each tile costs some twenty kernel
launches and a few host synchronisations whatever its size, so smaller tiles leave the
GPU waiting on the host.
"""

from __future__ import annotations

from typing import Tuple, Union

import psutil
import torch

__all__ = ["choose_tile", "TileSize"]

TileSize = Union[int, Tuple[int, int], None]

# Entries per tile and its widest column span: 1,024 x 2,048 tiles ran the 16,384 symmetric
# InfoNCE at 1.33x the GEMM limit against 1.55x for 256 x 4,096 on the 2-core AVX-512 box
# (taller row blocks make better matmuls).
_DEFAULT_TILE_ENTRIES = 1 << 21
_MAX_COLS = 2048
_MATRIX_SHARE = 64
# CUDA: one 4,096 x 4,096 InfoNCE on an H200 took 26.6 ms in 64 tiles of 64 x 4,096 (the
# 1/64 share rule) against 3.2 ms for the naive formula: 811 kernel launches and 26 host
# synchronisations per call, 4 ms of GPU work. Tiles below this many entries are launch-
# bound there, so the share rule does not shrink a CUDA tile below it (at most 3 x 64 MB
# of float32 tile buffers, against 64 GB for the 131,072-square logit matrix it replaces).
_CUDA_TILE_ENTRIES = 1 << 24
_CUDA_MAX_COLS = 16384


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_tile(n_rows: int, n_cols: int, dim: int, device: torch.device,
                tile_size: TileSize = None, element_size: int = 4) -> Tuple[int, int]:
    """Return (row_tile, col_tile) for an n_rows x n_cols problem.

    ``tile_size`` overrides: an int for square tiles, a (rows, cols) pair, or None
    for the automatic choice of :func:`auto_tile` (by the device type and its free memory).
    """
    if tile_size is None:
        return auto_tile(n_rows, n_cols, _free_bytes(device), gpu=device.type == "cuda", element_size=element_size)
    if isinstance(tile_size, int):
        tr = tc = tile_size
    else:
        try:
            tr, tc = (int(t) for t in tile_size)
        except (TypeError, ValueError):
            raise ValueError(f"tile_size must be an int or a (rows, cols) pair, got {tile_size!r}") from None
    if tr < 1 or tc < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size!r}")
    return min(tr, n_rows), min(tc, n_cols)


def auto_tile(n_rows: int, n_cols: int, free_bytes: int, *, gpu: bool, element_size: int = 4) -> Tuple[int, int]:
    """The automatic tile of :func:`choose_tile` for a device with ``free_bytes`` free.

    CPU: about 2^21 entries, at most 1/64 of the N x M matrix (so the memory saving holds
    at moderate batch sizes too), capped by 1/24 of free memory in tile elements.
    CUDA (``gpu=True``): 2^24 entries and up to 16,384 columns; the 1/64 share applies
    only above 2^24 entries, so a problem of up to 2^24 logits (4,096 x 4,096) is one tile.
    """
    entries = _CUDA_TILE_ENTRIES if gpu else _DEFAULT_TILE_ENTRIES
    budget = max(1 << 14, free_bytes // (8 * 3 * element_size))
    share = max(_CUDA_TILE_ENTRIES if gpu else 1 << 16, (n_rows * n_cols) // _MATRIX_SHARE)
    entries = min(entries, budget, share)
    tc = min(n_cols, _CUDA_MAX_COLS if gpu else _MAX_COLS)
    tr = max(1, min(n_rows, entries // max(tc, 1)))
    return tr, tc
