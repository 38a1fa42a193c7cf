"""AdamP: the NumPy reference, the numba CPU kernels and the CUDA driver.

The Adam direction u = m/(√v/√bc2 + ε) (or its Nesterov form) with its radial component
removed when θ looks scale-invariant:

    for the channel view (rows = shape[0]), then the layer view (one row), if every row
    has |cos(g, θ)| < δ/√(row length):  u ← u − θ̂·Σ_row(θ̂ ⊙ u),  θ̂ = θ/(‖θ‖_row + ε)
    θ ← θ(1 − lr·λ·r) − (lr/bc1)·u,  r = wd_ratio if projected, else 1

Only tensors with ndim > 1 are candidates; the cosine is F.cosine_similarity's,
|x·y| / (max(‖x‖, ε)·max(‖y‖, ε)), over the raw gradient.

References: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021; clovaai/AdamP 0.3.0 (the normative code, the oracle).
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from optserve.kernels import adam, cpu_tiles
from optserve.kernels.adam import (A_B1, A_B2, A_C1, A_C2, A_DECAY, A_EPS, A_NESTEROV, A_SBC2,
                                   A_STEP, cpu_direction, cpu_moments)
from optserve.kernels.backend import CudaKernels, Kernel, Report, StepCall, View
from optserve.kernels.cpu_tiles import NC, NB, NR, RS, TENSOR
from optserve.kernels.cuda_runtime import constant
from optserve.kernels.hyper import Hyper
from optserve.kernels.numba_ops import (F32, add_step_sums, field, kernel, reduce_,
                                        reduce_step_terms, reduce_sum, run, span, spans,
                                        tile_sums)

# ---------------------------------------------------------------------------------------
# The NumPy reference, one tensor at a time
# ---------------------------------------------------------------------------------------


def _rows(x: np.ndarray, view: str) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def _cosine_rows(x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """|x·y| / (max(‖x‖, ε)·max(‖y‖, ε)) per row, as F.cosine_similarity (computed in float64)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    nx = np.maximum(np.sqrt((x64 * x64).sum(axis=1)), eps)
    ny = np.maximum(np.sqrt((y64 * y64).sum(axis=1)), eps)
    return np.abs((x64 * y64).sum(axis=1)) / (nx * ny)


def projection(param, grad, update, *, delta, wd_ratio, eps):
    """Removes the radial part of `update` when θ looks scale-invariant; returns (update,
    weight-decay ratio, projected?)."""
    for view in ("channel", "layer"):
        g_rows, p_rows = _rows(grad, view), _rows(param, view)
        if _cosine_rows(g_rows, p_rows, eps).max() < delta / math.sqrt(p_rows.shape[1]):
            norms = np.sqrt((p_rows * p_rows).sum(axis=1, dtype=np.float32)) + F32(eps)
            p_hat = p_rows / norms[:, None]
            u_rows = _rows(update, view)
            radial = (p_hat * u_rows).sum(axis=1, dtype=np.float32)
            return (u_rows - p_hat * radial[:, None]).reshape(param.shape), wd_ratio, True
    return update, 1.0, False


def adamp(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay,
          delta=0.1, wd_ratio=0.1, nesterov=False):
    """One AdamP step of one tensor, in place; returns True when it was projected."""
    m, v = adam.moments(grad, state, beta1, beta2)
    denom = adam.denominator(v, step, beta2, eps)
    if nesterov:
        update = (F32(beta1) * m + F32(1.0 - beta1) * grad) / denom
    else:
        update = m / denom
    ratio, projected = 1.0, False
    if param.ndim > 1:
        update, ratio, projected = projection(param, grad, update, delta=delta,
                                              wd_ratio=wd_ratio, eps=eps)
    if weight_decay > 0:
        param *= F32(1.0 - lr * weight_decay * ratio)
    param -= F32(lr / (1.0 - beta1**step)) * update
    return projected


