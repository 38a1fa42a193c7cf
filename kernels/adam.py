"""AdamW and Adam: the NumPy reference, the numba CPU kernel and the CUDA driver.

    AdamW:  θ ← θ·decay;        m, v ← moments(g);  θ ← θ − (lr/bc1)·m/(√v̄/√bc2 + ε)
    Adam:   g ← g + λθ (L2);    m, v ← moments(g);  θ ← θ − (lr/bc1)·m/(√v̄/√bc2 + ε)

with moments m ← m + (1−β1)(g − m), v ← β2·v + (1−β2)·g², bc_i = 1 − β_i^t, g negated
under `maximize`, and decay the decoupled factor of the job's weight_decay_mode
(kernels/hyper.py). ε is added after the bias-corrected square root, as torch does; under
eps_mode="keras" it is Keras's ε̂, added to the raw √v̄, with the bias correction folded into
the step size instead:  θ ← θ − α_t·m/(√v̄ + ε̂),  α_t = lr·√bc2/bc1. The two agree only
when ε̂ = ε·√bc2, so with one number for both torch takes the larger early steps.
v̄ = v, or under `amsgrad` the running maximum of the raw v, kept as max_exp_avg_sq
(v̂max ← max(v̂max, v), bias-corrected after the max, as torch and Keras).

References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
Alg. 2; Kingma & Ba, "Adam", ICLR 2015, Alg. 1 (and, for ε̂, the formula just before
Sec. 2.1); Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018
(AMSGrad); torch.optim.AdamW / Adam and keras.optimizers.AdamW / Adam (the oracles).
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import prange

from optserve.kernels import cpu_tiles
from optserve.kernels.backend import CudaKernels, Kernel, StepCall, View
from optserve.kernels.cpu_tiles import TENSOR
from optserve.kernels.hyper import DecayMode, EpsMode, Hyper, decay_factor
from optserve.kernels.numba_ops import (F32, add_step_sums, field, inline, kernel,
                                        reduce_step_terms, span, spans, tile_sums)

# ---------------------------------------------------------------------------------------
# The NumPy reference, one tensor at a time (float32 data, float64 scalars)
# ---------------------------------------------------------------------------------------


def moments(grad, state, beta1, beta2):
    """m ← lerp(m, g, 1−β1);  v ← β2·v + (1−β2)·g²."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += F32(1.0 - beta1) * (grad - m)
    v *= F32(beta2)
    v += F32(1.0 - beta2) * (grad * grad)
    return m, v


def amsgrad_max(v, state, amsgrad):
    """v̄: v, or with amsgrad max_exp_avg_sq ← max(max_exp_avg_sq, v) (over the raw v)."""
    if not amsgrad:
        return v
    return np.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])


def denominator(v, step, beta2, eps):
    """√v/√bc2 + ε (ε after the bias-corrected square root, as torch)."""
    return np.sqrt(v) / F32(math.sqrt(1.0 - beta2**step)) + F32(eps)


def update(m, v, step, lr, beta1, beta2, eps, eps_mode):
    """What the step takes from θ: torch's (lr/bc1)·m/(√v/√bc2 + ε), or Keras's
    α_t·m/(√v + ε̂) with α_t = lr·√bc2/bc1 (keras.optimizers.Adam)."""
    if eps_mode == EpsMode.KERAS:
        alpha = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return F32(alpha) * (m / (np.sqrt(v) + F32(eps)))
    return F32(lr / (1.0 - beta1**step)) * (m / denominator(v, step, beta2, eps))


def adamw(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay,
          weight_decay_mode=DecayMode.LR, initial_lr=None, maximize=False, amsgrad=False,
          eps_mode=EpsMode.TORCH):
    """AdamW, decoupled decay applied to θ_{t−1} before the Adam step (torch.optim.AdamW;
    keras.optimizers.AdamW under EpsMode.KERAS, which decays by lr·λ first too)."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        param *= F32(decay_factor(weight_decay_mode, lr, weight_decay, initial_lr or lr))
    m, v = moments(g, state, beta1, beta2)
    v = amsgrad_max(v, state, amsgrad)
    param -= update(m, v, step, lr, beta1, beta2, eps, eps_mode)


def adam(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay, maximize=False,
         amsgrad=False, eps_mode=EpsMode.TORCH):
    """Adam with classic coupled L2: g ← g + λθ_{t−1}, then the Adam step (torch.optim.Adam)."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + F32(weight_decay) * param
    m, v = moments(g, state, beta1, beta2)
    v = amsgrad_max(v, state, amsgrad)
    param -= update(m, v, step, lr, beta1, beta2, eps, eps_mode)


