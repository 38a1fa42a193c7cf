"""NumPy reference implementations, one tensor at a time, straight from shared/OPTIMIZERS.md.

This module is the ground truth that every fast path (the numba CPU backend, the CuPy
kernels) is tested against. It favours the plain statement of each equation over speed
and is never what a benchmark reports as optserve's own figure.

Conventions, shared with the fast paths:
- `param` and every state buffer are float32 arrays, updated in place; `grad` is float32.
- `step` is this tensor's step count *after* incrementing (it starts at 1).
- Scalars are Python floats (float64); as in torch, a coefficient is formed in float64
  and applied to float32 data.
- State buffers use torch's names (`exp_avg`, `exp_avg_sq`, `exp_avg_sq_row`, ...).
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32
name = "reference"
STEPS_IN_PARTS = True   # see optserve.kernels.cpu


def _f(x: float) -> np.float32:
    return F32(x)


def decay_factor(mode: str, lr: float, weight_decay: float, initial_lr: float) -> float:
    """The multiplier of θ in decoupled weight decay.

    lr:        θ ← θ(1 − lr·λ)            torch.optim.AdamW
    schedule:  θ ← θ(1 − (lr/lr₀)·λ)      Loshchilov & Hutter 2019, Alg. 2 (η_t = lr/lr₀)
    fixed:     θ ← θ(1 − λ)
    """
    if mode == "lr":
        return 1.0 - lr * weight_decay
    if mode == "schedule":
        return 1.0 - (lr / initial_lr) * weight_decay
    if mode == "fixed":
        return 1.0 - weight_decay
    raise ValueError(f"unknown weight decay mode {mode!r}")


def _adam_moments(grad, state, beta1, beta2):
    """m ← lerp(m, g, 1−β1);  v ← β2·v + (1−β2)·g²."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += _f(1.0 - beta1) * (grad - m)
    v *= _f(beta2)
    v += _f(1.0 - beta2) * (grad * grad)
    return m, v


def _adam_direction_step(param, m, v, step, lr, beta1, beta2, eps):
    """θ ← θ − (lr/bc1) · m / (√v/√bc2 + ε)   (ε after the bias-corrected sqrt, as torch)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    denom = np.sqrt(v) / _f(math.sqrt(bc2)) + _f(eps)
    param -= _f(lr / bc1) * (m / denom)


def adamw(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay,
          weight_decay_mode="lr", initial_lr=None, maximize=False):
    """AdamW, decoupled decay applied to θ_{t−1} before the Adam step (torch.optim.AdamW).

    θ ← θ·decay_factor;  m, v ← moments(g);  θ ← θ − (lr/bc1)·m/(√v/√bc2 + ε)

    References: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, Alg. 2.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        param *= _f(decay_factor(weight_decay_mode, lr, weight_decay, initial_lr or lr))
    m, v = _adam_moments(g, state, beta1, beta2)
    _adam_direction_step(param, m, v, step, lr, beta1, beta2, eps)


def adam(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay, maximize=False):
    """Adam with classic coupled L2: g ← g + λθ_{t−1}, then the Adam step (torch.optim.Adam).

    References: Kingma & Ba, "Adam", ICLR 2015, Alg. 1; Loshchilov & Hutter 2019, Alg. 2 line 6.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + _f(weight_decay) * param
    m, v = _adam_moments(g, state, beta1, beta2)
    _adam_direction_step(param, m, v, step, lr, beta1, beta2, eps)


def _rows(x: np.ndarray, view: str) -> np.ndarray:
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def _cosine_rows(x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """|x·y| / (max(‖x‖, ε)·max(‖y‖, ε)) per row, as F.cosine_similarity (computed in float64)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    nx = np.maximum(np.sqrt((x64 * x64).sum(axis=1)), eps)
    ny = np.maximum(np.sqrt((y64 * y64).sum(axis=1)), eps)
    return np.abs((x64 * y64).sum(axis=1)) / (nx * ny)


def adamp_projection(param, grad, update, *, delta, wd_ratio, eps):
    """Removes the radial part of `update` when θ looks scale-invariant.

    For the channel view (rows = shape[0]) and then the layer view (one row), if every row
    has |cos(g, θ)| < δ/√(row length), project: u ← u − θ̂·Σ_row(θ̂ ⊙ u) with θ̂ = θ/(‖θ‖_row + ε).
    Returns (update, weight-decay ratio, projected?).

    References: Heo et al., "AdamP", ICLR 2021; clovaai/AdamP 0.3.0 (the normative code).
    """
    for view in ("channel", "layer"):
        g_rows, p_rows = _rows(grad, view), _rows(param, view)
        if _cosine_rows(g_rows, p_rows, eps).max() < delta / math.sqrt(p_rows.shape[1]):
            norms = np.sqrt((p_rows * p_rows).sum(axis=1, dtype=np.float32)) + _f(eps)
            p_hat = p_rows / norms[:, None]
            u_rows = _rows(update, view)
            radial = (p_hat * u_rows).sum(axis=1, dtype=np.float32)
            return (u_rows - p_hat * radial[:, None]).reshape(param.shape), wd_ratio, True
    return update, 1.0, False


