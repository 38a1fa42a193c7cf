"""torch.optim.Adafactor: the NumPy reference, the numba CPU kernels and the CUDA driver.

torch's own Adafactor (torch/optim/_adafactor.py, the single-tensor loop) keeps the factors of
transformers' Adafactor (kernels/adafactor.py) but differs in four places: it clamps where
transformers adds ε1, its relative step is capped by lr, it always scales by RMS(θ), and its
weight decay is θ·(1 − lr·λ). Per tensor, with g negated under `maximize` and
w = t^beta2_decay (= 1 − β̂2t, the weight of torch's lerp):

    α = max(ε2, RMS(θ_{t−1})) · min(lr, 1/√t)
    θ ← θ·(1 − lr·λ)
    ndim ≥ 2, over the last two dims (leading dims are a batch):
        R ← lerp(R, mean over columns of g², w);   C ← lerp(C, mean over rows of g², w)
        V = R·C / max(mean(R), ε1)
    else:  V = v ← lerp(v, g², w)
    U = g / √max(V, ε1²)
    θ ← θ − (α / max(1, RMS(U)/d)) · U

lerp(a, b, w) is torch's: a + w·(b − a) for w < 0.5, else b − (b − a)·(1 − w) (exact b at
t = 1). ε1 = None is float32's machine epsilon (the client sends it as a number). The shard
keeps R, C and v under transformers' names (exp_avg_sq_row / _col / exp_avg_sq, without
torch's kept dims); the client's state dict uses torch's row_var / col_var / variance.

References: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", ICML 2018, Alg. 4 and 5; torch.optim.Adafactor (the oracle).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from optserve.kernels import cpu_tiles
from optserve.kernels.adafactor import is_factored, rms
from optserve.kernels.backend import CudaKernels, Kernel, Report, StepCall, View
from optserve.kernels.cpu_tiles import B0, CS, NB, NC, NR, RS, TENSOR
from optserve.kernels.hyper import Hyper
from optserve.kernels.numba_ops import (EMPTY_F32, F32, add_step_sums, col_start, field,
                                        inline, kernel, reduce_step_sums, reduce_sum,
                                        reduce_sum_sq, run, span, spans, tile_sums)

# ---------------------------------------------------------------------------------------
# The NumPy reference, one tensor at a time
# ---------------------------------------------------------------------------------------


def lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """start ← torch.lerp(start, end, weight), in float32 (the weight too), in place."""
    w = F32(weight)
    if abs(w) < 0.5:
        start += w * (end - start)
    else:
        start[...] = end - (end - start) * (F32(1) - w)


def torch_adafactor(param, grad, state, *, step, lr=1e-2, beta2_decay=-0.8,
                    eps1=2.0 ** -23, eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False):
    """One torch.optim.Adafactor step of one tensor, in place; returns the clipping divisor
    max(1, RMS(U)/d)."""
    g = -grad if maximize else grad
    weight = step ** beta2_decay
    alpha = max(eps2, rms(param)) * min(lr, 1.0 / step ** 0.5)
    if weight_decay != 0:
        param *= F32(1.0 - lr * weight_decay)
    g2 = g * g
    if is_factored(param.shape):
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        lerp_(row, g2.mean(axis=-1, dtype=np.float32), weight)
        lerp_(col, g2.mean(axis=-2, dtype=np.float32), weight)
        row_mean = np.maximum(row.mean(axis=-1, keepdims=True, dtype=np.float32), F32(eps1))
        v = (row[..., :, None] * col[..., None, :]) / row_mean[..., None]
    else:
        v = state["exp_avg_sq"]
        lerp_(v, g2, weight)
    update = (F32(1) / np.sqrt(np.maximum(v, F32(eps1 * eps1)))) * g
    clip = max(1.0, rms(update) / d)
    param -= F32(alpha / clip) * update
    return clip


def _reference(param, grad, state, step, h: Hyper) -> dict:
    clip = torch_adafactor(param, grad, state, step=step, lr=h.lr, beta2_decay=h.decay_rate,
                           eps1=h.eps, eps2=h.eps2, d=h.clip_threshold,
                           weight_decay=h.weight_decay, maximize=h.maximize)
    return {Report.CLIP: clip}


def lerp_weights(h: Hyper, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w, 1 − w, w < 0.5) per tensor, w = t^beta2_decay as float32 and 1 − w formed in
    float32 from it, as torch's lerp forms them."""
    w = (steps ** h.decay_rate).astype(F32)
    return w.astype(np.float64), (F32(1) - w).astype(np.float64), np.abs(w) < 0.5


