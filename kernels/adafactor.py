"""Adafactor: the NumPy reference, the numba CPU kernels and the CUDA driver.

Factored second moments over the last two dims (leading dims are a batch), transformers'
semantics:

    β̂2t = 1 − t^decay_rate;  R ← β̂2t·R + (1−β̂2t)·mean_col(g² + ε1);  C likewise over rows
    V̂ = R·C / mean(R);  U = g/√V̂  (unfactored: v ← β̂2t·v + (1−β̂2t)(g² + ε1), U = g/√v)
    Û = U / max(1, RMS(U)/d);  u = α_t·Û (EMA with β1 if set);  θ ← θ − λ·α_t·θ;  θ ← θ − u
    α_t = max(ε2, RMS(θ_{t−1}))·ρ_t (or ρ_t without scale_parameter),
    ρ_t = min(1e−2, 1/√t) (1e−6·t for the first with warmup_init) with relative_step, else lr

References: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", ICML 2018, Alg. 4 and 5; transformers.optimization.Adafactor (the oracle, fairseq's
lineage).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from optserve.kernels import cpu_tiles
from optserve.kernels.backend import CudaKernels, Kernel, Report, StepCall, View
from optserve.kernels.cpu_tiles import B0, CS, NB, NC, NR, RS, TENSOR
from optserve.kernels.hyper import Hyper
from optserve.kernels.numba_ops import (EMPTY_F32, F32, add_step_sums, col_start, field,
                                        inline, kernel, reduce_step_sums, reduce_sum,
                                        reduce_sum_sq, run, span, spans, tile_sums)

# ---------------------------------------------------------------------------------------
# The NumPy reference, one tensor at a time
# ---------------------------------------------------------------------------------------


def is_factored(shape) -> bool:
    """Tensors with ndim >= 2 keep factored second moments over their last two dims."""
    return len(shape) >= 2


def rms(x: np.ndarray) -> float:
    """RMS(x) = ‖x‖₂/√numel, accumulated in float64."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def step_size(*, step, lr, relative_step, warmup_init, scale_parameter, eps2, param_rms):
    """α_t = max(ε2, RMS(θ_{t−1}))·ρ_t with ρ_t = min(1e−2, 1/√t) (relative) or the given lr."""
    rho = lr
    if relative_step:
        rho = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    scale = max(eps2, param_rms) if scale_parameter else 1.0
    return scale * rho


def adafactor(param, grad, state, *, step, lr=None, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
              decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
              relative_step=True, warmup_init=False):
    """One Adafactor step of one tensor, in place; returns the clipping divisor
    max(1, RMS(U)/d)."""
    alpha = step_size(step=step, lr=lr, relative_step=relative_step, warmup_init=warmup_init,
                      scale_parameter=scale_parameter, eps2=eps2, param_rms=rms(param))
    beta2t = 1.0 - step**decay_rate
    g2 = grad * grad + F32(eps1)
    if is_factored(param.shape):
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row *= F32(beta2t)
        row += F32(1.0 - beta2t) * g2.mean(axis=-1, dtype=np.float32)
        col *= F32(beta2t)
        col += F32(1.0 - beta2t) * g2.mean(axis=-2, dtype=np.float32)
        row_factor = 1.0 / np.sqrt(row / row.mean(axis=-1, keepdims=True, dtype=np.float32))
        col_factor = 1.0 / np.sqrt(col)
        update = row_factor[..., :, None] * col_factor[..., None, :] * grad
    else:
        v = state["exp_avg_sq"]
        v *= F32(beta2t)
        v += F32(1.0 - beta2t) * g2
        update = grad / np.sqrt(v)
    clip = max(1.0, rms(update) / clip_threshold)
    update = update / F32(clip) * F32(alpha)
    if beta1 is not None:
        m = state["exp_avg"]
        m *= F32(beta1)
        m += F32(1.0 - beta1) * update
        update = m
    if weight_decay != 0:
        param -= F32(weight_decay * alpha) * param
    param -= update
    return clip


