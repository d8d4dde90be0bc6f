"""Entries of the logit matrix that the denominator leaves out.

A mask never exists as an N x M tensor: each one knows how to blank out the part
of one tile it covers (set it to ``-inf``, so that ``exp`` gives 0) and can tell
cheaply whether it touches a tile at all.

Example::

    import torch
    from contrastkit.engine import DiagonalMask, tiled_logsumexp
    z = torch.randn(8, 4)
    lse, _ = tiled_logsumexp(z, z, masks=[DiagonalMask()])   # self excluded
    assert torch.allclose(lse, torch.logsumexp((z @ z.T).fill_diagonal_(float("-inf")), 1))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["tile_diagonal", "TileMask", "DiagonalMask", "LabelMask", "DifferentLabelMask", "IndexMask"]


def tile_diagonal(x: Tensor, offset: int, r0: int, r1: int, c0: int, c1: int) -> Optional[Tensor]:
    """The entries (i, i + offset) of the whole problem that fall inside tile ``x`` (rows
    [r0, r1) x columns [c0, c1)), as a strided view of ``x`` (so ``.fill_`` writes them in
    place with one kernel, no index tensors and no host synchronisation on CUDA), or None
    when the tile holds none of them."""
    lo = max(r0, c0 - offset)
    hi = min(r1, c1 - offset)
    if hi <= lo:
        return None
    k = r0 + offset - c0                       # the tile-local diagonal: column = row + k
    first = (lo - r0) - max(0, -k)             # index along x.diagonal(k) of row lo
    return x.diagonal(k)[first:first + (hi - lo)]


_PROBE_ROWS, _PROBE_COLS = 256, 4096


class TileMask:
    """Base class: a set of (row, column) entries to drop from the denominator.

    A subclass implements :meth:`apply_` (and, to skip tiles cheaply, :meth:`touches`);
    :meth:`drops` answers for one cell per row, by default through :meth:`apply_` on the
    tiles that hold those cells, and subclasses that can answer directly override it."""

    def drops(self, columns: Tensor) -> Tensor:
        """Whether entry ``(i, columns[i])`` is dropped, for every row i (bool (N,);
        ``columns[i] = -1``: no cell, False). E.g. whether a mask covers each row's positive.

        The default applies the mask to zero tiles that hold the asked cells only (row
        blocks of 256 x the column span of their cells, in column tiles of 4096; for cells on
        or near the diagonal O(N * 256) entries, never more than N x M)."""
        n = columns.shape[0]
        hit = torch.zeros(n, dtype=torch.bool, device=columns.device)
        cols = columns.tolist()
        for r0 in range(0, n, _PROBE_ROWS):
            r1 = min(n, r0 + _PROBE_ROWS)
            block = [c for c in cols[r0:r1] if c >= 0]
            if not block:
                continue
            lo, hi = min(block), max(block) + 1
            for c0 in range(lo, hi, _PROBE_COLS):
                c1 = min(hi, c0 + _PROBE_COLS)
                if not any(c0 <= c < c1 for c in block) or not self.touches(r0, r1, c0, c1):
                    continue
                x = torch.zeros(r1 - r0, c1 - c0, dtype=torch.float32, device=columns.device)
                self.apply_(x, r0, r1, c0, c1)
                local = columns[r0:r1] - c0
                inside = (local >= 0) & (local < c1 - c0)
                cell = x.gather(1, local.clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
                hit[r0:r1] |= inside & torch.isinf(cell)
        return hit

    def touches(self, r0: int, r1: int, c0: int, c1: int) -> bool:
        """Whether the tile rows [r0, r1) x columns [c0, c1) holds any dropped entry."""
        return True

    def apply_(self, x: Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """Set the dropped entries of tile ``x`` (rows r0..r1, columns c0..c1) to -inf."""
        raise NotImplementedError

    def check(self, n_rows: int, n_cols: int, device: torch.device) -> None:
        """Raise ValueError when the mask does not fit an n_rows x n_cols problem."""


class DiagonalMask(TileMask):
    """Drop entry (i, i + offset) of every row: self-similarity.

    ``offset`` is the column of row 0's self; for anchors that are also the first
    rows of the candidates it is 0. With ``offset`` a second, shifted diagonal can
    be dropped too (e.g. the positive, for decoupled losses).
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = int(offset)

    def touches(self, r0, r1, c0, c1):
        return (r0 + self.offset) < c1 and (r1 - 1 + self.offset) >= c0

    def drops(self, columns):
        return (columns >= 0) & (columns == torch.arange(columns.shape[0], device=columns.device) + self.offset)

    def apply_(self, x, r0, r1, c0, c1):
        cells = tile_diagonal(x, self.offset, r0, r1, c0, c1)
        if cells is not None:
            cells.fill_(float("-inf"))

    def __repr__(self):
        return f"DiagonalMask(offset={self.offset})"