def adamp(param, grad, state, *, step, lr, beta1, beta2, eps, weight_decay,
          delta=0.1, wd_ratio=0.1, nesterov=False):
    """AdamP: the Adam direction with its radial component projected out for scale-invariant θ.

    u = m/(√v/√bc2 + ε) (or the Nesterov form); project (tensors with ndim > 1 only);
    θ ← θ(1 − lr·λ·r) with r = wd_ratio if projected else 1;  θ ← θ − (lr/bc1)·u.
    Returns True when the tensor was projected.
    """
    m, v = _adam_moments(grad, state, beta1, beta2)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    denom = np.sqrt(v) / _f(math.sqrt(bc2)) + _f(eps)
    if nesterov:
        update = (_f(beta1) * m + _f(1.0 - beta1) * grad) / denom
    else:
        update = m / denom
    ratio, projected = 1.0, False
    if param.ndim > 1:
        update, ratio, projected = adamp_projection(
            param, grad, update, delta=delta, wd_ratio=wd_ratio, eps=eps)
    if weight_decay > 0:
        param *= _f(1.0 - lr * weight_decay * ratio)
    param -= _f(lr / bc1) * update
    return projected


def rms(x: np.ndarray) -> float:
    """RMS(x) = ‖x‖₂/√numel, accumulated in float64."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def adafactor_lr(*, step, lr, relative_step, warmup_init, scale_parameter, eps2, param_rms):
    """α_t = max(ε2, RMS(θ_{t−1}))·ρ_t with ρ_t = min(1e−2, 1/√t) (relative) or the given lr."""
    rho = lr
    if relative_step:
        rho = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    scale = max(eps2, param_rms) if scale_parameter else 1.0
    return scale * rho


def adafactor_is_factored(shape) -> bool:
    return len(shape) >= 2


def adafactor(param, grad, state, *, step, lr=None, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
              decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
              relative_step=True, warmup_init=False):
    """Adafactor with factored second moments over the last two dims.

    β̂2t = 1 − t^decay_rate;  R ← β̂2t·R + (1−β̂2t)·mean_col(g² + ε1);  C likewise over rows;
    V̂ = R·C / mean(R);  U = g/√V̂;  Û = U / max(1, RMS(U)/d);  u = α_t·Û (EMA with β1 if set);
    θ ← θ − λ·α_t·θ;  θ ← θ − u.  Returns the clipping divisor max(1, RMS(U)/d).

    References: Shazeer & Stern, "Adafactor", ICML 2018, Alg. 4/5; semantics of
    transformers.optimization.Adafactor (fairseq lineage).
    """
    alpha = adafactor_lr(step=step, lr=lr, relative_step=relative_step, warmup_init=warmup_init,
                         scale_parameter=scale_parameter, eps2=eps2, param_rms=rms(param))
    beta2t = 1.0 - step**decay_rate
    g2 = grad * grad + _f(eps1)
    if adafactor_is_factored(param.shape):
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row *= _f(beta2t)
        row += _f(1.0 - beta2t) * g2.mean(axis=-1, dtype=np.float32)
        col *= _f(beta2t)
        col += _f(1.0 - beta2t) * g2.mean(axis=-2, dtype=np.float32)
        row_factor = 1.0 / np.sqrt(row / row.mean(axis=-1, keepdims=True, dtype=np.float32))
        col_factor = 1.0 / np.sqrt(col)
        update = row_factor[..., :, None] * col_factor[..., None, :] * grad
    else:
        v = state["exp_avg_sq"]
        v *= _f(beta2t)
        v += _f(1.0 - beta2t) * g2
        update = grad / np.sqrt(v)
    clip = max(1.0, rms(update) / clip_threshold)
    update = update / _f(clip) * _f(alpha)
    if beta1 is not None:
        m = state["exp_avg"]
        m *= _f(beta1)
        m += _f(1.0 - beta1) * update
        update = m
    if weight_decay != 0:
        param -= _f(weight_decay * alpha) * param
    param -= update
    return clip


DECAY_MODE_NAMES = ("lr", "schedule", "fixed")


def _flag(x: float) -> bool:
    return bool(x != 0.0)


def _tensor_step(optimizer: str, p, g, st, step: int, h: dict[str, float]) -> tuple[bool, float]:
    """One tensor's step by name; returns (projected, clip divisor)."""
    if optimizer == "adamw":
        adamw(p, g, st, step=step, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
              weight_decay=h["weight_decay"], initial_lr=h["initial_lr"], maximize=_flag(h["maximize"]),
              weight_decay_mode=DECAY_MODE_NAMES[int(h["weight_decay_mode"])])
    elif optimizer == "adam":
        adam(p, g, st, step=step, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
             weight_decay=h["weight_decay"], maximize=_flag(h["maximize"]))
    elif optimizer == "adamp":
        projected = adamp(p, g, st, step=step, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"],
                          eps=h["eps"], weight_decay=h["weight_decay"], delta=h["delta"],
                          wd_ratio=h["wd_ratio"], nesterov=_flag(h["nesterov"]))
        return projected, 1.0
    elif optimizer == "adafactor":
        beta1 = None if math.isnan(h["adafactor_beta1"]) else h["adafactor_beta1"]
        clip = adafactor(p, g, st, step=step, lr=h["lr"], eps1=h["eps"], eps2=h["eps2"],
                         clip_threshold=h["clip_threshold"], decay_rate=h["decay_rate"], beta1=beta1,
                         weight_decay=h["weight_decay"], scale_parameter=_flag(h["scale_parameter"]),
                         relative_step=_flag(h["relative_step"]), warmup_init=_flag(h["warmup_init"]))
        return False, clip
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    return False, 1.0


