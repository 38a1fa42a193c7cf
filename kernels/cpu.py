"""The fast CPU backend: numba kernels over a job's flat buffers.

Same contract and the same float32 arithmetic as `optserve.kernels.reference` (see its
docstrings and shared/OPTIMIZERS.md for the equations); only the schedule differs. The
Adam family (and AdamP when it does not project) comes out bit-identical to the
reference; sums are accumulated in float64 here (float32 in the reference), so
Adafactor and projected AdamP agree to float32 rounding. The per-tensor statistics that
step() returns besides (‖w‖², ⟨w, Δw⟩, ‖Δw‖², ‖g‖²) are summed inside the loop that
writes θ, so they cost no extra pass, and with step(..., stats=False) they cost nothing:
the kernels that write θ take their per-tile `stats` array or None, and numba compiles
a version for each, the None one with every `if stats is not None` branch pruned.

How the work is cut up. Every tensor is viewed as a batch of matrices (B, R, C):
  flat      (1, 1, numel)                                   AdamW / Adam
  channel   (1, shape[0], numel/shape[0]) if ndim > 1       AdamP (cosine rows)
  factored  (prod(shape[:-2]), shape[-2], shape[-1]) if ndim ≥ 2   Adafactor (row/col stats)
and the view is cut into *tiles* of about TILE elements: whole matrices, a band of whole
rows, or a block of row pieces. Each kernel is one `prange` over the tiles of every
active tensor, so the number of kernel calls per step is fixed whatever the number of
tensors. Reductions (row sums, column sums, per-tensor sums) are written by each tile
into its own slots of a partial-sum array and combined with `np.bincount` (or used as
they are when no tile splits a row); no two threads ever write the same slot and no
kernel walks a column with a stride.

Tile tables depend only on the layout, so they are built once per layout and cached.
Per-tensor scalars (lr/bc1, √bc2, α_t, ...) are formed in float64 with vectorised numpy
and handed to the kernels as float32, as the reference does. The kernels compile on
first use and are cached on disk (cache=True); importing this module compiles nothing.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from optserve.kernels import coefficients
from optserve.kernels.layout import FlatLayout, FlatState

name = "cpu"
# A step may be taken in several calls over disjoint sets of tensors at no extra cost: the
# state is stepped in place where it lies (the server streams each part as it is done).
STEPS_IN_PARTS = True

F32 = np.float32

# Elements per tile: big enough to amortise the per-tile overhead, small enough that
# a 16M-element tensor still splits into hundreds of tiles for the threads to share.
TILE = 1 << 16
# Steps over fewer active elements than this run on the calling thread alone: they gain
# little from more threads, and a parallel region waits for every thread to be scheduled,
# which on a machine whose other cores are busy (a shard beside its workers) can take a
# time slice. A 3K-parameter AdamW step took 0.14 ms either way on an idle 2-core machine,
# and at the 90th percentile 0.24 ms on one thread but 7.95 ms on two with the other core
# busy. (`optserve server --threads` sets the count for all steps.)
PARALLEL_MIN_ELEMENTS = 1 << 18
# Adafactor tiles keep at least this many rows, so the column partial sums a tile
# writes (one per column it covers) stay a small fraction of the data it reads.
FACTORED_MIN_ROWS = 64

# Columns of a tile record (int64). The tile covers batches B0..B0+NB, rows R0..R0+NR
# and columns C0..C0+NC of its tensor's (B, R, C) view; RS/CS are the first of its
# NB·NR row slots / NB·NC column slots in the partial-sum arrays (-1: none).
TENSOR, B0, NB, R0, NR, C0, NC, RS, CS = range(9)

# Per-tensor float32 coefficients of the Adam-family kernels, one column each.
(A_SIGN, A_L2_ON, A_L2, A_DECAY, A_B1, A_C1, A_B2, A_C2, A_SBC2, A_EPS, A_STEP,
 A_NESTEROV) = range(12)
A_COLUMNS = 12

# Per-tensor float32 coefficients of the Adafactor kernels.
(F_EPS1, F_B2T, F_C2T, F_CLIP, F_ALPHA, F_B1_ON, F_B1, F_C1, F_WD_ON, F_WDA) = range(10)
F_COLUMNS = 10

# AdamP projection modes.
NOT_PROJECTED, CHANNEL, LAYER = 0, 1, 2

# The decorators of the parallel kernels and of the helpers they call. error_model="numpy"
# makes x/0 give inf/nan as NumPy does, instead of a Python-style zero check that would
# also keep LLVM from vectorising every loop that divides. fastmath stays off: the
# float32 results must round exactly as the reference's.
_kernel = njit(parallel=True, fastmath=False, cache=True, error_model="numpy", nogil=True)
_inline = njit(fastmath=False, cache=True, error_model="numpy", nogil=True)
# float64 sums only: additions may be reordered (so they vectorise) and a multiply fused
# with the add that follows it (the float64 statistics come out no less accurate); no
# float32 result passes through these helpers.
_reduce = njit(fastmath={"reassoc", "contract"}, cache=True, error_model="numpy", nogil=True)

# Kernel calls are serialised: each already uses every core, and numba's workqueue
# threading layer (the fallback when neither TBB nor OpenMP is present) aborts on
# concurrent parallel launches from several Python threads.
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------
# Tile plans (built once per layout and view, off the hot path)
# ---------------------------------------------------------------------------------------

@dataclass
class _Plan:
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
    first = _starts(count)
    owner = np.repeat(np.arange(len(tiles)), count)
    q = np.arange(owner.size) - first[owner]
    w, s = width[owner], stride[t][owner]
    entry = (base[t] + tiles[:, B0] * stride[t] + x0)[owner] + q // w * s + q % w
    return np.where(count > 0, first, -1), entry


def _build_plan(layout: FlatLayout, dims: np.ndarray, row_base: np.ndarray | None,
                col_base: np.ndarray | None, tile: int, min_rows: int) -> _Plan:
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
    return _Plan(tiles, dims, rows, cols, row_index, col_index, n_rows, n_cols, batches,
                 np.array_equal(row_index, np.arange(n_rows)),
                 np.array_equal(col_index, np.arange(n_cols)),
                 np.array([len(s) for s in layout.shapes], np.int64))


def _is_factored(shape) -> bool:
    """Adafactor factors tensors with ndim >= 2 (reference.adafactor_is_factored)."""
    return len(shape) >= 2


def _plan_for(layout: FlatLayout, view: str) -> _Plan:
    sizes = layout.sizes
    if view == "flat":
        dims = np.stack([np.ones_like(sizes), np.ones_like(sizes), sizes], axis=1)
        return _build_plan(layout, dims, None, None, TILE, 1)
    if view == "channel":  # rows = shape[0] for ndim > 1, numbered across the job
        r = np.array([s[0] if len(s) > 1 else 1 for s in layout.shapes], np.int64)
        dims = np.stack([np.ones_like(sizes), r, sizes // np.maximum(r, 1)], axis=1)
        return _build_plan(layout, dims, _starts(r), None, TILE, 1)
    if view == "factored":  # row/col sums land where exp_avg_sq_row/_col keep them
        factored = np.array([_is_factored(s) for s in layout.shapes], bool)
        dims = np.array([(math.prod(s[:-2]), s[-2], s[-1]) if f else (1, 1, n)
                         for s, f, n in zip(layout.shapes, factored, sizes)], np.int64).reshape(-1, 3)
        missing = np.full(len(sizes), -1, np.int64)
        row_base = np.where(factored, layout.fields.get("exp_avg_sq_row", missing), -1)
        col_base = np.where(factored, layout.fields.get("exp_avg_sq_col", missing), -1)
        return _build_plan(layout, dims, row_base, col_base, TILE, FACTORED_MIN_ROWS)
    raise ValueError(view)


def _starts(counts: np.ndarray) -> np.ndarray:
    """Where each of consecutive segments of these lengths starts."""
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


def _plan(layout: FlatLayout, view: str) -> _Plan:
    return layout.memo(("cpu", view, TILE, FACTORED_MIN_ROWS), lambda: _plan_for(layout, view))


# ---------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------
# Every float32 operation is strict (fastmath off) and in the reference's order. The
# float64 sums live in the few `_reduce` helpers below, the only code allowed to reorder
# additions: otherwise LLVM may not vectorise a loop that carries a sum, and that loop
# then runs at one add latency per element. Loops that must feed a sum with float32
# results write those into a per-tile scratch buffer first, then sum it.
#
# A tile is walked in *runs*, `for bi in range(NB): for i in range(NR)`, each NC contiguous
# elements of one row, where the work needs the row (a row sum, a row factor, a row norm).
# Purely elementwise work is walked in *spans*: the whole tile at once when it covers
# whole rows (it is then contiguous, which matters for 3×3 matrices), else one span per
# run. Inner loops get slices, so that they vectorise.

@_inline
def _run(tile, r, c, bi, i):
    """Run (bi, i) of a tile: (its row id among the tensor's B·R rows, the tensor-relative
    offset of its first element, its index q = bi·NR + i within the tile)."""
    row = (tile[B0] + bi) * r + tile[R0] + i
    return row, row * c + tile[C0], bi * tile[NR] + i


@_inline
def _col_start(tile, c, bi):
    """Column id (among the tensor's B·C columns) of the first column of runs (bi, ·)."""
    return (tile[B0] + bi) * c + tile[C0]


@_inline
def _spans(tile, c):
    """(number of spans, span length) of a tile."""
    if tile[NC] == c:
        return 1, tile[NB] * tile[NR] * tile[NC]
    return tile[NB] * tile[NR], tile[NC]


@_inline
def _span(tile, r, c, x):
    """(tensor-relative start, start within the tile's elements) of span x."""
    if tile[NC] == c:
        return _run(tile, r, c, 0, 0)[1], 0
    return _run(tile, r, c, x // tile[NR], x % tile[NR])[1], x * tile[NC]


@_reduce
def _sum(x):
    """Σ x in float64."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j])
    return acc


@_reduce
def _sum_sq(x):
    """Σ x² in float64 (each square is exact in float64)."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j]) * np.float64(x[j])
    return acc


@_reduce
def _cosine_sums(g, p):
    """(Σ g·θ, Σ g², Σ θ²) in float64."""
    dot = gg = pp = 0.0
    for j in range(g.shape[0]):
        gj, pj = np.float64(g[j]), np.float64(p[j])
        dot += gj * pj
        gg += gj * gj
        pp += pj * pj
    return dot, gg, pp


@_reduce
def _step_terms(w2, wdw, dw2, g2, old, new, g):
    """Adds one element to the step statistics (Σ w², Σ w·Δw, Σ Δw², Σ g²), in float64 with
    w = old θ and Δw = new θ − old θ. Called inside the strict loops that update θ: only
    these float64 additions carry `reassoc`, which is what lets those loops vectorise."""
    w = np.float64(old)
    dw = np.float64(new) - w
    gj = np.float64(g)
    return w2 + w * w, wdw + w * dw, dw2 + dw * dw, g2 + gj * gj


@_reduce
def _step_sums(old, new, g):
    """(Σ w², Σ w·Δw, Σ Δw², Σ g²) in float64 over a span, w = old θ, Δw = new θ − old θ:
    the step statistics as a separate loop with nothing but float64 sums in it, which
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


@_inline
def _add_step_sums(out, sums):
    """out[0:4] += sums."""
    for i in range(4):
        out[i] += sums[i]


@_inline
def _moments(g, m, v, c1, b2, c2):
    """m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²   (float32, the reference's rounding)."""
    m = m + c1 * (g - m)
    v = v * b2
    v = v + c2 * (g * g)
    return m, v


@_inline
def _denom(v, sbc2, eps):
    """√v/√bc2 + ε: ε after the bias-corrected square root, as torch."""
    return np.sqrt(v) / sbc2 + eps


@_inline
def _adam_span(p, g, m, v, sign, l2_on, l2, decay, c1, b2, c2, sbc2, eps, step, stats, k):
    """The Adam(W) update of one span; adds its step statistics to stats[k] (if not None)."""
    w2 = wdw = dw2 = g2 = 0.0
    for j in range(p.shape[0]):
        pj = p[j]
        gj = sign * g[j]
        if l2_on:
            gj = gj + l2 * pj
        mj, vj = _moments(gj, m[j], v[j], c1, b2, c2)
        m[j], v[j] = mj, vj
        new = pj * decay - step * (mj / _denom(vj, sbc2, eps))
        p[j] = new
        if stats is not None:
            w2, wdw, dw2, g2 = _step_terms(w2, wdw, dw2, g2, pj, new, g[j])
    if stats is not None:
        _add_step_sums(stats[k], (w2, wdw, dw2, g2))


@_kernel
def _adam_kernel(tiles, rows, cols, coef, param, grad, exp_avg, exp_avg_sq, p_off, m_off, v_off,
                 stats):
    """AdamW and Adam, one fused pass:
        g ← ±g (+ λθ for coupled L2);  θ ← θ·decay;  m, v ← moments(g);
        θ ← θ − (lr/bc1)·m/(√v/√bc2 + ε)
    (decay = 1 unless decoupled decay is on; θ·1 is exact). stats[k] = the tile's step sums
    (stats None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        count, n = _spans(tile, cols[t])
        if stats is not None:
            stats[k, :] = 0.0
        for x in range(count):
            s, _ = _span(tile, rows[t], cols[t], x)
            po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
            _adam_span(
                param[po:po + n], grad[po:po + n], exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n],
                cf[A_SIGN], cf[A_L2_ON] != 0, cf[A_L2], cf[A_DECAY], cf[A_C1], cf[A_B2],
                cf[A_C2], cf[A_SBC2], cf[A_EPS], cf[A_STEP], stats, k)


@_kernel
def _adamp_cosine_sums(tiles, rows, cols, param, grad, p_off, out):
    """Per channel row: out[slot] = (Σ g·θ, Σ g², Σ θ²) over the raw gradient."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        n = tile[NC]
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                _, s, q = _run(tile, rows[t], cols[t], bi, i)
                po, slot = p_off[t] + s, tile[RS] + q
                out[slot, 0], out[slot, 1], out[slot, 2] = _cosine_sums(grad[po:po + n],
                                                                        param[po:po + n])


@_inline
def _adamp_direction(g, m, v, sbc2, eps, nesterov, b1, c1):
    """u = m/denom, or (β1·m + (1−β1)·g)/denom with Nesterov."""
    d = _denom(v, sbc2, eps)
    if nesterov:
        return (b1 * m + c1 * g) / d
    return m / d


@_kernel
def _adamp_moments(tiles, rows, cols, coef, mode, row_base, pnorm, param, grad, exp_avg,
                   exp_avg_sq, p_off, m_off, v_off, radial, stats):
    """Moments for every AdamP tensor. Unprojected tensors finish here
    (θ ← θ·decay − (lr/bc1)·u, and their tiles' step sums go to stats[k] unless stats is
    None); projected ones only put Σ θ̂·u per row into `radial`, with θ̂ = θ/pnorm[row]
    (pnorm = ‖θ‖ + ε of the channel row or of the whole tensor)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        c1, b2, c2, b1 = cf[A_C1], cf[A_B2], cf[A_C2], cf[A_B1]
        sbc2, eps, nesterov = cf[A_SBC2], cf[A_EPS], cf[A_NESTEROV] != 0
        decay, step = cf[A_DECAY], cf[A_STEP]
        if stats is not None:
            stats[k, :] = 0.0
        if mode[t] == NOT_PROJECTED:
            count, n = _spans(tile, cols[t])
            for x in range(count):
                s, _ = _span(tile, rows[t], cols[t], x)
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                p, g = param[po:po + n], grad[po:po + n]
                m, v = exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n]
                w2 = wdw = dw2 = g2 = 0.0
                for j in range(n):
                    m[j], v[j] = _moments(g[j], m[j], v[j], c1, b2, c2)
                    u = _adamp_direction(g[j], m[j], v[j], sbc2, eps, nesterov, b1, c1)
                    pj = p[j]
                    new = pj * decay - step * u
                    p[j] = new
                    if stats is not None:
                        w2, wdw, dw2, g2 = _step_terms(w2, wdw, dw2, g2, pj, new, g[j])
                if stats is not None:
                    _add_step_sums(stats[k], (w2, wdw, dw2, g2))
            continue
        n = tile[NC]
        terms = np.empty(n, np.float32)  # θ̂·u of one run, to be summed
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                row, s, q = _run(tile, rows[t], cols[t], bi, i)
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                p, g = param[po:po + n], grad[po:po + n]
                m, v = exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n]
                norm = pnorm[row_base[t] + row]
                for j in range(n):
                    m[j], v[j] = _moments(g[j], m[j], v[j], c1, b2, c2)
                    u = _adamp_direction(g[j], m[j], v[j], sbc2, eps, nesterov, b1, c1)
                    terms[j] = (p[j] / norm) * u
                radial[tile[RS] + q] = _sum(terms)


@_kernel
def _adamp_projected_step(tiles, rows, cols, coef, row_base, pnorm, radial, param, grad,
                          exp_avg, exp_avg_sq, p_off, m_off, v_off, stats):
    """Projected AdamP tensors: u ← u − θ̂·radial[row];  θ ← θ·decay − (lr/bc1)·u.
    stats[k] = the tile's step sums (stats None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        decay, step, c1, b1 = cf[A_DECAY], cf[A_STEP], cf[A_C1], cf[A_B1]
        sbc2, eps, nesterov = cf[A_SBC2], cf[A_EPS], cf[A_NESTEROV] != 0
        n = tile[NC]
        if stats is not None:
            stats[k, :] = 0.0
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                row, s, _ = _run(tile, rows[t], cols[t], bi, i)
                norm, rad = pnorm[row_base[t] + row], radial[row_base[t] + row]
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                p, g = param[po:po + n], grad[po:po + n]
                m, v = exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n]
                w2 = wdw = dw2 = g2 = 0.0
                for j in range(n):
                    pj = p[j]
                    u = _adamp_direction(g[j], m[j], v[j], sbc2, eps, nesterov, b1, c1)
                    u = u - (pj / norm) * rad
                    new = pj * decay - step * u
                    p[j] = new
                    if stats is not None:
                        w2, wdw, dw2, g2 = _step_terms(w2, wdw, dw2, g2, pj, new, g[j])
                if stats is not None:
                    _add_step_sums(stats[k], (w2, wdw, dw2, g2))


@_inline
def _unclipped_update(tile, t, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off, col_off,
                      row_factor, col_factor, u):
    """Adafactor's unclipped update of a whole tile into u (the tile's elements in order):
    U = (row_factor·col_factor)·g when factored (run by run), else U = g/√v (span by span)."""
    if tile[RS] >= 0:
        n = tile[NC]
        for bi in range(tile[NB]):
            cfac = col_factor[col_off[t] + _col_start(tile, cols[t], bi):][:n]
            for i in range(tile[NR]):
                row, s, q = _run(tile, rows[t], cols[t], bi, i)
                rf, g, uq = row_factor[row_off[t] + row], grad[p_off[t] + s:][:n], u[q * n:][:n]
                for j in range(n):
                    uq[j] = rf * cfac[j] * g[j]
    else:
        count, n = _spans(tile, cols[t])
        for x in range(count):
            s, e = _span(tile, rows[t], cols[t], x)
            g, v, ux = grad[p_off[t] + s:][:n], exp_avg_sq[v_off[t] + s:][:n], u[e:e + n]
            for j in range(n):
                ux[j] = g[j] / np.sqrt(v[j])


@_kernel
def _adafactor_stats(tiles, rows, cols, coef, param, grad, exp_avg_sq, p_off, v_off,
                     sums, row_part, col_part):
    """First Adafactor pass, float64 sums per tile: sums[k, 0] = Σ θ² (for RMS(θ_{t−1})).
    Factored: row/column partial sums of g² + ε1. Unfactored: v ← β̂2t·v + (1−β̂2t)(g² + ε1)
    and sums[k, 1] = Σ U² with U = g/√v."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        eps1, b2t, c2t = cf[F_EPS1], cf[F_B2T], cf[F_C2T]
        count, n = _spans(tile, cols[t])
        scratch = np.empty(count * n, np.float32)  # g² + ε1 (factored) or U (unfactored)
        psq = usq = 0.0
        for x in range(count):
            s, _ = _span(tile, rows[t], cols[t], x)
            psq += _sum_sq(param[p_off[t] + s:][:n])
            if tile[RS] < 0:
                g, v = grad[p_off[t] + s:][:n], exp_avg_sq[v_off[t] + s:][:n]
                for j in range(n):
                    vj = v[j] * b2t + c2t * (g[j] * g[j] + eps1)
                    v[j] = vj
                    scratch[j] = g[j] / np.sqrt(vj)
                usq += _sum_sq(scratch[:n])
        if tile[RS] >= 0:
            nc = tile[NC]
            cp = col_part[tile[CS]:tile[CS] + tile[NB] * nc]
            cp[:] = 0.0
            for bi in range(tile[NB]):
                col = cp[bi * nc:(bi + 1) * nc]
                for i in range(tile[NR]):
                    _, s, q = _run(tile, rows[t], cols[t], bi, i)
                    g, g2 = grad[p_off[t] + s:][:nc], scratch[:nc]
                    for j in range(nc):
                        g2[j] = g[j] * g[j] + eps1
                        col[j] += g2[j]
                    row_part[tile[RS] + q] = _sum(g2)
        sums[k, 0], sums[k, 1] = psq, usq


@_kernel
def _adafactor_factors(batches, dims, coef, row_off, col_off, row_sum, col_sum,
                       exp_avg_sq_row, exp_avg_sq_col, row_factor, col_factor):
    """Per factored tensor and batch b (R rows, C columns):
        R ← β̂2t·R + (1−β̂2t)·row_sum/C;   C ← β̂2t·C + (1−β̂2t)·col_sum/R
        row_factor = 1/√(R/mean(R));     col_factor = 1/√C.
    A chunk's batches are consecutive, so its rows (and columns) are one slice each."""
    for k in prange(batches.shape[0]):
        t, nb = batches[k, TENSOR], batches[k, NB]
        b2t, c2t = coef[t, F_B2T], coef[t, F_C2T]
        nr, nc = dims[t, 1], dims[t, 2]
        ro, co = row_off[t] + batches[k, B0] * nr, col_off[t] + batches[k, B0] * nc
        rs, rsum, rf = exp_avg_sq_row[ro:][:nb * nr], row_sum[ro:][:nb * nr], row_factor[ro:][:nb * nr]
        cs, csum, cfac = exp_avg_sq_col[co:][:nb * nc], col_sum[co:][:nb * nc], col_factor[co:][:nb * nc]
        for r in range(nb * nr):
            rs[r] = rs[r] * b2t + c2t * np.float32(rsum[r] / nc)
        for c in range(nb * nc):
            cs[c] = cs[c] * b2t + c2t * np.float32(csum[c] / nr)
            cfac[c] = np.float32(1.0) / np.sqrt(cs[c])
        for b in range(nb):
            rsb, rfb = rs[b * nr:(b + 1) * nr], rf[b * nr:(b + 1) * nr]
            mean = np.float32(_sum(rsb) / nr)
            for r in range(nr):
                rfb[r] = np.float32(1.0) / np.sqrt(rsb[r] / mean)


@_kernel
def _adafactor_update_sq(tiles, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off, col_off,
                         row_factor, col_factor, sums):
    """Factored tensors: sums[k] = Σ U² over the tile, U = (row_factor·col_factor)·g."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        u = np.empty(tile[NB] * tile[NR] * tile[NC], np.float32)
        _unclipped_update(tile, t, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off,
                          col_off, row_factor, col_factor, u)
        sums[k] = _sum_sq(u)


@_kernel
def _adafactor_apply(tiles, rows, cols, coef, param, grad, exp_avg, exp_avg_sq, p_off, m_off,
                     v_off, row_off, col_off, row_factor, col_factor, stats):
    """Last Adafactor pass: u = U/clip·α (U recomputed as in the earlier passes);
    with β1: m ← β1·m + (1−β1)·u, u = m;   θ ← θ − (λ·α)·θ;   θ ← θ − u.
    One short loop per step of that chain over the tile's scratch, so that every loop
    vectorises whichever options the tensor has. stats[k] = the tile's step sums (stats
    None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        clip, alpha, b1, c1, wda = cf[F_CLIP], cf[F_ALPHA], cf[F_B1], cf[F_C1], cf[F_WDA]
        decay = cf[F_WD_ON] != 0
        u = np.empty(tile[NB] * tile[NR] * tile[NC], np.float32)
        _unclipped_update(tile, t, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off,
                          col_off, row_factor, col_factor, u)
        for j in range(u.shape[0]):
            u[j] = u[j] / clip * alpha
        count, n = _spans(tile, cols[t])
        if stats is not None:
            stats[k, :] = 0.0
        for x in range(count):
            s, e = _span(tile, rows[t], cols[t], x)
            p, g, ux = param[p_off[t] + s:][:n], grad[p_off[t] + s:][:n], u[e:e + n]
            if cf[F_B1_ON] != 0:
                m = exp_avg[m_off[t] + s:][:n]
                for j in range(n):
                    m[j] = m[j] * b1 + c1 * ux[j]
                    ux[j] = m[j]
            for j in range(n):   # ux[j] becomes the old θ, for the step sums
                pj = p[j]
                p[j] = (pj - wda * pj if decay else pj) - ux[j]
                if stats is not None:
                    ux[j] = pj
            if stats is not None:
                _add_step_sums(stats[k], _step_sums(ux, p, g))


# ---------------------------------------------------------------------------------------
# Per-tensor scalars and the per-optimizer drivers
# ---------------------------------------------------------------------------------------

_EMPTY_F32 = np.zeros(0, np.float32)


def _field(layout: FlatLayout, state: FlatState, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A state buffer and its per-tensor offsets (an empty buffer when no tensor has it)."""
    if name in state.fields:
        return state.fields[name], layout.fields[name]
    return _EMPTY_F32, np.full(layout.num_tensors, -1, np.int64)


def _adam_coefficients(h: dict, steps: np.ndarray) -> np.ndarray:
    """Columns shared by the Adam family: β's, √bc2 and lr/bc1 (formed in float64)."""
    coef = np.zeros((len(steps), A_COLUMNS), np.float64)
    b1, b2 = h["beta1"], h["beta2"]
    coef[:, A_SIGN] = coef[:, A_DECAY] = 1.0
    coef[:, A_B1], coef[:, A_C1] = b1, 1.0 - b1
    coef[:, A_B2], coef[:, A_C2] = b2, 1.0 - b2
    coef[:, A_SBC2], coef[:, A_STEP] = coefficients.adam_bias_correction(h, steps)
    coef[:, A_EPS] = h["eps"]
    return coef


STEP_SUMS = ("w2", "wdw", "dw2", "g2")


def _tile_sums(tiles: np.ndarray, with_stats: bool) -> np.ndarray | None:
    """The array of per-tile step sums for a kernel to fill, or None: compute none."""
    return np.empty((len(tiles), len(STEP_SUMS)), np.float64) if with_stats else None


def _per_tensor(tiles: np.ndarray, stats: np.ndarray | None, n_t: int, out: dict) -> None:
    """Adds per-tile step sums (columns in STEP_SUMS order) into out's per-tensor arrays."""
    if stats is not None:
        for i, key in enumerate(STEP_SUMS):
            out[key] += np.bincount(tiles[:, TENSOR], stats[:, i], n_t)


def _adam_family(optimizer, layout, state, grad, active, h, steps, out, with_stats):
    plan = _plan(layout, "flat")
    coef = _adam_coefficients(h, steps)
    coef[:, A_SIGN] = np.where(h["maximize"] != 0, -1.0, 1.0)
    if optimizer == "adam":  # coupled L2: g ← g + λθ
        coef[:, A_L2_ON], coef[:, A_L2] = h["weight_decay"] != 0, h["weight_decay"]
    else:
        coef[:, A_DECAY] = coefficients.decoupled_decay(h, active)
    m, m_off = _field(layout, state, "exp_avg")
    v, v_off = _field(layout, state, "exp_avg_sq")
    tiles = plan.select(active)
    stats = _tile_sums(tiles, with_stats)
    _adam_kernel(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad,
                 m, v, layout.offsets, m_off, v_off, stats)
    _per_tensor(tiles, stats, layout.num_tensors, out)


def _adamp_modes(layout, plan, active, sums, h):
    """Which view (if any) projects each tensor, and ‖θ‖ + ε per channel row for it.

    Channel view: every row needs |cos(g, θ)| < δ/√(row length). Else the layer view, whose
    sums are the sums over the tensor's channel rows, needs |cos| < δ/√numel."""
    r = plan.rows
    first = _starts(r)
    eps = h["eps"]
    eps_row = np.repeat(eps, r)

    def cosine(dot, gg, pp, e):  # |x·y| / (max(‖x‖, ε)·max(‖y‖, ε)), F.cosine_similarity
        return np.abs(dot) / (np.maximum(np.sqrt(gg), e) * np.maximum(np.sqrt(pp), e))

    dot, gg, pp = (plan.row_sums(sums[:, i]) for i in range(3))
    channel = np.maximum.reduceat(cosine(dot, gg, pp, eps_row), first) < h["delta"] / np.sqrt(plan.cols)
    tdot, tgg, tpp = (np.add.reduceat(x, first) for x in (dot, gg, pp))
    layer = cosine(tdot, tgg, tpp, eps) < h["delta"] / np.sqrt(layout.sizes)
    candidate = active & (plan.ndim > 1)
    mode = np.where(candidate & channel, CHANNEL,
                    np.where(candidate & layer, LAYER, NOT_PROJECTED)).astype(np.int64)
    # θ̂ = θ/(‖θ‖ + ε), the norm from a float32 sum of squares as in the reference.
    chan_norm = np.sqrt(pp.astype(F32)) + eps_row.astype(F32)
    layer_norm = np.repeat(np.sqrt(tpp.astype(F32)) + eps.astype(F32), r)
    pnorm = np.where(np.repeat(mode, r) == LAYER, layer_norm, chan_norm)
    return mode, pnorm


def _adamp(layout, state, grad, active, h, steps, out, with_stats):
    plan = _plan(layout, "channel")
    coef = _adam_coefficients(h, steps)
    coef[:, A_NESTEROV] = h["nesterov"]
    p_off = layout.offsets
    m, m_off = _field(layout, state, "exp_avg")
    v, v_off = _field(layout, state, "exp_avg_sq")
    row_base = _starts(plan.rows)

    # Partial-sum slots of tiles that are not run stay unset; nothing reads their rows.
    sums = np.empty((plan.row_index.size, 3), np.float64)
    _adamp_cosine_sums(plan.select(active & (plan.ndim > 1)), plan.rows, plan.cols, state.param,
                       grad, p_off, sums)
    mode, pnorm = _adamp_modes(layout, plan, active, sums, h)

    ratio = np.where(mode != NOT_PROJECTED, h["wd_ratio"], 1.0)
    wd = h["weight_decay"]
    coef[:, A_DECAY] = np.where(wd > 0, 1.0 - h["lr"] * wd * ratio, 1.0)
    coef = coef.astype(F32)

    partial = np.empty(plan.row_index.size, np.float64)
    tiles = plan.select(active)
    stats = _tile_sums(tiles, with_stats)  # zeros for projected tiles
    _adamp_moments(tiles, plan.rows, plan.cols, coef, mode, row_base, pnorm,
                   state.param, grad, m, v, p_off, m_off, v_off, partial, stats)
    _per_tensor(tiles, stats, layout.num_tensors, out)
    projected = mode != NOT_PROJECTED
    if projected.any():
        radial = plan.row_sums(partial)
        layer_total = np.repeat(np.add.reduceat(radial, row_base), plan.rows)
        radial = np.where(np.repeat(mode, plan.rows) == LAYER, layer_total, radial).astype(F32)
        tiles = plan.select(projected)
        stats = _tile_sums(tiles, with_stats)
        _adamp_projected_step(tiles, plan.rows, plan.cols, coef, row_base, pnorm, radial,
                              state.param, grad, m, v, p_off, m_off, v_off, stats)
        _per_tensor(tiles, stats, layout.num_tensors, out)
    out["projected"] = projected


def _adafactor(layout, state, grad, active, h, steps, out, with_stats):
    plan = _plan(layout, "factored")
    n_t = layout.num_tensors
    tiles = plan.select(active)
    p_off = layout.offsets
    m, m_off = _field(layout, state, "exp_avg")
    v, v_off = _field(layout, state, "exp_avg_sq")
    row_state, row_off = _field(layout, state, "exp_avg_sq_row")
    col_state, col_off = _field(layout, state, "exp_avg_sq_col")

    coef = np.zeros((n_t, F_COLUMNS), np.float64)
    beta2t = coefficients.adafactor_beta2t(h, steps)
    coef[:, F_EPS1], coef[:, F_B2T], coef[:, F_C2T] = h["eps"], beta2t, 1.0 - beta2t

    # Pass 1: Σθ², row/col sums of g² + ε1, and the whole unfactored update.
    # Partial-sum slots of tiles that are not run stay unset; nothing reads their rows.
    sums = np.empty((len(tiles), 2), np.float64)
    row_part = np.empty(plan.row_index.size, np.float64)
    col_part = np.empty(plan.col_index.size, np.float64)
    _adafactor_stats(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, v,
                     p_off, v_off, sums, row_part, col_part)
    param_sq = np.bincount(tiles[:, TENSOR], sums[:, 0], n_t)
    update_sq = np.bincount(tiles[:, TENSOR], sums[:, 1], n_t)

    # α_t = max(ε2, RMS(θ_{t−1}))·ρ_t (reference.adafactor_lr).
    rho = coefficients.adafactor_rho(h, steps)
    scale = np.where(h["scale_parameter"] != 0,
                     np.maximum(h["eps2"], np.sqrt(param_sq / layout.sizes)), 1.0)
    alpha = scale * rho

    # Pass 2 (factored tensors): the factors, then Σ U² for the RMS clip.
    factored = active & (row_off >= 0)
    if factored.any():
        row_factor = np.empty(row_state.size, F32)
        col_factor = np.empty(col_state.size, F32)
        batches = np.ascontiguousarray(plan.batches[factored[plan.batches[:, TENSOR]]])
        _adafactor_factors(batches, plan.dims, coef.astype(F32), row_off, col_off,
                           plan.row_sums(row_part), plan.col_sums(col_part),
                           row_state, col_state, row_factor, col_factor)
        ftiles = plan.select(factored)
        fsums = np.empty(len(ftiles), np.float64)
        _adafactor_update_sq(ftiles, plan.rows, plan.cols, grad, v, p_off, v_off, row_off,
                             col_off, row_factor, col_factor, fsums)
        update_sq += np.bincount(ftiles[:, TENSOR], fsums, n_t)
    else:
        row_factor = col_factor = _EMPTY_F32

    # Pass 3: clip, scale, momentum, decay, subtract.
    clip = np.maximum(1.0, np.sqrt(update_sq / layout.sizes) / h["clip_threshold"])
    beta1 = h["adafactor_beta1"]
    coef[:, F_CLIP], coef[:, F_ALPHA] = clip, alpha
    coef[:, F_B1_ON] = ~np.isnan(beta1)
    coef[:, F_B1], coef[:, F_C1] = np.nan_to_num(beta1), 1.0 - np.nan_to_num(beta1)
    coef[:, F_WD_ON], coef[:, F_WDA] = h["weight_decay"] != 0, h["weight_decay"] * alpha
    stats = _tile_sums(tiles, with_stats)
    _adafactor_apply(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, m, v,
                     p_off, m_off, v_off, row_off, col_off, row_factor, col_factor, stats)
    _per_tensor(tiles, stats, n_t, out)
    out["clip"] = np.where(active, clip, 1.0)


def step(optimizer: str, layout: FlatLayout, state: FlatState, grad: np.ndarray,
         active: np.ndarray, hyper: dict, *, stats: bool = True) -> dict:
    """One step of every active tensor, in place; the contract of reference.step.

    Returns per-tensor statistics: "projected" (bool, AdamP), "clip" (float64, Adafactor's
    clip divisor) and, only when `stats` is true, in float64, "w2" = ‖w_t‖², "wdw" =
    ⟨w_t, Δw⟩, "dw2" = ‖Δw‖², "g2" = ‖g‖² with Δw = w_{t+1} − w_t (zeros for inactive
    tensors); with stats=False those keys are absent.
    """
    if optimizer not in ("adamw", "adam", "adamp", "adafactor"):
        raise ValueError(f"unknown optimizer {optimizer!r}")
    n_t = layout.num_tensors
    active = np.asarray(active, bool)
    out = {"projected": np.zeros(n_t, bool), "clip": np.ones(n_t, np.float64)}
    if stats:
        out.update({key: np.zeros(n_t, np.float64) for key in STEP_SUMS})
    if not active.any():
        return out
    h = {k: np.asarray(v, np.float64) for k, v in hyper.items()}
    # Inactive tensors may have step 0 and arbitrary hyperparameters; their coefficients
    # are computed (vectorised) but never read, so silence the warnings they may raise.
    steps = np.maximum(state.steps, 1).astype(np.float64)
    threads = numba.get_num_threads()   # thread-local in numba: set for this call only
    if layout.sizes[active].sum() < PARALLEL_MIN_ELEMENTS:
        numba.set_num_threads(1)
    try:
        with _lock, np.errstate(all="ignore"):
            if optimizer in ("adamw", "adam"):
                _adam_family(optimizer, layout, state, grad, active, h, steps, out, stats)
            elif optimizer == "adamp":
                _adamp(layout, state, grad, active, h, steps, out, stats)
            else:
                _adafactor(layout, state, grad, active, h, steps, out, stats)
    finally:
        numba.set_num_threads(threads)
    return out
