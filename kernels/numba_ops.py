"""The numba primitives every CPU kernel is built from: how kernels are compiled, how a
tile is walked, and the float64 sums.

Every float32 operation is strict (fastmath off) and in the reference's order. The
float64 sums live in the few `reduce_` helpers below, the only code allowed to reorder
additions: otherwise LLVM may not vectorise a loop that carries a sum, and that loop
then runs at one add latency per element. Loops that must feed a sum with float32
results write those into a per-tile scratch buffer first, then sum it.

A tile (kernels/cpu_tiles.py) is walked in *runs*, `for bi in range(NB): for i in
range(NR)`, each NC contiguous elements of one row, where the work needs the row (a row
sum, a row factor, a row norm). Purely elementwise work is walked in *spans*: the whole
tile at once when it covers whole rows (it is then contiguous, which matters for 3×3
matrices), else one span per run. Inner loops get slices, so that they vectorise.
The kernels compile on first use and are cached on disk (cache=True); importing compiles
nothing.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from optserve.kernels.backend import SUM_NAMES
from optserve.kernels.cpu_tiles import B0, C0, NB, NC, NR, R0
from optserve.kernels.layout import FlatLayout, FlatState

# The decorators of the parallel kernels and of the helpers they call. error_model="numpy"
# makes x/0 give inf/nan as NumPy does, instead of a Python-style zero check that would
# also keep LLVM from vectorising every loop that divides. fastmath stays off: the
# float32 results must round exactly as the reference's.
kernel = njit(parallel=True, fastmath=False, cache=True, error_model="numpy", nogil=True)
inline = njit(fastmath=False, cache=True, error_model="numpy", nogil=True)
# float64 sums only: additions may be reordered (so they vectorise) and a multiply fused
# with the add that follows it (the float64 statistics come out no less accurate); no
# float32 result passes through these helpers.
reduce_ = njit(fastmath={"reassoc", "contract"}, cache=True, error_model="numpy", nogil=True)

F32 = np.float32


@inline
def run(tile, r, c, bi, i):
    """Run (bi, i) of a tile: (its row id among the tensor's B·R rows, the tensor-relative
    offset of its first element, its index q = bi·NR + i within the tile)."""
    row = (tile[B0] + bi) * r + tile[R0] + i
    return row, row * c + tile[C0], bi * tile[NR] + i


@inline
def col_start(tile, c, bi):
    """Column id (among the tensor's B·C columns) of the first column of runs (bi, ·)."""
    return (tile[B0] + bi) * c + tile[C0]


@inline
def spans(tile, c):
    """(number of spans, span length) of a tile."""
    if tile[NC] == c:
        return 1, tile[NB] * tile[NR] * tile[NC]
    return tile[NB] * tile[NR], tile[NC]


@inline
def span(tile, r, c, x):
    """(tensor-relative start, start within the tile's elements) of span x."""
    if tile[NC] == c:
        return run(tile, r, c, 0, 0)[1], 0
    return run(tile, r, c, x // tile[NR], x % tile[NR])[1], x * tile[NC]


@reduce_
def reduce_sum(x):
    """Σ x in float64."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j])
    return acc


@reduce_
def reduce_sum_sq(x):
    """Σ x² in float64 (each square is exact in float64)."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j]) * np.float64(x[j])
    return acc


@reduce_
def reduce_step_terms(w2, wdw, dw2, g2, old, new, g):
    """Adds one element to the step sums (Σ w², Σ w·Δw, Σ Δw², Σ g²), in float64 with
    w = old θ and Δw = new θ − old θ. Called inside the strict loops that update θ: only
    these float64 additions carry `reassoc`, which is what lets those loops vectorise."""
    w = np.float64(old)
    dw = np.float64(new) - w
    gj = np.float64(g)
    return w2 + w * w, wdw + w * dw, dw2 + dw * dw, g2 + gj * gj


@reduce_
def reduce_step_sums(old, new, g):
    """(Σ w², Σ w·Δw, Σ Δw², Σ g²) in float64 over a span, w = old θ, Δw = new θ − old θ:
    the step sums as a separate loop with nothing but float64 sums in it, which
    vectorises better than the same sums carried by a strict float32 loop."""
    w2 = wdw = dw2 = g2 = 0.0
    for j in range(old.shape[0]):
        w = np.float64(old[j])
        dw = np.float64(new[j]) - w
        gj = np.float64(g[j])
        w2 += w * w
        wdw += w * dw
        dw2 += dw * dw
        g2 += gj * gj
    return w2, wdw, dw2, g2


@inline
def add_step_sums(out, sums):
    """out[0:4] += sums."""
    for i in range(4):
        out[i] += sums[i]


# ---- host side of the kernels ---------------------------------------------------------------

EMPTY_F32 = np.zeros(0, F32)


def field(layout: FlatLayout, state: FlatState, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A state buffer and its per-tensor offsets (an empty buffer when no tensor has it)."""
    if name in state.fields:
        return state.fields[name], layout.fields[name]
    return EMPTY_F32, np.full(layout.num_tensors, -1, np.int64)


def tile_sums(tiles: np.ndarray, wanted: bool) -> np.ndarray | None:
    """The array of per-tile step sums for a kernel to fill, or None: compute none (numba
    compiles a version of the kernel with every `if sums is not None` branch pruned)."""
    return np.empty((len(tiles), len(SUM_NAMES)), np.float64) if wanted else None