def step(optimizer, layout, state, grad, active, hyper, *, stats=True):
    """The reference over a job's flat buffers: one tensor at a time, the same signature as
    every backend's `step`. Steps in `state.steps` are already incremented for active tensors.

    Returns per-tensor statistics: "projected" (bool, AdamP), "clip" (Adafactor's divisor),
    and, only when `stats` is true, in float64, the sums the metrics need: "w2" = ||w_t||²,
    "wdw" = <w_t, Δw>, "dw2" = ||Δw||², "g2" = ||g||², with Δw = w_{t+1} − w_t. With
    stats=False those four keys are absent; θ and the state come out the same either way.
    """
    n = layout.num_tensors
    out = {"projected": np.zeros(n, bool), "clip": np.ones(n, np.float64)}
    if stats:
        out.update({key: np.zeros(n, np.float64) for key in ("w2", "wdw", "dw2", "g2")})
    for i in np.flatnonzero(active):
        p = layout.param_view(state.param, i)
        g = layout.param_view(grad, i)
        st = {name: layout.field_view(state, name, i) for name in layout.field_shapes[i]}
        h = {k: float(v[i]) for k, v in hyper.items()}
        before = p.astype(np.float64) if stats else None
        out["projected"][i], out["clip"][i] = _tensor_step(
            optimizer, p, g, st, int(state.steps[i]), h)
        if stats:
            delta = p.astype(np.float64) - before
            g64 = g.astype(np.float64)
            out["w2"][i] = np.vdot(before, before)
            out["wdw"][i] = np.vdot(before, delta)
            out["dw2"][i] = np.vdot(delta, delta)
            out["g2"][i] = np.vdot(g64, g64)
    return out


# ---- wire formats ------------------------------------------------------------------------------
# Gradients arrive, and parameters leave, as little-endian float32, bfloat16 or float16; the
# shard's values are float32. kernels/convert.py is the fast path of these two.


def decode(raw: np.ndarray, wire: str, out: np.ndarray) -> bool:
    """Decodes the wire bytes `raw` into the float32 array `out`; True when every value is
    finite."""
    if wire == "float32":
        out[:] = raw.view("<f4")
    elif wire == "float16":
        out[:] = raw.view("<f2")
    elif wire == "bfloat16":
        # bfloat16 is the top half of a float32.
        out.view(np.uint32)[:] = raw.view("<u2").astype(np.uint32) << 16
    else:
        raise ValueError(f"unknown wire format {wire!r}")
    return bool(np.isfinite(out).all())


def encode(values: np.ndarray, wire: str, out: np.ndarray) -> None:
    """Encodes float32 `values` into the byte array `out` in the wire format."""
    if wire == "float32":
        out.view("<f4")[:] = values
    elif wire == "float16":
        out.view("<f2")[:] = values
    elif wire == "bfloat16":
        # Round to nearest even on the 16 bits that are dropped (uint32 arithmetic wraps).
        bits = values.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
        out.view("<u2")[:] = rounded >> 16
    else:
        raise ValueError(f"unknown wire format {wire!r}")
