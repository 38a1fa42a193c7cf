"""Lion: the NumPy reference, the numba CPU kernel and the CUDA driver.

    c = β1·m + (1−β1)·g;   θ ← θ·decay − lr·sign(c);   m ← β2·m + (1−β2)·g

with g negated under `maximize`, sign(0) = 0 (and a NaN's sign 0, as torch.sgn), and decay
the decoupled factor of the job's weight_decay_mode (kernels/hyper.py). The interpolation
c steers the update only; the stored momentum uses β2. Every coordinate moves by lr or not
at all, so ‖Δθ‖ = lr·√(nonzeros) before decay.

References: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023,
Alg. 2; lion-pytorch 0.2 (the oracle).
"""
from __future__ import annotations

import numpy as np
from numba import prange

from optserve.kernels import cpu_tiles
from optserve.kernels.backend import CudaKernels, Kernel, StepCall, View
from optserve.kernels.cpu_tiles import TENSOR
from optserve.kernels.hyper import DecayMode, Hyper, decay_factor
from optserve.kernels.numba_ops import (F32, add_step_sums, field, inline, kernel,
                                        reduce_step_terms, span, spans, tile_sums)

# ---------------------------------------------------------------------------------------
# The NumPy reference, one tensor at a time
# ---------------------------------------------------------------------------------------


def lion(param, grad, state, *, lr, beta1, beta2, weight_decay,
         weight_decay_mode=DecayMode.LR, initial_lr=None, maximize=False):
    """One Lion step of one tensor, in place."""
    g = -grad if maximize else grad
    m = state["exp_avg"]
    c = F32(beta1) * m + F32(1.0 - beta1) * g
    if weight_decay != 0:
        param *= F32(decay_factor(weight_decay_mode, lr, weight_decay, initial_lr or lr))
    param -= F32(lr) * np.where(c > 0, F32(1), np.where(c < 0, F32(-1), F32(0)))
    m *= F32(beta2)
    m += F32(1.0 - beta2) * g


def _reference(param, grad, state, step, h: Hyper) -> dict:
    lion(param, grad, state, lr=h.lr, beta1=h.beta1, beta2=h.beta2,
         weight_decay=h.weight_decay, weight_decay_mode=DecayMode(h.weight_decay_mode),
         initial_lr=h.initial_lr, maximize=h.maximize)
    return {}


# ---------------------------------------------------------------------------------------
# CPU (numba): one fused pass over the flat view
# ---------------------------------------------------------------------------------------

L_SIGN, L_DECAY, L_LR, L_B1, L_C1, L_B2, L_C2 = range(7)
L_COLUMNS = 7


@inline
def _lion_span(p, g, m, cf, sums, k):
    """The Lion update of one span with coefficient row cf (L_ columns); adds the span's
    step sums to sums[k] (if sums is not None)."""
    sign, decay, lr = cf[L_SIGN], cf[L_DECAY], cf[L_LR]
    b1, c1, b2, c2 = cf[L_B1], cf[L_C1], cf[L_B2], cf[L_C2]
    w2 = wdw = dw2 = g2 = 0.0
    for j in range(p.shape[0]):
        pj, mj = p[j], m[j]
        gj = sign * g[j]
        c = b1 * mj + c1 * gj
        u = np.float32(1.0) if c > 0 else (np.float32(-1.0) if c < 0 else np.float32(0.0))
        new = pj * decay - lr * u
        p[j] = new
        m[j] = b2 * mj + c2 * gj
        if sums is not None:
            w2, wdw, dw2, g2 = reduce_step_terms(w2, wdw, dw2, g2, pj, new, g[j])
    if sums is not None:
        add_step_sums(sums[k], (w2, wdw, dw2, g2))


@kernel
def _lion_kernel(tiles, rows, cols, coef, param, grad, exp_avg, p_off, m_off, sums):
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        count, n = spans(tile, cols[t])
        if sums is not None:
            sums[k, :] = 0.0
        for x in range(count):
            s, _ = span(tile, rows[t], cols[t], x)
            po, mo = p_off[t] + s, m_off[t] + s
            _lion_span(param[po:po + n], grad[po:po + n], exp_avg[mo:mo + n], coef[t], sums, k)


def _cpu(call: StepCall) -> None:
    h, layout, state = call.hyper, call.layout, call.state
    coef = np.zeros((layout.num_tensors, L_COLUMNS), np.float64)
    coef[:, L_SIGN] = np.where(h.maximize, -1.0, 1.0)
    coef[:, L_DECAY] = h.decay_factors(call.active)
    coef[:, L_LR] = h.lr
    coef[:, L_B1], coef[:, L_C1] = h.beta1, 1.0 - h.beta1
    coef[:, L_B2], coef[:, L_C2] = h.beta2, 1.0 - h.beta2
    plan = cpu_tiles.plan(layout, View.FLAT)
    m, m_off = field(layout, state, "exp_avg")
    tiles = plan.select(call.active)
    sums = tile_sums(tiles, call.sums)
    _lion_kernel(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, call.grad, m,
                 layout.offsets, m_off, sums)
    if sums is not None:
        call.result.sums.add_tiles(tiles[:, TENSOR], sums)


# ---------------------------------------------------------------------------------------
# CUDA (kernels/csrc/lion.cu): one launch of lion_apply
# ---------------------------------------------------------------------------------------

def _cuda(call: StepCall, cs) -> None:
    h = call.hyper
    cf = cs.table("LionCoef")
    cf.active = call.active
    cf.sign = np.where(h.maximize, -1.0, 1.0)
    cf.decay, cf.lr = h.decay_factors(call.active), h.lr
    cf.b1, cf.c1, cf.b2, cf.c2 = h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2
    cs.launch("lion_apply", cs.n_tiles, cs.tiles, cs.tinfo, cs.upload(cf), cs.param, cs.grad,
              cs.gkind, cs.field("exp_avg"), cs.tile_sums, cs.with_sums)


LION = Kernel("lion", View.FLAT, (), reference=_reference, cpu=_cpu,
              cuda=CudaKernels("lion.cu", ("lion_apply",), _cuda))   # oracle: lion_pytorch.Lion