def _reference(param, grad, state, step, h: Hyper) -> dict:
    projected = adamp(param, grad, state, step=step, lr=h.lr, beta1=h.beta1, beta2=h.beta2,
                      eps=h.eps, weight_decay=h.weight_decay, delta=h.delta,
                      wd_ratio=h.wd_ratio, nesterov=h.nesterov)
    return {Report.PROJECTED: projected}


# ---------------------------------------------------------------------------------------
# CPU (numba), in the channel view: cosine sums per row; the decision per tensor (host);
# moments for every tensor, the step of unprojected ones and the radial sums of projected
# ones; then the step of projected ones
# ---------------------------------------------------------------------------------------

# Projection modes, as kernels/csrc/adamp.cu numbers them (its decisions come back in them).
NOT_PROJECTED, CHANNEL, LAYER = (constant(k) for k in ("NOT_PROJECTED", "CHANNEL", "LAYER"))


@reduce_
def _cosine_sums(g, p):
    """(Σ g·θ, Σ g², Σ θ²) in float64."""
    dot = gg = pp = 0.0
    for j in range(g.shape[0]):
        gj, pj = np.float64(g[j]), np.float64(p[j])
        dot += gj * pj
        gg += gj * gj
        pp += pj * pj
    return dot, gg, pp


@kernel
def _adamp_cosine_sums(tiles, rows, cols, param, grad, p_off, out):
    """Per channel row: out[slot] = (Σ g·θ, Σ g², Σ θ²) over the raw gradient."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        n = tile[NC]
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                _, s, q = run(tile, rows[t], cols[t], bi, i)
                po, slot = p_off[t] + s, tile[RS] + q
                out[slot, 0], out[slot, 1], out[slot, 2] = _cosine_sums(grad[po:po + n],
                                                                        param[po:po + n])


@kernel
def _adamp_moments(tiles, rows, cols, coef, mode, row_base, pnorm, param, grad, exp_avg,
                   exp_avg_sq, p_off, m_off, v_off, radial, sums):
    """Moments for every AdamP tensor. Unprojected tensors finish here (adam.adam_span,
    their tiles' step sums into sums[k] unless sums is None); projected ones only put
    Σ θ̂·u per row into `radial`, with θ̂ = θ/pnorm[row] (pnorm = ‖θ‖ + ε of the channel
    row or of the whole tensor)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        if sums is not None:
            sums[k, :] = 0.0
        if mode[t] == NOT_PROJECTED:
            count, n = spans(tile, cols[t])
            for x in range(count):
                s, _ = span(tile, rows[t], cols[t], x)
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                adam.adam_span(param[po:po + n], grad[po:po + n], exp_avg[mo:mo + n],
                               exp_avg_sq[vo:vo + n], None, cf, sums, k)
            continue
        c1, b2, c2, b1 = cf[A_C1], cf[A_B2], cf[A_C2], cf[A_B1]
        sbc2, eps, nesterov = cf[A_SBC2], cf[A_EPS], cf[A_NESTEROV] != 0
        n = tile[NC]
        terms = np.empty(n, np.float32)  # θ̂·u of one run, to be summed
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                row, s, q = run(tile, rows[t], cols[t], bi, i)
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                p, g = param[po:po + n], grad[po:po + n]
                m, v = exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n]
                norm = pnorm[row_base[t] + row]
                for j in range(n):
                    m[j], v[j] = cpu_moments(g[j], m[j], v[j], c1, b2, c2)
                    u = cpu_direction(g[j], m[j], v[j], sbc2, eps, nesterov, b1, c1)
                    terms[j] = (p[j] / norm) * u
                radial[tile[RS] + q] = reduce_sum(terms)