def _reference(param, grad, state, step, h: Hyper) -> dict:
    clip = adafactor(param, grad, state, step=step, lr=h.lr, eps1=h.eps, eps2=h.eps2,
                     clip_threshold=h.clip_threshold, decay_rate=h.decay_rate,
                     beta1=None if math.isnan(h.adafactor_beta1) else h.adafactor_beta1,
                     weight_decay=h.weight_decay, scale_parameter=h.scale_parameter,
                     relative_step=h.relative_step, warmup_init=h.warmup_init)
    return {Report.CLIP: clip}


def beta2t(h: Hyper, steps: np.ndarray) -> np.ndarray:
    """β̂2t = 1 − t^decay_rate per tensor."""
    return 1.0 - steps ** h.decay_rate


def rho(h: Hyper, steps: np.ndarray) -> np.ndarray:
    """ρ_t per tensor: min(1e-2 (1e-6·t with warmup_init), 1/√t) with relative_step, else lr."""
    relative = np.minimum(np.where(h.warmup_init, 1e-6 * steps, 1e-2), 1.0 / np.sqrt(steps))
    return np.where(h.relative_step, relative, h.lr)


# ---------------------------------------------------------------------------------------
# CPU (numba), in the factored view: Σθ² and row/column sums of g² + ε1 (the whole step
# of unfactored tensors' v); the factors; Σ U²; then clip, scale, momentum, decay
# ---------------------------------------------------------------------------------------

# Per-tensor float32 coefficients of the Adafactor kernels.
(F_EPS1, F_B2T, F_C2T, F_CLIP, F_ALPHA, F_B1_ON, F_B1, F_C1, F_WD_ON, F_WDA) = range(10)
F_COLUMNS = 10


@inline
def _unclipped_update(tile, t, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off, col_off,
                      row_factor, col_factor, u):
    """Adafactor's unclipped update of a whole tile into u (the tile's elements in order):
    U = (row_factor·col_factor)·g when factored (run by run), else U = g/√v (span by span)."""
    if tile[RS] >= 0:
        n = tile[NC]
        for bi in range(tile[NB]):
            cfac = col_factor[col_off[t] + col_start(tile, cols[t], bi):][:n]
            for i in range(tile[NR]):
                row, s, q = run(tile, rows[t], cols[t], bi, i)
                rf, g, uq = row_factor[row_off[t] + row], grad[p_off[t] + s:][:n], u[q * n:][:n]
                for j in range(n):
                    uq[j] = rf * cfac[j] * g[j]
    else:
        count, n = spans(tile, cols[t])
        for x in range(count):
            s, e = span(tile, rows[t], cols[t], x)
            g, v, ux = grad[p_off[t] + s:][:n], exp_avg_sq[v_off[t] + s:][:n], u[e:e + n]
            for j in range(n):
                ux[j] = g[j] / np.sqrt(v[j])


@kernel
def _adafactor_norms(tiles, rows, cols, coef, param, grad, exp_avg_sq, p_off, v_off,
                     norms, row_part, col_part):
    """First Adafactor pass, float64 sums per tile: norms[k, 0] = Σ θ² (for RMS(θ_{t−1})).
    Factored: row/column partial sums of g² + ε1. Unfactored: v ← β̂2t·v + (1−β̂2t)(g² + ε1)
    and norms[k, 1] = Σ U² with U = g/√v."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        eps1, b2t, c2t = cf[F_EPS1], cf[F_B2T], cf[F_C2T]
        count, n = spans(tile, cols[t])
        scratch = np.empty(count * n, np.float32)  # g² + ε1 (factored) or U (unfactored)
        psq = usq = 0.0
        for x in range(count):
            s, _ = span(tile, rows[t], cols[t], x)
            psq += reduce_sum_sq(param[p_off[t] + s:][:n])
            if tile[RS] < 0:
                g, v = grad[p_off[t] + s:][:n], exp_avg_sq[v_off[t] + s:][:n]
                for j in range(n):
                    vj = v[j] * b2t + c2t * (g[j] * g[j] + eps1)
                    v[j] = vj
                    scratch[j] = g[j] / np.sqrt(vj)
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
                        g2[j] = g[j] * g[j] + eps1
                        col[j] += g2[j]
                    row_part[tile[RS] + q] = reduce_sum(g2)
        norms[k, 0], norms[k, 1] = psq, usq


@kernel
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
            mean = np.float32(reduce_sum(rsb) / nr)
            for r in range(nr):
                rfb[r] = np.float32(1.0) / np.sqrt(rsb[r] / mean)


@kernel
def _adafactor_update_sq(tiles, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off, col_off,
                         row_factor, col_factor, update_sq):
    """Factored tensors: update_sq[k] = Σ U² over the tile, U = (row_factor·col_factor)·g."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        u = np.empty(tile[NB] * tile[NR] * tile[NC], np.float32)
        _unclipped_update(tile, t, rows, cols, grad, exp_avg_sq, p_off, v_off, row_off,
                          col_off, row_factor, col_factor, u)
        update_sq[k] = reduce_sum_sq(u)