def _reference(param, grad, state, step, h: Hyper, *, coupled: bool) -> dict:
    if coupled:
        adam(param, grad, state, step=step, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
             weight_decay=h.weight_decay, maximize=h.maximize, amsgrad=h.amsgrad,
             eps_mode=EpsMode(h.eps_mode))
    else:
        adamw(param, grad, state, step=step, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
              weight_decay=h.weight_decay, weight_decay_mode=DecayMode(h.weight_decay_mode),
              initial_lr=h.initial_lr, maximize=h.maximize, amsgrad=h.amsgrad,
              eps_mode=EpsMode(h.eps_mode))
    return {}


# ---------------------------------------------------------------------------------------
# CPU (numba): one fused pass over the flat view
# ---------------------------------------------------------------------------------------

# Per-tensor float32 coefficients of the Adam-family kernels (AdamP's too), one column each.
(A_SIGN, A_L2_ON, A_L2, A_DECAY, A_B1, A_C1, A_B2, A_C2, A_SBC2, A_EPS, A_STEP,
 A_NESTEROV, A_AMSGRAD) = range(13)
A_COLUMNS = 13


def bias_corrections(h: Hyper, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, c) per tensor, in float64, for the update c·m/(√v/s + ε): torch's s = √bc2 and
    c = lr/bc1, or under EpsMode.KERAS s = 1 (√v/1 is exact) and c = α_t = lr·√bc2/bc1, so
    that one kernel runs both placements of ε."""
    sbc2, bc1 = np.sqrt(1.0 - h.beta2 ** steps), 1.0 - h.beta1 ** steps
    keras = h.eps_mode == EpsMode.KERAS
    return np.where(keras, 1.0, sbc2), np.where(keras, h.lr * sbc2 / bc1, h.lr / bc1)


def cpu_coefficients(h: Hyper, steps: np.ndarray) -> np.ndarray:
    """The columns the Adam family shares (β's, bias_corrections), in float64; no sign flip,
    no L2, no decay."""
    coef = np.zeros((len(steps), A_COLUMNS), np.float64)
    coef[:, A_SIGN] = coef[:, A_DECAY] = 1.0
    coef[:, A_B1], coef[:, A_C1] = h.beta1, 1.0 - h.beta1
    coef[:, A_B2], coef[:, A_C2] = h.beta2, 1.0 - h.beta2
    coef[:, A_SBC2], coef[:, A_STEP] = bias_corrections(h, steps)
    coef[:, A_EPS] = h.eps
    return coef


@inline
def cpu_moments(g, m, v, c1, b2, c2):
    """m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²   (float32, the reference's rounding)."""
    m = m + c1 * (g - m)
    v = v * b2
    v = v + c2 * (g * g)
    return m, v


@inline
def cpu_direction(g, m, v, sbc2, eps, nesterov, b1, c1):
    """u = m/(√v/√bc2 + ε), or (β1·m + (1−β1)·g)/(√v/√bc2 + ε) with Nesterov (AdamP); sbc2
    is 1 under Keras's ε̂ (bias_corrections)."""
    d = np.sqrt(v) / sbc2 + eps
    if nesterov:
        return (b1 * m + c1 * g) / d
    return m / d


@inline
def adam_span(p, g, m, v, vmax, cf, sums, k):
    """The Adam update of one span, with the coefficient row cf (A_ columns):
        g ← ±g (+ λθ for coupled L2);  m, v ← moments(g);  θ ← θ·decay − c·m/(√v̄/s + ε)
    with (s, c) from bias_corrections (torch's ε or Keras's ε̂), and v̄ = v, or under AMSGrad
    (vmax not None: the span's max_exp_avg_sq) vmax ← max(vmax, v). Adds the span's step
    sums to sums[k] (if sums is not None).
    numba compiles the two versions apart, so the plain loop has no AMSGrad branch."""
    sign, l2_on, l2, decay = cf[A_SIGN], cf[A_L2_ON] != 0, cf[A_L2], cf[A_DECAY]
    b1, c1, b2, c2 = cf[A_B1], cf[A_C1], cf[A_B2], cf[A_C2]
    sbc2, eps, step, nesterov = cf[A_SBC2], cf[A_EPS], cf[A_STEP], cf[A_NESTEROV] != 0
    w2 = wdw = dw2 = g2 = 0.0
    for j in range(p.shape[0]):
        pj = p[j]
        gj = sign * g[j]
        if l2_on:
            gj = gj + l2 * pj
        mj, vj = cpu_moments(gj, m[j], v[j], c1, b2, c2)
        m[j], v[j] = mj, vj
        if vmax is not None:   # max that keeps a NaN, as torch.maximum
            xj = vmax[j]
            if vj > xj or vj != vj:
                xj = vj
            vmax[j] = xj
            vj = xj
        new = pj * decay - step * cpu_direction(gj, mj, vj, sbc2, eps, nesterov, b1, c1)
        p[j] = new
        if sums is not None:
            w2, wdw, dw2, g2 = reduce_step_terms(w2, wdw, dw2, g2, pj, new, g[j])
    if sums is not None:
        add_step_sums(sums[k], (w2, wdw, dw2, g2))


@kernel
def _adam_kernel(tiles, rows, cols, coef, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                 p_off, m_off, v_off, x_off, sums):
    """adam_span over every span of every tile (with max_exp_avg_sq where the tensor's
    group has amsgrad); sums[k] = the tile's step sums (sums None: none computed)."""
    for k in prange(tiles.shape[0]):
        tile = tiles[k]
        t = tile[TENSOR]
        count, n = spans(tile, cols[t])
        if sums is not None:
            sums[k, :] = 0.0
        for x in range(count):
            s, _ = span(tile, rows[t], cols[t], x)
            po, mo, vo = p_off[t] + s, m_off[t] + s, v_off[t] + s
            if coef[t, A_AMSGRAD] != 0:
                xo = x_off[t] + s
                adam_span(param[po:po + n], grad[po:po + n], exp_avg[mo:mo + n],
                          exp_avg_sq[vo:vo + n], max_exp_avg_sq[xo:xo + n], coef[t], sums, k)
            else:
                adam_span(param[po:po + n], grad[po:po + n], exp_avg[mo:mo + n],
                          exp_avg_sq[vo:vo + n], None, coef[t], sums, k)


def amsgrad_tensors(h: Hyper, active: np.ndarray, x_off: np.ndarray) -> np.ndarray:
    """Which tensors step with AMSGrad; every active one of them must have a
    max_exp_avg_sq (the job's layout follows its groups' amsgrad, fixed at registration)."""
    if (h.amsgrad & active & (x_off < 0)).any():
        raise ValueError("amsgrad is set for a tensor without a max_exp_avg_sq buffer")
    return h.amsgrad & (x_off >= 0)


def _cpu(call: StepCall, *, coupled: bool) -> None:
    h, layout, state = call.hyper, call.layout, call.state
    coef = cpu_coefficients(h, call.steps)
    coef[:, A_SIGN] = np.where(h.maximize, -1.0, 1.0)
    if coupled:   # g ← g + λθ
        coef[:, A_L2_ON], coef[:, A_L2] = h.weight_decay != 0, h.weight_decay
    else:
        coef[:, A_DECAY] = h.decay_factors(call.active)
    plan = cpu_tiles.plan(layout, View.FLAT)
    m, m_off = field(layout, state, "exp_avg")
    v, v_off = field(layout, state, "exp_avg_sq")
    vmax, x_off = field(layout, state, "max_exp_avg_sq")
    coef[:, A_AMSGRAD] = amsgrad_tensors(h, call.active, x_off)
    tiles = plan.select(call.active)
    sums = tile_sums(tiles, call.sums)
    _adam_kernel(tiles, plan.rows, plan.cols, coef.astype(F32), state.param, call.grad,
                 m, v, vmax, layout.offsets, m_off, v_off, x_off, sums)
    if sums is not None:
        call.result.sums.add_tiles(tiles[:, TENSOR], sums)


# ---------------------------------------------------------------------------------------
# CUDA (kernels/csrc/adam.cu): one launch of adam_apply
# ---------------------------------------------------------------------------------------

def _cuda(call: StepCall, cs, *, coupled: bool) -> None:
    h = call.hyper
    cf = cs.table("AdamCoef")
    cf.active = call.active
    cf.sign = np.where(h.maximize, -1.0, 1.0)
    cf.decay = 1.0
    if coupled:
        cf.l2_on, cf.l2 = h.weight_decay != 0, h.weight_decay
    else:
        cf.decay = h.decay_factors(call.active)
    cf.c1, cf.b2, cf.c2, cf.eps = 1.0 - h.beta1, h.beta2, 1.0 - h.beta2, h.eps
    cf.sbc2, cf.step = bias_corrections(h, call.steps)
    cf.amsgrad = amsgrad_tensors(h, call.active, cs.plan.tinfo["vm"])
    cs.launch("adam_apply", cs.n_tiles, cs.tiles, cs.tinfo, cs.upload(cf), cs.param, cs.grad,
              cs.gkind, cs.field("exp_avg"), cs.field("exp_avg_sq"), cs.field("max_exp_avg_sq"),
              cs.tile_sums, cs.with_sums)


def _record(name: str, coupled: bool) -> Kernel:
    return Kernel(name, View.FLAT, (),
                  reference=functools.partial(_reference, coupled=coupled),
                  cpu=functools.partial(_cpu, coupled=coupled),
                  cuda=CudaKernels("adam.cu", ("adam_apply",),
                                   functools.partial(_cuda, coupled=coupled)))


ADAMW = _record("adamw", coupled=False)   # oracle: torch.optim.AdamW
ADAM = _record("adam", coupled=True)      # oracle: torch.optim.Adam