class LabelMask(TileMask):
    """Drop every entry whose row label equals its column label.

    Used to keep same-class candidates out of the denominator (decoupled SupCon,
    false-negative filtering by label). Labels are integer tensors of length N and M.
    """

    def __init__(self, row_labels: Tensor, col_labels: Tensor) -> None:
        self.row_labels = row_labels
        self.col_labels = col_labels

    def check(self, n_rows, n_cols, device):
        for name, lab, n in (("row_labels", self.row_labels, n_rows), ("col_labels", self.col_labels, n_cols)):
            if lab.dim() != 1 or lab.shape[0] != n:
                raise ValueError(f"LabelMask {name} must have shape ({n},), got {tuple(lab.shape)}")
            if lab.dtype.is_floating_point or lab.dtype == torch.bool:
                raise ValueError(f"LabelMask {name} must be an integer tensor, got {lab.dtype}")

    def apply_(self, x, r0, r1, c0, c1):
        same = self.row_labels[r0:r1, None] == self.col_labels[None, c0:c1]
        x.masked_fill_(same, float("-inf"))

    def _same(self, columns: Tensor) -> Tensor:
        col = self.col_labels.to(columns.device)[columns.clamp(min=0)]
        return self.row_labels.to(columns.device) == col

    def drops(self, columns):
        return (columns >= 0) & self._same(columns)


class DifferentLabelMask(LabelMask):
    """Drop every entry whose row label differs from its column label (keep same-label).

    The complement of :class:`LabelMask`: with it a log-sum-exp runs over the positives
    of each row only (SupCon L_in, margins on label positives). Add a
    :class:`DiagonalMask` to leave the anchor itself out too.

    Example::

        import torch
        from contrastkit.engine import DiagonalMask, DifferentLabelMask, tiled_logsumexp
        z, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
        pos_lse, _ = tiled_logsumexp(z, z, masks=[DifferentLabelMask(y, y), DiagonalMask()])
        drop = (y[:, None] != y[None, :]) | torch.eye(8, dtype=torch.bool)
        assert torch.allclose(pos_lse, torch.logsumexp((z @ z.T).masked_fill(drop, float("-inf")), 1))
    """

    def apply_(self, x, r0, r1, c0, c1):
        diff = self.row_labels[r0:r1, None] != self.col_labels[None, c0:c1]
        x.masked_fill_(diff, float("-inf"))

    def drops(self, columns):
        return (columns >= 0) & ~self._same(columns)


class IndexMask(TileMask):
    """Drop listed entries: ``columns`` is (N, k) of column indices per row, -1 = none.

    This is how known false negatives (e.g. other positives of the same query) are
    kept out of the denominator without an N x M mask.
    """

    def __init__(self, columns: Tensor) -> None:
        if columns.dim() == 1:
            columns = columns[:, None]
        self.columns = columns.long()

    def check(self, n_rows, n_cols, device):
        c = self.columns
        if c.dim() != 2 or c.shape[0] != n_rows:
            raise ValueError(f"IndexMask columns must have shape ({n_rows}, k), got {tuple(c.shape)}")
        if c.numel() and (c.max() >= n_cols or c.min() < -1):
            raise ValueError(f"IndexMask columns must lie in [-1, {n_cols}), got range [{int(c.min())}, {int(c.max())}]")

    def apply_(self, x, r0, r1, c0, c1):
        cols = self.columns[r0:r1]
        inside = (cols >= c0) & (cols < c1)
        if not bool(inside.any()):
            return
        rows, which = inside.nonzero(as_tuple=True)
        x[rows, cols[rows, which] - c0] = float("-inf")

    def drops(self, columns):
        return (columns >= 0) & (self.columns.to(columns.device) == columns[:, None]).any(1)