@kernel
def _adafactor_apply(tiles, rows, cols, coef, param, grad, exp_avg, exp_avg_sq, p_off, m_off,
                     v_off, row_off, col_off, row_factor, col_factor, sums):
    """Last Adafactor pass: u = U/clip·α (U recomputed as in the earlier passes);
    with β1: m ← β1·m + (1−β1)·u, u = m;   θ ← θ − (λ·α)·θ;   θ ← θ − u.
    One short loop per step of that chain over the tile's scratch, so that every loop
    vectorises whichever options the tensor has. sums[k] = the tile's step sums (sums
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
        count, n = spans(tile, cols[t])
        if sums is not None:
            sums[k, :] = 0.0
        for x in range(count):
            s, e = span(tile, rows[t], cols[t], x)
            p, g, ux = param[p_off[t] + s:][:n], grad[p_off[t] + s:][:n], u[e:e + n]
            if cf[F_B1_ON] != 0:
                m = exp_avg[m_off[t] + s:][:n]
                for j in range(n):
                    m[j] = m[j] * b1 + c1 * ux[j]
                    ux[j] = m[j]
            for j in range(n):   # ux[j] becomes the old θ, for the step sums
                pj = p[j]
                p[j] = (pj - wda * pj if decay else pj) - ux[j]
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
    m, m_off = field(layout, state, "exp_avg")
    v, v_off = field(layout, state, "exp_avg_sq")
    row_state, row_off = field(layout, state, "exp_avg_sq_row")
    col_state, col_off = field(layout, state, "exp_avg_sq_col")

    coef = np.zeros((n_t, F_COLUMNS), np.float64)
    b2t = beta2t(h, steps)
    coef[:, F_EPS1], coef[:, F_B2T], coef[:, F_C2T] = h.eps, b2t, 1.0 - b2t

    # Pass 1: Σθ², row/col sums of g² + ε1, and the whole unfactored update.
    # Partial-sum slots of tiles that are not run stay unset; nothing reads their rows.
    norms = np.empty((len(tiles), 2), np.float64)
    row_part = np.empty(plan.row_index.size, np.float64)
    col_part = np.empty(plan.col_index.size, np.float64)
    _adafactor_norms(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, v,
                     p_off, v_off, norms, row_part, col_part)
    param_sq = np.bincount(tiles[:, TENSOR], norms[:, 0], n_t)
    update_sq = np.bincount(tiles[:, TENSOR], norms[:, 1], n_t)

    # α_t = max(ε2, RMS(θ_{t−1}))·ρ_t (step_size).
    scale = np.where(h.scale_parameter, np.maximum(h.eps2, np.sqrt(param_sq / layout.sizes)), 1.0)
    alpha = scale * rho(h, steps)

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
        row_factor = col_factor = EMPTY_F32

    # Pass 3: clip, scale, momentum, decay, subtract.
    clip = np.maximum(1.0, np.sqrt(update_sq / layout.sizes) / h.clip_threshold)
    beta1 = h.adafactor_beta1
    coef[:, F_CLIP], coef[:, F_ALPHA] = clip, alpha
    coef[:, F_B1_ON] = ~np.isnan(beta1)
    coef[:, F_B1], coef[:, F_C1] = np.nan_to_num(beta1), 1.0 - np.nan_to_num(beta1)
    coef[:, F_WD_ON], coef[:, F_WDA] = h.weight_decay != 0, h.weight_decay * alpha
    sums = tile_sums(tiles, call.sums)
    _adafactor_apply(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, grad, m, v,
                     p_off, m_off, v_off, row_off, col_off, row_factor, col_factor, sums)
    if sums is not None:
        call.result.sums.add_tiles(tiles[:, TENSOR], sums)
    call.result.reports[Report.CLIP] = np.where(active, clip, 1.0)


# ---------------------------------------------------------------------------------------
# CUDA (kernels/csrc/adafactor.cu): sums, combine, row factors, Σ U², decide, apply
# ---------------------------------------------------------------------------------------

def _cuda(call: StepCall, cs) -> None:
    h, plan, layout, active = call.hyper, cs.plan, call.layout, call.active
    b1_on = ~np.isnan(h.adafactor_beta1)
    has_m = layout.fields.get("exp_avg", np.full(layout.num_tensors, -1)) >= 0
    if (b1_on & active & ~has_m).any():
        raise ValueError("adafactor beta1 is set for a tensor without an exp_avg buffer")
    cf = cs.table("AdafactorCoef")
    cf.active = active
    b2t = beta2t(h, call.steps)
    cf.eps1, cf.b2t, cf.c2t = h.eps, b2t, 1.0 - b2t
    cf.rho, cf.scale_on, cf.eps2 = rho(h, call.steps), h.scale_parameter, h.eps2
    cf.clip_threshold = h.clip_threshold
    cf.b1_on = b1_on & has_m
    cf.b1, cf.c1 = np.nan_to_num(h.adafactor_beta1), 1.0 - np.nan_to_num(h.adafactor_beta1)
    cf.wd, cf.wd_on = h.weight_decay, h.weight_decay != 0
    coef = cs.upload(cf)
    v, m = cs.field("exp_avg_sq"), cs.field("exp_avg")
    rows, cols = cs.field("exp_avg_sq_row"), cs.field("exp_avg_sq_col")
    n_rows, n_cols = plan.row_owner.size, plan.col_owner.size
    row_part = cs.scratch("row_part", plan.n_row_slots, np.float64)
    col_part = cs.scratch("col_part", plan.n_col_slots, np.float64)
    row_factor = cs.scratch("row_factor", n_rows, np.float32)
    col_factor = cs.scratch("col_factor", n_cols, np.float32)
    norms = cs.scratch("norms", cs.n_tiles * 2, np.float64)
    scale = cs.scratch("scale", cs.n_tensors * 3, np.float64)
    cs.launch("adafactor_sums", cs.n_tiles, cs.tiles, cs.tinfo, coef, cs.param, cs.grad,
              cs.gkind, v, row_part, col_part, norms)
    cs.launch("adafactor_combine", -(-(n_rows + n_cols) // cs.block), cs.tinfo, coef,
              cs.dev["row_owner"], n_rows, cs.dev["col_owner"], n_cols, row_part, col_part,
              rows, cols, col_factor)
    cs.launch("adafactor_row_factors", -(-len(plan.batches) // cs.warps), cs.dev["batches"],
              len(plan.batches), cs.tinfo, coef, rows, row_factor)
    cs.launch("adafactor_update_sq", cs.n_tiles, cs.tiles, cs.tinfo, coef, cs.grad, cs.gkind,
              row_factor, col_factor, norms)
    cs.launch("adafactor_decide", cs.n_tensors, cs.tinfo, coef, norms, scale)
    cs.launch("adafactor_apply", cs.n_tiles, cs.tiles, cs.tinfo, coef, scale, cs.param,
              cs.grad, cs.gkind, m, v, row_factor, col_factor, cs.tile_sums, cs.with_sums)
    clip = cs.download(scale, "AdafactorScale")["clip"]
    call.result.reports[Report.CLIP] = np.where(active, clip, 1.0)


ADAFACTOR = Kernel(
    "adafactor", View.FACTORED, (Report.CLIP,), reference=_reference, cpu=_cpu,
    cuda=CudaKernels("adafactor.cu", ("adafactor_sums", "adafactor_combine",
                                      "adafactor_row_factors", "adafactor_update_sq",
                                      "adafactor_decide", "adafactor_apply"), _cuda))