@kernel
def _adamp_projected_step(tiles, rows, cols, coef, row_base, pnorm, radial, param, grad,
                          exp_avg, exp_avg_sq, p_off, m_off, v_off, sums):
    """Projected tensors, moments already taken: u ← u − θ̂·radial[row];
    θ ← θ·decay − (lr/bc1)·u. sums[k] = the tile's step sums (sums None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        cf = coef[t]
        decay, step, c1, b1 = cf[A_DECAY], cf[A_STEP], cf[A_C1], cf[A_B1]
        sbc2, eps, nesterov = cf[A_SBC2], cf[A_EPS], cf[A_NESTEROV] != 0
        n = tile[NC]
        if sums is not None:
            sums[k, :] = 0.0
        for bi in range(tile[NB]):
            for i in range(tile[NR]):
                row, s, _ = run(tile, rows[t], cols[t], bi, i)
                norm, rad = pnorm[row_base[t] + row], radial[row_base[t] + row]
                po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
                p, g = param[po:po + n], grad[po:po + n]
                m, v = exp_avg[mo:mo + n], exp_avg_sq[vo:vo + n]
                w2 = wdw = dw2 = g2 = 0.0
                for j in range(n):
                    pj = p[j]
                    u = cpu_direction(g[j], m[j], v[j], sbc2, eps, nesterov, b1, c1)
                    u = u - (pj / norm) * rad
                    new = pj * decay - step * u
                    p[j] = new
                    if sums is not None:
                        w2, wdw, dw2, g2 = reduce_step_terms(w2, wdw, dw2, g2, pj, new, g[j])
                if sums is not None:
                    add_step_sums(sums[k], (w2, wdw, dw2, g2))


def _modes(layout, plan, active, sums, h: Hyper):
    """Which view (if any) projects each tensor, and ‖θ‖ + ε per channel row for it.

    Channel view: every row needs |cos(g, θ)| < δ/√(row length). Else the layer view, whose
    sums are the sums over the tensor's channel rows, needs |cos| < δ/√numel."""
    r = plan.rows
    first = cpu_tiles.starts(r)
    eps = h.eps
    eps_row = np.repeat(eps, r)

    def cosine(dot, gg, pp, e):  # |x·y| / (max(‖x‖, ε)·max(‖y‖, ε)), F.cosine_similarity
        return np.abs(dot) / (np.maximum(np.sqrt(gg), e) * np.maximum(np.sqrt(pp), e))

    dot, gg, pp = (plan.row_sums(sums[:, i]) for i in range(3))
    channel = np.maximum.reduceat(cosine(dot, gg, pp, eps_row), first) < h.delta / np.sqrt(plan.cols)
    tdot, tgg, tpp = (np.add.reduceat(x, first) for x in (dot, gg, pp))
    layer = cosine(tdot, tgg, tpp, eps) < h.delta / np.sqrt(layout.sizes)
    candidate = active & (plan.ndim > 1)
    mode = np.where(candidate & channel, CHANNEL,
                    np.where(candidate & layer, LAYER, NOT_PROJECTED)).astype(np.int64)
    # θ̂ = θ/(‖θ‖ + ε), the norm from a float32 sum of squares as in the reference.
    chan_norm = np.sqrt(pp.astype(F32)) + eps_row.astype(F32)
    layer_norm = np.repeat(np.sqrt(tpp.astype(F32)) + eps.astype(F32), r)
    pnorm = np.where(np.repeat(mode, r) == LAYER, layer_norm, chan_norm)
    return mode, pnorm