def step_sizes(h: Hyper, steps: np.ndarray, param_sq: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """α per tensor: max(ε2, RMS(θ_{t−1}))·min(lr, 1/√t), RMS from Σθ² in float64."""
    return np.maximum(h.eps2, np.sqrt(param_sq / sizes)) * np.minimum(h.lr, 1.0 / steps ** 0.5)


# ---------------------------------------------------------------------------------------
# CPU (numba), in the factored view: Σθ², row/column sums of g² (the whole update of
# unfactored tensors' v); the factors; Σ U²; then decay and the scaled update
# ---------------------------------------------------------------------------------------

# Per-tensor float32 coefficients.
(T_SIGN, T_W, T_OMW, T_SMALL, T_EPS1, T_EPS1SQ, T_DECAY, T_SCALE) = range(8)
T_COLUMNS = 8


@inline
def _lerp(start, end, w, omw, small):
    """torch.lerp(start, end, w) in float32, 1 − w given as omw."""
    if small:
        return start + w * (end - start)
    return end - (end - start) * omw


@inline
def _clamp_min(x, low):
    """max(x, low) keeping a NaN, as torch.clamp_min and np.maximum."""
    return x if (x >= low or x != x) else low


@inline
def _update(tile, t, rows, cols, coef, grad, variance, p_off, v_off, row_off, col_off,
            row_state, col_state, row_mean, u):
    """U of a whole tile into u (the tile's elements in order): U = g/√max(V, ε1²) with
    V = (R·C)/max(mean(R), ε1) when factored (run by run), else V = v (span by span)."""
    sign, eps1sq = coef[t, T_SIGN], coef[t, T_EPS1SQ]
    one = np.float32(1.0)
    if tile[RS] >= 0:
        n = tile[NC]
        for bi in range(tile[NB]):
            c = col_state[col_off[t] + col_start(tile, cols[t], bi):][:n]
            for i in range(tile[NR]):
                row, s, q = run(tile, rows[t], cols[t], bi, i)
                r, rm = row_state[row_off[t] + row], row_mean[row_off[t] + row]
                g, uq = grad[p_off[t] + s:][:n], u[q * n:][:n]
                for j in range(n):
                    uq[j] = (one / np.sqrt(_clamp_min((r * c[j]) / rm, eps1sq))) * (sign * g[j])
    else:
        count, n = spans(tile, cols[t])
        for x in range(count):
            s, e = span(tile, rows[t], cols[t], x)
            g, v, ux = grad[p_off[t] + s:][:n], variance[v_off[t] + s:][:n], u[e:e + n]
            for j in range(n):
                ux[j] = (one / np.sqrt(_clamp_min(v[j], eps1sq))) * (sign * g[j])


@kernel
def _torch_adafactor_norms(tiles, rows, cols, coef, param, grad, variance, p_off, v_off,
                           norms, row_part, col_part):
    """First pass, float64 sums per tile: norms[k, 0] = Σ θ² (θ_{t−1}, for α). Factored:
    row/column partial sums of g². Unfactored: v ← lerp(v, g², w) and norms[k, 1] = Σ U²."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        sign, w, omw, small, eps1sq = cf[T_SIGN], cf[T_W], cf[T_OMW], cf[T_SMALL] != 0, cf[T_EPS1SQ]
        count, n = spans(tile, cols[t])
        scratch = np.empty(count * n, np.float32)  # g² (factored) or U (unfactored)
        psq = usq = 0.0
        for x in range(count):
            s, _ = span(tile, rows[t], cols[t], x)
            psq += reduce_sum_sq(param[p_off[t] + s:][:n])
            if tile[RS] < 0:
                g, v = grad[p_off[t] + s:][:n], variance[v_off[t] + s:][:n]
                for j in range(n):
                    gj = sign * g[j]
                    vj = _lerp(v[j], gj * gj, w, omw, small)
                    v[j] = vj
                    scratch[j] = (np.float32(1.0) / np.sqrt(_clamp_min(vj, eps1sq))) * gj
                usq += reduce_sum_sq(scratch[:n])
        if tile[RS] >= 0:
            nc = tile[NC]
            cp = col_part[tile[CS]:tile[CS] + tile[NB] * nc]
            cp[:] = 0.0
            for bi in range(tile[NB]):
                col = cp[bi * nc:(bi + 1) * nc]
                for i in range(tile[NR]):
                    _, s, q = run(tile, rows[t], cols[t], bi, i)
                    g, g2 = grad[p_off[t] + s:][:nc], scratch[:nc]
                    for j in range(nc):
                        g2[j] = g[j] * g[j]
                        col[j] += g2[j]
                    row_part[tile[RS] + q] = reduce_sum(g2)
        norms[k, 0], norms[k, 1] = psq, usq


@kernel
def _torch_adafactor_factors(batches, dims, coef, row_off, col_off, row_sum, col_sum,
                             row_state, col_state, row_mean):
    """Per factored tensor and batch b (R rows, C columns):
        R ← lerp(R, row_sum/C, w);   C ← lerp(C, col_sum/R, w)
        row_mean[each row of b] = max(mean(R), ε1)."""
    for k in prange(batches.shape[0]):
        t, nb = batches[k, TENSOR], batches[k, NB]
        w, omw, small, eps1 = coef[t, T_W], coef[t, T_OMW], coef[t, T_SMALL] != 0, coef[t, T_EPS1]
        nr, nc = dims[t, 1], dims[t, 2]
        ro, co = row_off[t] + batches[k, B0] * nr, col_off[t] + batches[k, B0] * nc
        rs, rsum, rm = row_state[ro:][:nb * nr], row_sum[ro:][:nb * nr], row_mean[ro:][:nb * nr]
        cs, csum = col_state[co:][:nb * nc], col_sum[co:][:nb * nc]
        for r in range(nb * nr):
            rs[r] = _lerp(rs[r], np.float32(rsum[r] / nc), w, omw, small)
        for c in range(nb * nc):
            cs[c] = _lerp(cs[c], np.float32(csum[c] / nr), w, omw, small)
        for b in range(nb):
            mean = _clamp_min(np.float32(reduce_sum(rs[b * nr:(b + 1) * nr]) / nr), eps1)
            rm[b * nr:(b + 1) * nr] = mean


@kernel
def _torch_adafactor_update_sq(tiles, rows, cols, coef, grad, variance, p_off, v_off, row_off,
                               col_off, row_state, col_state, row_mean, update_sq):
    """Factored tensors: update_sq[k] = Σ U² over the tile."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        u = np.empty(tile[NB] * tile[NR] * tile[NC], np.float32)
        _update(tile, tile[TENSOR], rows, cols, coef, grad, variance, p_off, v_off, row_off,
                col_off, row_state, col_state, row_mean, u)
        update_sq[k] = reduce_sum_sq(u)


@kernel
def _torch_adafactor_apply(tiles, rows, cols, coef, param, grad, variance, p_off, v_off,
                           row_off, col_off, row_state, col_state, row_mean, sums):
    """Last pass: θ ← θ·(1 − lr·λ) − (α/clip)·U (U recomputed as in the earlier passes).
    sums[k] = the tile's step sums (sums None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        decay, scale = coef[t, T_DECAY], coef[t, T_SCALE]
        u = np.empty(tile[NB] * tile[NR] * tile[NC], np.float32)
        _update(tile, t, rows, cols, coef, grad, variance, p_off, v_off, row_off, col_off,
                row_state, col_state, row_mean, u)
        count, n = spans(tile, cols[t])
        if sums is not None:
            sums[k, :] = 0.0
        for x in range(count):
            s, e = span(tile, rows[t], cols[t], x)
            p, g, ux = param[p_off[t] + s:][:n], grad[p_off[t] + s:][:n], u[e:e + n]
            for j in range(n):   # ux[j] becomes the old θ, for the step sums
                pj = p[j]
                p[j] = pj * decay - scale * ux[j]
                if sums is not None:
                    ux[j] = pj
            if sums is not None:
                add_step_sums(sums[k], reduce_step_sums(ux, p, g))


def _cpu(call: StepCall) -> None:
    layout, state, grad, active, h, steps = (call.layout, call.state, call.grad, call.active,
                                             call.hyper, call.steps)
    plan = cpu_tiles.plan(layout, View.FACTORED)
    n_t = layout.num_tensors
    tiles = plan.select(active)
    p_off = layout.offsets
    v, v_off = field(layout, state, "exp_avg_sq")
    row_state, row_off = field(layout, state, "exp_avg_sq_row")
    col_state, col_off = field(layout, state, "exp_avg_sq_col")

    coef = np.zeros((n_t, T_COLUMNS), np.float64)
    coef[:, T_SIGN] = np.where(h.maximize, -1.0, 1.0)
    coef[:, T_W], coef[:, T_OMW], coef[:, T_SMALL] = lerp_weights(h, steps)
    coef[:, T_EPS1], coef[:, T_EPS1SQ] = h.eps, h.eps * h.eps
    coef[:, T_DECAY] = 1.0 - h.lr * h.weight_decay

    # Pass 1: Σθ², row/col sums of g², and the whole unfactored update.
    norms = np.empty((len(tiles), 2), np.float64)
    row_part = np.empty(plan.row_index.size, np.float64)
    col_part = np.empty(plan.col_index.size, np.float64)
    _torch_adafactor_norms(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, v,
                           p_off, v_off, norms, row_part, col_part)
    param_sq = np.bincount(tiles[:, TENSOR], norms[:, 0], n_t)
    update_sq = np.bincount(tiles[:, TENSOR], norms[:, 1], n_t)
    alpha = step_sizes(h, steps, param_sq, layout.sizes)

    # Pass 2 (factored tensors): the factors and row means, then Σ U² for the clip.
    factored = active & (row_off >= 0)
    row_mean = EMPTY_F32
    if factored.any():
        row_mean = np.empty(row_state.size, F32)
        batches = np.ascontiguousarray(plan.batches[factored[plan.batches[:, TENSOR]]])
        _torch_adafactor_factors(batches, plan.dims, coef.astype(F32), row_off, col_off,
                                 plan.row_sums(row_part), plan.col_sums(col_part),
                                 row_state, col_state, row_mean)
        ftiles = plan.select(factored)
        fsums = np.empty(len(ftiles), np.float64)
        _torch_adafactor_update_sq(ftiles, plan.rows, plan.cols, coef.astype(F32), grad, v,
                                   p_off, v_off, row_off, col_off, row_state, col_state,
                                   row_mean, fsums)
        update_sq += np.bincount(ftiles[:, TENSOR], fsums, n_t)

    # Pass 3: decay and the clipped, scaled update.
    # fmax: a NaN RMS(U) gives 1, as torch's (and the reference's) Python max(1.0, nan)
    clip = np.fmax(1.0, np.sqrt(update_sq / layout.sizes) / h.clip_threshold)
    coef[:, T_SCALE] = alpha / clip
    sums = tile_sums(tiles, call.sums)
    _torch_adafactor_apply(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, v,
                           p_off, v_off, row_off, col_off, row_state, col_state, row_mean, sums)
    if sums is not None:
        call.result.sums.add_tiles(tiles[:, TENSOR], sums)
    call.result.reports[Report.CLIP] = np.where(active, clip, 1.0)


# ---------------------------------------------------------------------------------------
# CUDA (kernels/csrc/torch_adafactor.cu): sums, combine, row means, Σ U², decide, apply
# ---------------------------------------------------------------------------------------

def _cuda(call: StepCall, cs) -> None:
    h, plan, active = call.hyper, cs.plan, call.active
    cf = cs.table("TorchAdafactorCoef")
    cf.active = active
    cf.sign = np.where(h.maximize, -1.0, 1.0)
    cf.w, cf.omw, cf.small = lerp_weights(h, call.steps)
    cf.eps1, cf.eps1sq = h.eps, h.eps * h.eps
    cf.rho, cf.eps2, cf.d = np.minimum(h.lr, 1.0 / call.steps ** 0.5), h.eps2, h.clip_threshold
    cf.decay = 1.0 - h.lr * h.weight_decay
    coef = cs.upload(cf)
    v = cs.field("exp_avg_sq")
    rows, cols = cs.field("exp_avg_sq_row"), cs.field("exp_avg_sq_col")
    n_rows, n_cols = plan.row_owner.size, plan.col_owner.size
    row_part = cs.scratch("row_part", plan.n_row_slots, np.float64)
    col_part = cs.scratch("col_part", plan.n_col_slots, np.float64)
    row_mean = cs.scratch("row_mean", n_rows, np.float32)
    norms = cs.scratch("norms", cs.n_tiles * 2, np.float64)
    scale = cs.scratch("torch_scale", cs.n_tensors * 2, np.float64)
    cs.launch("torch_adafactor_sums", cs.n_tiles, cs.tiles, cs.tinfo, coef, cs.param, cs.grad,
              cs.gkind, v, row_part, col_part, norms)
    cs.launch("torch_adafactor_combine", -(-(n_rows + n_cols) // cs.block), cs.tinfo, coef,
              cs.dev["row_owner"], n_rows, cs.dev["col_owner"], n_cols, row_part, col_part,
              rows, cols)
    cs.launch("torch_adafactor_row_means", -(-len(plan.batches) // cs.warps), cs.dev["batches"],
              len(plan.batches), cs.tinfo, coef, rows, row_mean)
    cs.launch("torch_adafactor_update_sq", cs.n_tiles, cs.tiles, cs.tinfo, coef, cs.grad,
              cs.gkind, rows, cols, row_mean, norms)
    cs.launch("torch_adafactor_decide", cs.n_tensors, cs.tinfo, coef, norms, scale)
    cs.launch("torch_adafactor_apply", cs.n_tiles, cs.tiles, cs.tinfo, coef, scale, cs.param,
              cs.grad, cs.gkind, v, rows, cols, row_mean, cs.tile_sums, cs.with_sums)
    clip = cs.download(scale, "TorchAdafactorScale")["clip"]
    call.result.reports[Report.CLIP] = np.where(active, clip, 1.0)


TORCH_ADAFACTOR = Kernel(
    "torch_adafactor", View.FACTORED, (Report.CLIP,), reference=_reference, cpu=_cpu,
    cuda=CudaKernels("torch_adafactor.cu", ("torch_adafactor_sums", "torch_adafactor_combine",
                                            "torch_adafactor_row_means",
                                            "torch_adafactor_update_sq",
                                            "torch_adafactor_decide", "torch_adafactor_apply"),
                     _cuda))   # oracle: torch.optim.Adafactor
