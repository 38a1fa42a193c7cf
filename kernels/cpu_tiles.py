"""Tile plans of the CPU kernels: how each view of a job's tensors is cut into tiles.

Every tensor is seen as a batch of matrices (B, R, C) (`View`) and cut into *tiles* of
about TILE elements: whole matrices, a band of whole rows, or a block of row pieces. A CPU
kernel is one `prange` over the tiles of every active tensor, so the number of kernel calls
per step is fixed whatever the number of tensors. Reductions (row sums, column sums,
per-tensor sums) are written by each tile into its own slots of a partial-sum array and
combined with `np.bincount` (or used as they are when no tile splits a row): no two
threads ever write the same slot. A plan depends only on the layout, so it is built once
per layout and view (`plan`) and cached on the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optserve.kernels.backend import View
from optserve.kernels.layout import FlatLayout

# Elements per tile: big enough to amortise the per-tile overhead, small enough that
# a 16M-element tensor still splits into hundreds of tiles for the threads to share.
TILE = 1 << 16
# Factored tiles keep at least this many rows, so the column partial sums a tile
# writes (one per column it covers) stay a small fraction of the data it reads.
FACTORED_MIN_ROWS = 64

# Columns of a tile record (int64). The tile covers batches B0..B0+NB, rows R0..R0+NR
# and columns C0..C0+NC of its tensor's (B, R, C) view; RS/CS are the first of its
# NB·NR row slots / NB·NC column slots in the partial-sum arrays (-1: none).
TENSOR, B0, NB, R0, NR, C0, NC, RS, CS = range(9)


@dataclass
class Plan:
    """The tiles of one view of a layout, and where their partial sums land.

    dims[t]            tensor t's view (B, R, C); rows/cols are its R and C columns
    row_index[s]       the entry of the row-sum result that row slot s adds to
    col_index[s]       likewise for column slots
    batches            (TENSOR, B0, NB) chunks of the batches of tensors with row and
                       column sums
    rows_direct        row slot s is row s (no tile splits a row): no combining needed
    cols_direct        likewise for columns (no tile splits a matrix's rows)
    ndim[t]            the number of dimensions of tensor t
    """
    tiles: np.ndarray
    dims: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    row_index: np.ndarray
    col_index: np.ndarray
    n_rows: int
    n_cols: int
    batches: np.ndarray
    rows_direct: bool
    cols_direct: bool
    ndim: np.ndarray

    def select(self, mask: np.ndarray) -> np.ndarray:
        """The tiles of the tensors where `mask` (bool[T]) is set."""
        return np.ascontiguousarray(self.tiles[mask[self.tiles[:, TENSOR]]])

    def row_sums(self, part: np.ndarray) -> np.ndarray:
        """Row results from per-slot partial sums."""
        return part if self.rows_direct else np.bincount(self.row_index, part, self.n_rows)

    def col_sums(self, part: np.ndarray) -> np.ndarray:
        """Column results from per-slot partial sums."""
        return part if self.cols_direct else np.bincount(self.col_index, part, self.n_cols)


def _tensor_tiles(b: int, r: int, c: int, tile: int, min_rows: int) -> np.ndarray:
    """Tile records (TENSOR, RS, CS left 0) covering one (b, r, c) view: whole matrices if
    they fit in a tile, else bands of at least `min_rows` rows (whole rows if they fit)."""
    rh = min(r, max(min_rows, tile // c))
    cw = min(c, max(1, tile // rh))
    bh = max(1, tile // (r * c)) if (rh == r and cw == c) else 1
    b0, r0, c0 = (a.ravel() for a in np.meshgrid(np.arange(0, b, bh), np.arange(0, r, rh),
                                                 np.arange(0, c, cw), indexing="ij"))
    out = np.zeros((b0.size, 9), np.int64)
    out[:, B0], out[:, NB] = b0, np.minimum(bh, b - b0)
    out[:, R0], out[:, NR] = r0, np.minimum(rh, r - r0)
    out[:, C0], out[:, NC] = c0, np.minimum(cw, c - c0)
    return out


def _slots(tiles: np.ndarray, base: np.ndarray, width: np.ndarray, x0: np.ndarray,
           stride: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers the partial-sum slots of the tiles of tensors with base[t] >= 0: NB·width
    consecutive slots per tile, slot (bi, x) standing for entry base + (B0 + bi)·stride
    + x0 + x of the result. Returns (first slot of each tile or -1, entry of each slot)."""
    t = tiles[:, TENSOR]
    count = np.where(base[t] >= 0, tiles[:, NB] * width, 0)
    first = starts(count)
    owner = np.repeat(np.arange(len(tiles)), count)
    q = np.arange(owner.size) - first[owner]
    w, s = width[owner], stride[t][owner]
    entry = (base[t] + tiles[:, B0] * stride[t] + x0)[owner] + q // w * s + q % w
    return np.where(count > 0, first, -1), entry


def _build_plan(layout: FlatLayout, dims: np.ndarray, row_base: np.ndarray | None,
                col_base: np.ndarray | None, tile: int, min_rows: int) -> Plan:
    """Tiles for views dims[t] = (B, R, C). row_base[t]/col_base[t] (>= 0) place tensor t's
    B·R row sums / B·C column sums in the result arrays; -1 or None: no such sums."""
    n_t = len(dims)
    parts = []
    for t, (b, r, c) in enumerate(dims):  # once per layout, not per step
        if b * r * c:
            tt = _tensor_tiles(int(b), int(r), int(c), tile, min_rows)
            tt[:, TENSOR] = t
            parts.append(tt)
    tiles = np.concatenate(parts) if parts else np.zeros((0, 9), np.int64)
    rows, cols = dims[:, 1].copy(), dims[:, 2].copy()
    none = np.full(n_t, -1, np.int64)
    row_base = none if row_base is None else row_base
    col_base = none if col_base is None else col_base
    # Row slot (bi, i) of a tile sums row R0+i of matrix B0+bi; column slot (bi, j) sums
    # column C0+j of matrix B0+bi.
    tiles[:, RS], row_index = _slots(tiles, row_base, tiles[:, NR], tiles[:, R0], rows)
    tiles[:, CS], col_index = _slots(tiles, col_base, tiles[:, NC], tiles[:, C0], cols)

    n_rows = int(np.where(row_base >= 0, row_base + dims[:, 0] * rows, 0).max(initial=0))
    n_cols = int(np.where(col_base >= 0, col_base + dims[:, 0] * cols, 0).max(initial=0))

    # Chunks of whole batches (about a tile of row + column entries each), for the kernel
    # that turns finished row and column sums into factors.
    chunks = []
    for t in np.flatnonzero((row_base >= 0) & (col_base >= 0)):
        b, r, c = (int(x) for x in dims[t])
        step = max(1, tile // (r + c))
        b0 = np.arange(0, b, step)
        chunks.append(np.stack([np.full_like(b0, t), b0, np.minimum(step, b - b0)], axis=1))
    batches = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.int64)
    return Plan(tiles, dims, rows, cols, row_index, col_index, n_rows, n_cols, batches,
                 np.array_equal(row_index, np.arange(n_rows)),
                 np.array_equal(col_index, np.arange(n_cols)),
                 np.array([len(s) for s in layout.shapes], np.int64))


def _plan_for(layout: FlatLayout, view: View) -> Plan:
    sizes = layout.sizes
    if view is View.FLAT:
        dims = np.stack([np.ones_like(sizes), np.ones_like(sizes), sizes], axis=1)
        return _build_plan(layout, dims, None, None, TILE, 1)
    if view is View.CHANNEL:  # rows = shape[0] for ndim > 1, numbered across the job
        r = np.array([s[0] if len(s) > 1 else 1 for s in layout.shapes], np.int64)
        dims = np.stack([np.ones_like(sizes), r, sizes // np.maximum(r, 1)], axis=1)
        return _build_plan(layout, dims, starts(r), None, TILE, 1)
    if view is View.FACTORED:  # row/col sums land where exp_avg_sq_row/_col keep them
        factored = np.array([len(s) >= 2 for s in layout.shapes], bool)   # as Adafactor's
        dims = np.array([(math.prod(s[:-2]), s[-2], s[-1]) if f else (1, 1, n)
                         for s, f, n in zip(layout.shapes, factored, sizes)], np.int64).reshape(-1, 3)
        missing = np.full(len(sizes), -1, np.int64)
        row_base = np.where(factored, layout.fields.get("exp_avg_sq_row", missing), -1)
        col_base = np.where(factored, layout.fields.get("exp_avg_sq_col", missing), -1)
        return _build_plan(layout, dims, row_base, col_base, TILE, FACTORED_MIN_ROWS)
    raise ValueError(view)


def starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive segments of these lengths starts."""
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


def plan(layout: FlatLayout, view: View) -> Plan:
    """The plan of `view` over `layout`, built on first use and kept with the layout."""
    return layout.memo(("cpu", view, TILE, FACTORED_MIN_ROWS), lambda: _plan_for(layout, view))

