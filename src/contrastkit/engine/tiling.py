"""How big a tile of the logit matrix the engine walks at a time.

A tile of ``rows x cols`` logits is the only N x M-shaped buffer that ever exists
(two or three of them in the backward pass). The default tile is about two million
entries (1,024 rows x 2,048 columns, 8 MB in float32): big enough that the matmuls
dominate the Python overhead, small enough for any machine's memory.
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


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def choose_tile(n_rows: int, n_cols: int, dim: int, device: torch.device,
                tile_size: TileSize = None, element_size: int = 4) -> Tuple[int, int]:
    """Return (row_tile, col_tile) for an n_rows x n_cols problem.

    ``tile_size`` overrides: an int for square tiles, a (rows, cols) pair, or None
    for the automatic choice: about two million entries, at most 1/64 of the N x M
    matrix, and capped by 1/8 of free memory.
    """
    if tile_size is not None:
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
    entries = _DEFAULT_TILE_ENTRIES
    if device.type == "cuda":
        entries = 1 << 24  # GPUs want much larger tiles to fill their cores
    budget = max(1 << 14, _free_bytes(device) // (8 * 3 * element_size))
    # a tile (the backward holds two) stays a small fraction of the logit matrix it
    # replaces, so the memory saving holds at moderate batch sizes too
    share = max(1 << 16, (n_rows * n_cols) // _MATRIX_SHARE)
    entries = min(entries, budget, share)
    tc = min(n_cols, _MAX_COLS if device.type != "cuda" else 16384)
    tr = max(1, min(n_rows, entries // max(tc, 1)))
    return tr, tc