def _cpu(call: StepCall) -> None:
    h, layout, state, grad, active = call.hyper, call.layout, call.state, call.grad, call.active
    plan = cpu_tiles.plan(layout, View.CHANNEL)
    coef = adam.cpu_coefficients(h, call.steps)
    coef[:, A_NESTEROV] = h.nesterov
    p_off = layout.offsets
    m, m_off = field(layout, state, "exp_avg")
    v, v_off = field(layout, state, "exp_avg_sq")
    row_base = cpu_tiles.starts(plan.rows)

    # Partial-sum slots of tiles that are not run stay unset; nothing reads their rows.
    cosine = np.empty((plan.row_index.size, 3), np.float64)
    _adamp_cosine_sums(plan.select(active & (plan.ndim > 1)), plan.rows, plan.cols, state.param,
                       grad, p_off, cosine)
    mode, pnorm = _modes(layout, plan, active, cosine, h)

    ratio = np.where(mode != NOT_PROJECTED, h.wd_ratio, 1.0)
    coef[:, A_DECAY] = np.where(h.weight_decay > 0, 1.0 - h.lr * h.weight_decay * ratio, 1.0)
    coef = coef.astype(F32)

    partial = np.empty(plan.row_index.size, np.float64)
    tiles = plan.select(active)
    sums = tile_sums(tiles, call.sums)  # zeros for projected tiles
    _adamp_moments(tiles, plan.rows, plan.cols, coef, mode, row_base, pnorm,
                   state.param, grad, m, v, p_off, m_off, v_off, partial, sums)
    if sums is not None:
        call.result.sums.add_tiles(tiles[:, TENSOR], sums)
    projected = mode != NOT_PROJECTED
    if projected.any():
        radial = plan.row_sums(partial)
        layer_total = np.repeat(np.add.reduceat(radial, row_base), plan.rows)
        radial = np.where(np.repeat(mode, plan.rows) == LAYER, layer_total, radial).astype(F32)
        tiles = plan.select(projected)
        sums = tile_sums(tiles, call.sums)
        _adamp_projected_step(tiles, plan.rows, plan.cols, coef, row_base, pnorm, radial,
                              state.param, grad, m, v, p_off, m_off, v_off, sums)
        if sums is not None:
            call.result.sums.add_tiles(tiles[:, TENSOR], sums)
    call.result.reports[Report.PROJECTED] = projected


# ---------------------------------------------------------------------------------------
# CUDA (kernels/csrc/adamp.cu): sums, decide, apply
# ---------------------------------------------------------------------------------------

def _cuda(call: StepCall, cs) -> None:
    h, plan = call.hyper, cs.plan
    cf = cs.table("AdampCoef")
    cf.active = call.active
    cf.candidate = [len(s) > 1 for s in call.layout.shapes]
    cf.b1, cf.c1, cf.b2, cf.c2 = h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2
    cf.sbc2, cf.step = adam.bias_corrections(h, call.steps)
    cf.eps, cf.nesterov, cf.delta = h.eps, h.nesterov, h.delta
    cf.lr, cf.wd, cf.wd_ratio = h.lr, h.weight_decay, h.wd_ratio
    coef = cs.upload(cf)
    m, v = cs.field("exp_avg"), cs.field("exp_avg_sq")
    row_part = cs.scratch("row_part", plan.n_row_slots * 4, np.float64)
    row_scr = cs.scratch("row_scr", plan.n_rows * 2, np.float64)
    pnorm = cs.scratch("pnorm", plan.n_rows, np.float32)
    radial = cs.scratch("radial", plan.n_rows, np.float32)
    decision = cs.scratch("decision", cs.n_tensors * 2, np.float64)
    cs.launch("adamp_sums", cs.n_tiles, cs.tiles, cs.tinfo, coef, cs.param, cs.grad, cs.gkind,
              m, v, row_part)
    cs.launch("adamp_decide", cs.n_tensors, cs.tinfo, coef, row_part, row_scr, pnorm, radial,
              decision)
    cs.launch("adamp_apply", cs.n_tiles, cs.tiles, cs.tinfo, coef, decision, pnorm, radial,
              cs.param, cs.grad, cs.gkind, m, v, cs.tile_sums, cs.with_sums)
    mode = cs.download(decision, "AdampDecision")["mode"]
    call.result.reports[Report.PROJECTED] = call.active & (mode != NOT_PROJECTED)


ADAMP = Kernel("adamp", View.CHANNEL, (Report.PROJECTED,), reference=_reference, cpu=_cpu,
               cuda=CudaKernels("adamp.cu", ("adamp_sums", "adamp_decide", "adamp_apply"), _cuda))
