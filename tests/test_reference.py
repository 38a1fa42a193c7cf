"""Each optimizer's NumPy reference (beside its kernels: kernels/adam.py, adamp.py, ...)
against an independent oracle, one tensor at a time, and the reference backend
(kernels/reference.py) over a job's flat buffers.

Oracles (docs/optimizers.md, "Oracles"):
- torch.optim.AdamW / torch.optim.Adam (for-loop implementation, float32), and
  keras.optimizers.AdamW / Adam for eps_mode="keras" (tests/keras_oracle.py);
- adamp.AdamP 0.3.0 (the normative AdamP code);
- transformers.optimization.Adafactor (paper/fairseq semantics) for `adafactor`, and
  torch.optim.Adafactor, its own rule, for `torch_adafactor`;
- lion_pytorch.Lion (the Lion paper's algorithm).

Every test runs STEPS steps on a seeded float32 tensor with a fresh random gradient each step,
fed identically to the oracle (``param.grad = g.clone()``) and to the reference (``g.numpy()``),
then compares the parameter and the state buffers the oracle stores under the same names.
Gradients are dense N(0, 1) draws (or orthogonalised versions of them), so no element carries a
zero "true" gradient made of rounding noise (docs/optimizers.md, "A trap when comparing").
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keras_oracle import KerasAdam
from optserve.kernels import (DecayMode, EpsMode, FlatLayout, FlatState, Hyper, Report, adafactor,
                              adam, adamp, lion, torch_adafactor)
from optserve.kernels import reference
from optserve.kernels.registry import KERNELS
from optserve.proto.optimizers import REGISTRY, group_to_proto

STEPS = 50
RTOL, ATOL = 1e-5, 1e-6

SHAPES_ND = {"1d": (37,), "2d": (16, 24), "3d": (6, 8, 10), "4d": (8, 4, 3, 3)}
# Degenerate shapes a model does have: a scalar, a single row / column, a size-1 middle dim.
SHAPES_EDGE = {"0d": (), "1x24": (1, 24), "24x1": (24, 1), "3x1x5": (3, 1, 5)}


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _randn(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _new_param(rng, shape):
    """(oracle tensor, reference array): identical float32 values, separate storage."""
    x = _randn(rng, shape)
    return torch.nn.Parameter(torch.from_numpy(x.copy())), x.copy()


def _feed(p_torch: torch.nn.Parameter, g: np.ndarray) -> np.ndarray:
    """Hands the same gradient to the oracle (a clone) and returns the reference's copy."""
    g_t = torch.from_numpy(g.copy())
    p_torch.grad = g_t.clone()
    return g_t.numpy()


def _close(actual: np.ndarray, expected: torch.Tensor, what: str, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=rtol, atol=atol,
                               err_msg=what)


def _compare_state(ref_state: dict, oracle_state: dict, names, step: int):
    for name in names:
        assert name in oracle_state, f"oracle has no state {name!r}"
        _close(ref_state[name], oracle_state[name], f"state {name!r} after step {step}")


def _cosine_lr(lr0: float, t: int, total: int = STEPS) -> float:
    """Cosine schedule from lr0 down to 0.1·lr0 (t = 1..total)."""
    return lr0 * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / total)))


def _step_lr(lr0: float, t: int) -> float:
    """Step schedule: ×0.3 every 15 steps."""
    return lr0 * 0.3 ** ((t - 1) // 15)


SCHEDULES = {
    "constant": lambda lr0, t: lr0,
    "cosine": _cosine_lr,
    "step": _step_lr,
}


# ----------------------------------------------------------------------------- AdamW / Adam


ADAMW_CASES = [
    # id, shape, lr0, betas, eps, reference wd λ, mode, schedule, maximize
    ("lr-default-2d", (16, 24), 1e-3, (0.9, 0.999), 1e-8, 1e-2, "lr", "constant", False),
    ("lr-big-1d", (37,), 1e-2, (0.9, 0.999), 1e-8, 0.1, "lr", "constant", False),
    ("lr-nowd-4d", (8, 4, 3, 3), 1e-2, (0.8, 0.99), 1e-6, 0.0, "lr", "constant", False),
    ("lr-cosine-3d", (6, 8, 10), 1e-2, (0.9, 0.95), 1e-8, 0.1, "lr", "cosine", False),
    ("lr-maximize-2d", (16, 24), 1e-2, (0.9, 0.999), 1e-8, 0.05, "lr", "constant", True),
    ("lr-eps-large-2d", (16, 24), 1e-2, (0.9, 0.999), 1e-3, 0.05, "lr", "step", False),
    ("schedule-cosine-2d", (16, 24), 1e-2, (0.9, 0.999), 1e-8, 1e-2, "schedule", "cosine", False),
    ("schedule-step-1d", (37,), 1e-2, (0.9, 0.999), 1e-8, 2e-2, "schedule", "step", False),
    ("schedule-cosine-4d-max", (8, 4, 3, 3), 3e-3, (0.9, 0.99), 1e-8, 1e-2, "schedule", "cosine", True),
    ("schedule-constant-3d", (6, 8, 10), 1e-2, (0.9, 0.999), 1e-8, 1e-2, "schedule", "constant", False),
    ("fixed-2d", (16, 24), 1e-2, (0.9, 0.999), 1e-8, 1e-2, "fixed", "constant", False),
    ("fixed-1d", (37,), 1e-3, (0.9, 0.999), 1e-8, 5e-3, "fixed", "constant", False),
    ("fixed-4d-max", (8, 4, 3, 3), 1e-2, (0.85, 0.995), 1e-8, 2e-2, "fixed", "constant", True),
    ("lr-0d", (), 1e-2, (0.9, 0.999), 1e-8, 0.1, "lr", "cosine", False),
    ("schedule-24x1", (24, 1), 1e-2, (0.9, 0.999), 1e-8, 1e-2, "schedule", "step", False),
    ("fixed-1x24-beta1-0", (1, 24), 1e-2, (0.0, 0.99), 1e-8, 1e-2, "fixed", "constant", False),
]


def _torch_wd(mode: str, wd: float, lr0: float) -> float:
    """torch AdamW's weight_decay equivalent to the reference's (mode, λ)."""
    if mode == "lr":
        return wd
    # schedule: θ(1 − (lr_t/lr₀)·λ) = θ(1 − lr_t·(λ/lr₀));  fixed (constant lr): θ(1 − lr·(λ/lr))
    return wd / lr0


@pytest.mark.parametrize("case", ADAMW_CASES, ids=[c[0] for c in ADAMW_CASES])
def test_adamw_matches_torch(case):
    _, shape, lr0, (b1, b2), eps, wd, mode, sched, maximize = case
    rng = _rng(1000 + ADAMW_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    opt = torch.optim.AdamW([p_t], lr=lr0, betas=(b1, b2), eps=eps,
                            weight_decay=_torch_wd(mode, wd, lr0), maximize=maximize,
                            foreach=False)
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    for t in range(1, STEPS + 1):
        lr_t = SCHEDULES[sched](lr0, t)
        for group in opt.param_groups:
            group["lr"] = lr_t
        g = _randn(rng, shape)
        g_r = _feed(p_t, g)
        opt.step()
        adam.adamw(p_r, g_r, st, step=t, lr=lr_t, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                  weight_decay_mode=DecayMode[mode.upper()], initial_lr=lr0,
                  maximize=maximize)
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg", "exp_avg_sq"), t)
    # The decay must have mattered for the comparison to mean anything.
    if wd:
        assert not np.allclose(p_r, _adamw_without_decay(case), rtol=1e-4, atol=1e-5)


def _adamw_without_decay(case):
    """The same run with weight_decay=0 (torch), to show the decay term is exercised."""
    _, shape, lr0, (b1, b2), eps, _wd, _mode, sched, maximize = case
    rng = _rng(1000 + ADAMW_CASES.index(case))
    p_t, _ = _new_param(rng, shape)
    opt = torch.optim.AdamW([p_t], lr=lr0, betas=(b1, b2), eps=eps, weight_decay=0.0,
                            maximize=maximize, foreach=False)
    for t in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = SCHEDULES[sched](lr0, t)
        _feed(p_t, _randn(rng, shape))
        opt.step()
    return p_t.detach().numpy()


def test_adamw_schedule_mode_differs_from_lr_mode():
    """With a changing lr, 'schedule' (decay ∝ lr_t/lr₀) and 'lr' (decay ∝ lr_t) differ — and
    'schedule' is the one equal to torch AdamW(weight_decay=λ/lr₀); checked above."""
    shape, lr0, wd = (16, 24), 1e-2, 1e-2
    rng = _rng(7)
    p0, g_list = _randn(rng, shape), [_randn(rng, shape) for _ in range(STEPS)]
    out = {}
    for mode in ("schedule", "lr"):
        p = p0.copy()
        st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
        for t, g in enumerate(g_list, start=1):
            adam.adamw(p, g, st, step=t, lr=_cosine_lr(lr0, t), beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=wd, weight_decay_mode=DecayMode[mode.upper()],
                      initial_lr=lr0)
        out[mode] = p
    assert not np.allclose(out["schedule"], out["lr"], rtol=1e-3, atol=1e-4)


ADAM_CASES = [
    # id, shape, lr, betas, eps, weight_decay (coupled L2), maximize
    ("plain-2d", (16, 24), 1e-3, (0.9, 0.999), 1e-8, 0.0, False),
    ("l2-2d", (16, 24), 1e-2, (0.9, 0.999), 1e-8, 0.1, False),
    ("l2-max-1d", (37,), 1e-2, (0.9, 0.999), 1e-8, 0.1, True),
    ("max-4d", (8, 4, 3, 3), 1e-2, (0.8, 0.99), 1e-8, 0.0, True),
    ("l2-big-3d", (6, 8, 10), 3e-3, (0.9, 0.95), 1e-6, 1.0, False),
    ("l2-0d", (), 1e-2, (0.9, 0.999), 1e-8, 0.1, False),
]


@pytest.mark.parametrize("case", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
def test_adam_coupled_l2_matches_torch(case):
    _, shape, lr, (b1, b2), eps, wd, maximize = case
    rng = _rng(2000 + ADAM_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    opt = torch.optim.Adam([p_t], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                           maximize=maximize, foreach=False)
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    for t in range(1, STEPS + 1):
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        adam.adam(p_r, g_r, st, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                 maximize=maximize)
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg", "exp_avg_sq"), t)


AMSGRAD_CASES = [
    # id, optimizer, shape, weight decay, maximize, schedule
    ("adamw-2d", "adamw", (16, 24), 0.0, False, "constant"),
    ("adamw-wd-4d", "adamw", (8, 4, 3, 3), 0.1, False, "cosine"),
    ("adamw-maximize-1d", "adamw", (37,), 0.0, True, "step"),
    ("adamw-wd-maximize-3d", "adamw", (6, 8, 10), 0.1, True, "constant"),
    ("adam-2d", "adam", (16, 24), 0.0, False, "cosine"),
    ("adam-l2-0d", "adam", (), 0.1, False, "constant"),
    ("adam-maximize-24x1", "adam", (24, 1), 0.0, True, "constant"),
    ("adam-l2-maximize-2d", "adam", (16, 24), 0.1, True, "step"),
]


def _shrinking_grad(rng, shape, t):
    """A gradient whose scale falls by 10x over the run, so that v falls below its running
    maximum and AMSGrad's max_exp_avg_sq decides the step."""
    return np.asarray(_randn(rng, shape) * np.float32(10 ** (-(t - 1) / STEPS)), np.float32)


@pytest.mark.parametrize("case", AMSGRAD_CASES, ids=[c[0] for c in AMSGRAD_CASES])
def test_amsgrad_matches_torch(case):
    """amsgrad=True: max_exp_avg_sq ← max(max_exp_avg_sq, v) and the denominator from it,
    against torch.optim.AdamW / Adam with amsgrad=True (parameter and all three buffers)."""
    _, optimizer, shape, wd, maximize, sched = case
    rng = _rng(2500 + AMSGRAD_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    lr0 = 1e-2
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = cls([p_t], lr=lr0, betas=(0.9, 0.9), weight_decay=wd, maximize=maximize, amsgrad=True,
              foreach=False)
    st = {k: np.zeros(shape, np.float32) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    fn = adam.adamw if optimizer == "adamw" else adam.adam
    for t in range(1, STEPS + 1):
        lr_t = SCHEDULES[sched](lr0, t)
        opt.param_groups[0]["lr"] = lr_t
        g_r = _feed(p_t, _shrinking_grad(rng, shape, t))
        opt.step()
        fn(p_r, g_r, st, step=t, lr=lr_t, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=wd,
           maximize=maximize, amsgrad=True)
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), t)
    # the maximum decided the last steps: without it, the run would have gone elsewhere
    assert (st["max_exp_avg_sq"] > st["exp_avg_sq"]).all()
    rng = _rng(2500 + AMSGRAD_CASES.index(case))
    _, plain = _new_param(rng, shape)
    st = {k: np.zeros(shape, np.float32) for k in ("exp_avg", "exp_avg_sq")}
    for t in range(1, STEPS + 1):
        fn(plain, _shrinking_grad(rng, shape, t), st, step=t, lr=SCHEDULES[sched](lr0, t),
           beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=wd, maximize=maximize)
    assert not np.allclose(plain, p_r, rtol=1e-4, atol=1e-5)


KERAS_CASES = [
    # id, optimizer, shape, lr0, betas, ε̂, weight decay, amsgrad, maximize, schedule
    ("adamw-eps1e-3-2d", "adamw", (16, 24), 1e-2, (0.9, 0.999), 1e-3, 0.1, False, False, "cosine"),
    ("adamw-eps1e-7-amsgrad-4d", "adamw", (8, 4, 3, 3), 1e-2, (0.9, 0.95), 1e-7, 0.1, True, False,
     "step"),
    ("adamw-maximize-1d", "adamw", (37,), 3e-3, (0.8, 0.99), 1e-3, 0.0, False, True, "constant"),
    ("adam-l2-eps1e-3-3d", "adam", (6, 8, 10), 1e-2, (0.9, 0.999), 1e-3, 0.1, False, False,
     "cosine"),
    ("adam-l2-amsgrad-maximize-0d", "adam", (), 1e-2, (0.9, 0.95), 1e-3, 0.1, True, True,
     "constant"),
    ("adam-eps1e-7-24x1", "adam", (24, 1), 1e-2, (0.9, 0.95), 1e-7, 0.0, False, False, "step"),
]


def _small_shrinking_grad(rng, shape, t):
    """A gradient of scale 1e-3 falling to 1e-4: small enough that ε̂ = 1e-7 weighs on √v
    (so the two placements of ε part), and falling, so that AMSGrad's maximum decides."""
    return np.asarray(_randn(rng, shape) * np.float32(1e-3 * 10 ** (-(t - 1) / STEPS)), np.float32)


def _keras_run(case, eps_mode, oracle=None):
    """The reference's θ and state after STEPS steps of `case` with `eps_mode`, compared after
    every step with `oracle` (a KerasAdam of the same parameter) where there is one."""
    _, optimizer, shape, lr0, (b1, b2), eps, wd, amsgrad, maximize, sched = case
    rng = _rng(2700 + KERAS_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    if oracle:
        opt = oracle([p_t], decoupled=optimizer == "adamw", lr=lr0, betas=(b1, b2), eps=eps,
                     weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    st = {k: np.zeros(shape, np.float32) for k in names}
    fn = adam.adamw if optimizer == "adamw" else adam.adam
    for t in range(1, STEPS + 1):
        lr_t = SCHEDULES[sched](lr0, t)
        g_r = _feed(p_t, _small_shrinking_grad(rng, shape, t))
        fn(p_r, g_r, st, step=t, lr=lr_t, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
           maximize=maximize, amsgrad=amsgrad, eps_mode=eps_mode)
        if oracle:
            opt.param_groups[0]["lr"] = lr_t
            opt.step()
            _close(p_r, p_t, f"param after step {t}")
            _compare_state(st, opt.state[p_t], names, t)
    return p_r, st


@pytest.mark.parametrize("case", KERAS_CASES, ids=[c[0] for c in KERAS_CASES])
def test_keras_eps_matches_keras(case):
    """eps_mode="keras": θ ← θ − α_t·m/(√v̄ + ε̂), α_t = lr·√bc2/bc1, against Keras's own
    AdamW and Adam (weight decay, amsgrad and maximize as torch's); and the run is not the
    one torch's placement of the same ε takes."""
    keras_p, keras_st = _keras_run(case, EpsMode.KERAS, KerasAdam)
    torch_p, _ = _keras_run(case, EpsMode.TORCH)
    assert not np.allclose(keras_p, torch_p, rtol=RTOL, atol=ATOL)   # what the oracle would catch
    if case[7]:   # amsgrad: the maximum decided the last steps
        assert (keras_st["max_exp_avg_sq"] > keras_st["exp_avg_sq"]).all()


# ----------------------------------------------------------------------------- AdamP


def _orthogonal_rows(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """g with its component along each row (channel) of p removed: cos(g_row, p_row) ≈ 0."""
    g2 = g.reshape(g.shape[0], -1).astype(np.float64)
    p2 = p.reshape(p.shape[0], -1).astype(np.float64)
    coef = (g2 * p2).sum(axis=1, keepdims=True) / (p2 * p2).sum(axis=1, keepdims=True)
    return (g2 - coef * p2).astype(np.float32).reshape(g.shape)


def _orthogonal_layer(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """g with its component along the whole of p removed (layer view only; rows stay random)."""
    g1, p1 = g.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    return (g1 - (g1 @ p1) / (p1 @ p1) * p1).astype(np.float32).reshape(g.shape)


def _aligned(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """g plus a large multiple of p, so every row's |cos(g, p)| is far above δ/√n."""
    return (g + 2.0 * p).astype(np.float32)


GRAD_KINDS = {
    "orthogonal": _orthogonal_rows,   # the channel test fires every step
    "layer": _orthogonal_layer,       # the channel test fails, the layer test fires
    "aligned": _aligned,              # neither fires
    "random": lambda g, p: g,         # whatever the package decides
}


def _adamp_fires(opt, p: torch.Tensor, grad: torch.Tensor, delta: float, eps: float):
    """The adamp package's own threshold check, evaluated through its own methods, before the
    step. Returns the view that fires ('channel' / 'layer') or None."""
    if p.dim() <= 1:
        return None
    for view_name, view in (("channel", opt._channel_view), ("layer", opt._layer_view)):
        cos = opt._cosine_similarity(grad, p.data, eps, view)
        threshold = delta / math.sqrt(view(p.data).size(1))
        # Guard against a case where rounding decides the branch (the reference computes the
        # cosine in float64): keep test data away from the threshold.
        assert abs(float(cos.max()) - threshold) > 1e-5 * threshold, "cosine on the threshold"
        if cos.max() < threshold:
            return view_name
    return None


ADAMP_CASES = [
    # id, shape, grad kind, nesterov, weight_decay, expected firing view per step
    ("orth-2d", (16, 32), "orthogonal", False, 0.0, "channel"),
    ("orth-2d-nesterov-wd", (16, 32), "orthogonal", True, 0.1, "channel"),
    ("orth-4d-wd", (8, 4, 3, 3), "orthogonal", False, 0.1, "channel"),
    ("orth-4d-nesterov", (8, 4, 3, 3), "orthogonal", True, 0.0, "channel"),
    ("layer-2d-wd", (16, 32), "layer", False, 0.1, "layer"),
    ("layer-4d-nesterov-wd", (8, 4, 3, 3), "layer", True, 0.1, "layer"),
    ("aligned-2d-wd", (16, 32), "aligned", False, 0.1, None),
    ("aligned-4d-nesterov", (8, 4, 3, 3), "aligned", True, 0.0, None),
    ("random-2d-wd", (16, 32), "random", False, 0.1, "any"),
    ("random-3d-nesterov-wd", (6, 8, 10), "random", True, 0.1, "any"),
    ("vector-1d-wd", (37,), "orthogonal-1d", False, 0.1, None),
    ("vector-1d-nesterov", (37,), "random", True, 0.0, None),
    ("scalar-0d-wd", (), "random", False, 0.1, None),
    # One channel: the channel view is the layer view.
    ("orth-1x24-wd", (1, 24), "orthogonal", True, 0.1, "channel"),
    # Rows of length 1: |cos| is 1 per row, so only the layer test can fire.
    ("layer-24x1-wd", (24, 1), "layer", False, 0.1, "layer"),
    ("aligned-3x1x5", (3, 1, 5), "aligned", True, 0.1, None),
]


@pytest.mark.parametrize("case", ADAMP_CASES, ids=[c[0] for c in ADAMP_CASES])
def test_adamp_matches_package(case):
    from adamp import AdamP

    _, shape, kind, nesterov, wd, expect = case
    lr, b1, b2, eps, delta, wd_ratio = 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1
    rng = _rng(3000 + ADAMP_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    opt = AdamP([p_t], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, delta=delta,
                wd_ratio=wd_ratio, nesterov=nesterov)
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    fired_views = []
    for t in range(1, STEPS + 1):
        g = _randn(rng, shape)
        if kind == "orthogonal-1d":       # 1-D: never projected, however orthogonal g is
            g = _orthogonal_layer(g, p_r)
        else:
            g = GRAD_KINDS[kind](g, p_t.detach().numpy())
        g_r = _feed(p_t, g)
        fired = _adamp_fires(opt, p_t, p_t.grad, delta, eps)
        fired_views.append(fired)
        opt.step()
        projected = adamp.adamp(p_r, g_r, st, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps,
                              weight_decay=wd, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)
        assert projected is (fired is not None), (
            f"step {t}: reference projected={projected}, adamp fired={fired}")
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg", "exp_avg_sq"), t)
    if expect != "any":
        assert fired_views == [expect] * STEPS, fired_views


def test_adamp_projection_is_exercised():
    """The orthogonal case must really differ from plain Adam(W) with the same settings,
    otherwise a no-op projection would pass the parity tests above."""
    shape, lr = (16, 32), 1e-2
    rng = _rng(31)
    p = _randn(rng, shape)
    plain, proj = p.copy(), p.copy()
    st_a = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    st_b = {k: v.copy() for k, v in st_a.items()}
    for t in range(1, 11):
        g = _orthogonal_rows(_randn(rng, shape), proj)
        adam.adamw(plain, g, st_a, step=t, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0)
        assert adamp.adamp(proj, g, st_b, step=t, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.0)
    assert not np.allclose(plain, proj, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Adafactor


ADAFACTOR_CONFIGS = {
    # name: HF Adafactor kwargs (the reference gets the same ones)
    "defaults": dict(),
    "warmup_init": dict(warmup_init=True),
    "relative-noscale": dict(scale_parameter=False),
    "explicit-lr-scale": dict(relative_step=False, lr=1e-2),
    "explicit-lr-noscale": dict(relative_step=False, lr=3e-3, scale_parameter=False),
    "beta1": dict(beta1=0.9),
    "beta1-explicit-lr": dict(relative_step=False, lr=1e-2, beta1=0.9, scale_parameter=False),
    "clip0.5": dict(clip_threshold=0.5),
    "clip0.5-beta1-wd": dict(clip_threshold=0.5, beta1=0.9, weight_decay=0.1),
    "decay-0.5": dict(decay_rate=-0.5),
    "decay-0.5-explicit-lr": dict(decay_rate=-0.5, relative_step=False, lr=1e-2),
    "wd0.1": dict(weight_decay=0.1),
    "wd0.1-explicit-lr": dict(weight_decay=0.1, relative_step=False, lr=1e-2),
    "wd0.1-warmup-noscale": dict(weight_decay=0.1, warmup_init=True, scale_parameter=False),
    "beta1-0": dict(beta1=0.0),
}


def _adafactor_state(shape, beta1):
    st = {}
    if len(shape) >= 2:
        st["exp_avg_sq_row"] = np.zeros(shape[:-1], np.float32)
        st["exp_avg_sq_col"] = np.zeros(shape[:-2] + shape[-1:], np.float32)
    else:
        st["exp_avg_sq"] = np.zeros(shape, np.float32)
    if beta1 is not None:
        st["exp_avg"] = np.zeros(shape, np.float32)
    return st


def _ref_adafactor_kwargs(hf_kwargs: dict) -> dict:
    kw = dict(hf_kwargs)
    kw.setdefault("relative_step", True)
    if "lr" not in kw:
        kw["lr"] = None
    return kw


ADAFACTOR_SHAPES = {**SHAPES_ND, **SHAPES_EDGE}


@pytest.mark.parametrize("shape_id", list(ADAFACTOR_SHAPES))
@pytest.mark.parametrize("config", list(ADAFACTOR_CONFIGS))
def test_adafactor_matches_transformers(config, shape_id):
    from transformers.optimization import Adafactor

    shape = ADAFACTOR_SHAPES[shape_id]
    hf_kwargs = ADAFACTOR_CONFIGS[config]
    rng = _rng(4000 + 97 * list(ADAFACTOR_CONFIGS).index(config)
               + list(ADAFACTOR_SHAPES).index(shape_id))
    p_t, p_r = _new_param(rng, shape)
    opt = Adafactor([p_t], **hf_kwargs)
    kw = _ref_adafactor_kwargs(hf_kwargs)
    st = _adafactor_state(shape, kw.get("beta1"))
    clip_threshold = kw.get("clip_threshold", 1.0)
    clips = []
    for t in range(1, STEPS + 1):
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        clip = adafactor.adafactor(p_r, g_r, st, step=t, **kw)
        clips.append(clip)
        assert clip >= 1.0
        _close(p_r, p_t, f"param after step {t}")
        oracle_state = opt.state[p_t]
        assert set(st) == {k for k in oracle_state if k not in ("step", "RMS")}, (
            sorted(st), sorted(oracle_state))
        _compare_state(st, oracle_state, sorted(st), t)
    if clip_threshold < 1.0:
        assert max(clips) > 1.0, "clip_threshold=0.5 should clip at least once"


@pytest.mark.parametrize("shape_id", list(SHAPES_ND))
def test_adafactor_matches_torch(shape_id):
    """torch.optim.Adafactor(lr=1e-2) = HF defaults up to its ε1 handling (clamps instead of
    adding ε1 = 1e-30), so only the parameter is compared and with a looser tolerance."""
    shape = SHAPES_ND[shape_id]
    rng = _rng(5000 + list(SHAPES_ND).index(shape_id))
    p_t, p_r = _new_param(rng, shape)
    opt = torch.optim.Adafactor([p_t], lr=1e-2, weight_decay=0.0, foreach=False)
    st = _adafactor_state(shape, None)
    for t in range(1, STEPS + 1):
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        adafactor.adafactor(p_r, g_r, st, step=t)
        _close(p_r, p_t, f"param after step {t}", rtol=1e-4, atol=1e-5)


# torch.optim.Adafactor's own rule (kernels/torch_adafactor.py), against torch itself.
TORCH_ADAFACTOR_CONFIGS = {
    # name: torch.optim.Adafactor kwargs (the reference gets them translated), gradient scale
    "defaults": (dict(), 1.0),
    "wd": (dict(weight_decay=0.1), 1.0),
    "maximize": (dict(maximize=True), 1.0),
    "wd-maximize": (dict(weight_decay=0.1, maximize=True), 1.0),
    "lr-below-rho": (dict(lr=1e-3, weight_decay=0.5), 1.0),     # ρ = lr throughout
    "lr-above-rho": (dict(lr=0.15), 1.0),                       # ρ = 1/√t from t = 45
    "beta2_decay-0.5-d2": (dict(beta2_decay=-0.5, d=2.0), 1.0),
    "beta2_decay-0-d1.2": (dict(beta2_decay=0.0, d=1.2), 1.0),  # w = 1: no averaging
    "eps2-large": (dict(eps=(None, 3.0)), 1.0),                 # α from ε2, not RMS(θ)
    # ε1 above the gradients: max(mean(R), ε1) and max(V, ε1²) decide
    "eps1-clamps": (dict(eps=(0.02, 1e-3)), 1e-2),
    "eps1-clamps-wd-maximize": (dict(eps=(0.05, 1e-3), weight_decay=0.1, maximize=True), 1e-2),
    "eps1-tiny": (dict(eps=(1e-20, 1e-3)), 1e-2),                # ε1² a float32 subnormal
}


def _torch_adafactor_kwargs(kwargs: dict) -> dict:
    """torch.optim.Adafactor's arguments as the reference takes them (ε1 None: float32's
    machine epsilon, which is what the client sends)."""
    eps1, eps2 = kwargs.get("eps", (None, 1e-3))
    return dict(lr=kwargs.get("lr", 1e-2), beta2_decay=kwargs.get("beta2_decay", -0.8),
                eps1=float(torch.finfo(torch.float32).eps) if eps1 is None else eps1,
                eps2=eps2, d=kwargs.get("d", 1.0), weight_decay=kwargs.get("weight_decay", 0.0),
                maximize=kwargs.get("maximize", False))


TORCH_STATE_NAMES = {"exp_avg_sq_row": "row_var", "exp_avg_sq_col": "col_var",
                     "exp_avg_sq": "variance"}


def _run_torch_adafactor(config: str, shape, rng, oracle: bool = True):
    """STEPS steps of the reference (and of torch.optim.Adafactor, compared after every
    step); returns the reference's parameter."""
    kwargs, scale = TORCH_ADAFACTOR_CONFIGS[config]
    p_t, p_r = _new_param(rng, shape)
    opt = torch.optim.Adafactor([p_t], foreach=False, **kwargs) if oracle else None
    st = _adafactor_state(shape, None)
    for t in range(1, STEPS + 1):
        g = np.asarray(_randn(rng, shape) * np.float32(scale), np.float32)
        if len(shape) >= 1 and shape[-1] > 1:
            g[..., :1] = 0.0   # a column of exact zeros
        g_r = _feed(p_t, g)
        clip = torch_adafactor.torch_adafactor(p_r, g_r, st, step=t,
                                               **_torch_adafactor_kwargs(kwargs))
        assert clip >= 1.0
        if opt is None:
            continue
        opt.step()
        _close(p_r, p_t, f"param after step {t}")
        torch_state = opt.state[p_t]
        assert {TORCH_STATE_NAMES[k] for k in st} == set(torch_state) - {"step"}
        for name, value in st.items():
            _close(value, torch_state[TORCH_STATE_NAMES[name]].reshape(value.shape),
                   f"state {TORCH_STATE_NAMES[name]} after step {t}")
    return p_r


@pytest.mark.parametrize("shape_id", list(ADAFACTOR_SHAPES))
@pytest.mark.parametrize("config", list(TORCH_ADAFACTOR_CONFIGS))
def test_torch_adafactor_matches_torch(config, shape_id):
    shape = ADAFACTOR_SHAPES[shape_id]
    seed = 5500 + 97 * list(TORCH_ADAFACTOR_CONFIGS).index(config) + list(ADAFACTOR_SHAPES).index(shape_id)
    _run_torch_adafactor(config, shape, _rng(seed))


@pytest.mark.parametrize("config,plain", [("eps1-clamps", "eps1-tiny"), ("wd", "defaults"),
                                          ("maximize", "defaults"), ("eps2-large", "defaults"),
                                          ("beta2_decay-0.5-d2", "defaults")])
def test_torch_adafactor_options_are_exercised(config, plain):
    """Each option the configurations above set changes the result on the test data (the
    clamps bite, the decay decays...), so that the matches above mean something."""
    shape = (16, 24)
    ours = _run_torch_adafactor(config, shape, _rng(5900), oracle=False)
    base = _run_torch_adafactor(plain, shape, _rng(5900), oracle=False)
    assert not np.allclose(ours, base, rtol=1e-4, atol=1e-5)


def test_torch_adafactor_with_an_underflowing_eps1_gives_nan_as_torch():
    """ε1 = 1e-30 (transformers' default): ε1² rounds to 0 in float32, so an exactly zero
    gradient makes U = 0/0 = NaN, in torch and in the reference alike (the same elements)."""
    shape = (4, 3)
    p_t = torch.nn.Parameter(torch.ones(shape))
    p_r = np.ones(shape, np.float32)
    g = np.zeros(shape, np.float32)
    g[0, 0] = 1.0
    opt = torch.optim.Adafactor([p_t], eps=(1e-30, 1e-3))
    _feed(p_t, g)
    opt.step()
    with np.errstate(all="ignore"):
        torch_adafactor.torch_adafactor(p_r, g, _adafactor_state(shape, None), step=1, eps1=1e-30)
    expected = p_t.detach().numpy()
    assert np.isnan(expected).any()
    np.testing.assert_array_equal(np.isnan(p_r), np.isnan(expected))
    _close(p_r, p_t, "param")


def test_torch_adafactor_differs_from_transformers_with_weight_decay():
    """With λ ≠ 0 the two Adafactors part (decay λ·lr vs λ·α); at λ = 0 they agree up to
    ε1 handling (test_adafactor_matches_torch)."""
    shape = (16, 24)
    rng = _rng(5901)
    theta, grads = _randn(rng, shape), [_randn(rng, shape) for _ in range(10)]
    a, b = theta.copy(), theta.copy()
    sa, sb = _adafactor_state(shape, None), _adafactor_state(shape, None)
    for t, g in enumerate(grads, start=1):
        torch_adafactor.torch_adafactor(a, g, sa, step=t, weight_decay=0.5)
        adafactor.adafactor(b, g, sb, step=t, weight_decay=0.5)
    assert not np.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_adafactor_factoring_follows_ndim():
    assert not adafactor.is_factored((37,))
    assert not adafactor.is_factored(())
    for shape in [(16, 24), (6, 8, 10), (8, 4, 3, 3), (1, 1), (24, 1)]:
        assert adafactor.is_factored(shape)


# ----------------------------------------------------------------------------- Lion


LION_CASES = [
    # id, shape, lr0, betas, weight decay λ, decoupled (λ/lr₀ scaled by lr_t), schedule, maximize
    ("plain-2d", (16, 24), 1e-4, (0.9, 0.99), 0.0, False, "constant", False),
    ("wd-1d", (37,), 3e-4, (0.9, 0.99), 1.0, False, "constant", False),
    ("wd-cosine-4d", (8, 4, 3, 3), 1e-3, (0.95, 0.98), 0.1, False, "cosine", False),
    ("decoupled-step-3d", (6, 8, 10), 1e-3, (0.9, 0.99), 1e-2, True, "step", False),
    ("maximize-wd-2d", (16, 24), 1e-3, (0.9, 0.99), 0.1, False, "cosine", True),
    ("betas-0-1-0d", (), 1e-3, (0.0, 1.0), 0.1, True, "constant", False),
    ("wd-24x1", (24, 1), 1e-3, (0.8, 0.999), 0.3, False, "step", False),
]


@pytest.mark.parametrize("case", LION_CASES, ids=[c[0] for c in LION_CASES])
def test_lion_matches_lion_pytorch(case):
    """lion_pytorch has no maximize: its oracle then minimises the negated gradient."""
    from lion_pytorch import Lion

    _, shape, lr0, (b1, b2), wd, decoupled, sched, maximize = case
    rng = _rng(9000 + LION_CASES.index(case))
    p_t, p_r = _new_param(rng, shape)
    opt = Lion([p_t], lr=lr0, betas=(b1, b2), weight_decay=wd, decoupled_weight_decay=decoupled)
    st = {"exp_avg": np.zeros(shape, np.float32)}
    mode = DecayMode.SCHEDULE if decoupled else DecayMode.LR
    for t in range(1, STEPS + 1):
        lr_t = SCHEDULES[sched](lr0, t)
        opt.param_groups[0]["lr"] = lr_t
        g = _randn(rng, shape)
        g_r = _feed(p_t, -g if maximize else g)
        opt.step()
        lion.lion(p_r, -g_r if maximize else g_r, st, lr=lr_t, beta1=b1, beta2=b2,
                  weight_decay=wd, weight_decay_mode=mode, initial_lr=lr0, maximize=maximize)
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg",), t)


def test_lion_updates_every_coordinate_by_lr():
    """Without decay, each coordinate moves by exactly lr (or 0 where the sign is 0): the
    update norm is lr·√(nonzeros)."""
    rng = _rng(9100)
    p = _randn(rng, (64,))
    before, g = p.copy(), _randn(rng, (64,))
    g[:8] = 0.0
    lion.lion(p, g, {"exp_avg": np.zeros(64, np.float32)}, lr=2.0 ** -10, beta1=0.9, beta2=0.99,
              weight_decay=0.0)
    moved = np.abs(p.astype(np.float64) - before)
    assert (moved[:8] == 0).all()
    np.testing.assert_allclose(moved[8:], 2.0 ** -10, rtol=1e-6)


# ----------------------------------------------------------------------------- registry records


def _hyper(optimizer: str, n: int = 1, initial_lr: float | None = None, **group) -> Hyper:
    """The Hyper of n tensors in one group, from torch-named values through the API's wire
    form (group_to_proto), as a shard builds it."""
    g = {**REGISTRY[optimizer].defaults, **group}
    h = group_to_proto(optimizer, g, initial_lr or g["lr"] or 0.0)
    return Hyper.from_groups([h], np.zeros(n, int))


def test_registered_adamw_schedule_mode_matches_torch():
    """The record's reference takes weight_decay_mode and lr₀ from the wire form."""
    shape, lr0, wd = (16, 24), 1e-2, 1e-2
    rng = _rng(6001)
    p_t, p_r = _new_param(rng, shape)
    opt = torch.optim.AdamW([p_t], lr=lr0, weight_decay=wd / lr0, foreach=False)
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    for t in range(1, 21):
        lr_t = _cosine_lr(lr0, t, 20)
        opt.param_groups[0]["lr"] = lr_t
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        h = _hyper("adamw", lr=lr_t, weight_decay=wd, weight_decay_mode="schedule", initial_lr=lr0)
        assert KERNELS["adamw"].reference(p_r, g_r, st, t, h.at(0)) == {}
        _close(p_r, p_t, f"param after step {t}")


def test_registered_keras_eps_matches_keras():
    """The records' references take eps_mode from the wire form."""
    shape, lr, wd = (16, 24), 1e-2, 0.1
    for optimizer in ("adamw", "adam"):
        rng = _rng(6002)
        p_t, p_r = _new_param(rng, shape)
        opt = KerasAdam([p_t], decoupled=optimizer == "adamw", lr=lr, eps=1e-3, weight_decay=wd)
        st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
        h = _hyper(optimizer, lr=lr, eps=1e-3, weight_decay=wd, eps_mode="keras")
        for t in range(1, 21):
            g_r = _feed(p_t, _small_shrinking_grad(rng, shape, t))
            opt.step()
            assert KERNELS[optimizer].reference(p_r, g_r, st, t, h.at(0)) == {}
            _close(p_r, p_t, f"{optimizer}: param after step {t}")


def test_registered_adafactor_matches_transformers():
    from transformers.optimization import Adafactor

    shape = (16, 24)
    rng = _rng(6002)
    p_t, p_r = _new_param(rng, shape)
    opt = Adafactor([p_t], beta1=0.9, clip_threshold=0.5, weight_decay=0.1)
    st = _adafactor_state(shape, 0.9)
    h = _hyper("adafactor", beta1=0.9, clip_threshold=0.5, weight_decay=0.1).at(0)
    for t in range(1, 21):
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        reports = KERNELS["adafactor"].reference(p_r, g_r, st, t, h)
        assert set(reports) == {Report.CLIP} and reports[Report.CLIP] >= 1.0
        _close(p_r, p_t, f"param after step {t}")


def test_registered_torch_adafactor_matches_torch():
    """The record's reference reads torch's arguments from the wire form: beta2_decay as
    decay_rate, d as clip_threshold, ε1 = None as float32's epsilon."""
    shape = (6, 8, 10)
    rng = _rng(6004)
    p_t, p_r = _new_param(rng, shape)
    kwargs = dict(lr=3e-2, beta2_decay=-0.6, eps=(None, 1e-2), d=1.3, weight_decay=0.2,
                  maximize=True)
    opt = torch.optim.Adafactor([p_t], **kwargs)
    st = _adafactor_state(shape, None)
    h = _hyper("torch_adafactor", **kwargs).at(0)
    assert h.eps == torch.finfo(torch.float32).eps
    for t in range(1, 21):
        g_r = _feed(p_t, _randn(rng, shape))
        opt.step()
        reports = KERNELS["torch_adafactor"].reference(p_r, g_r, st, t, h)
        assert set(reports) == {Report.CLIP} and reports[Report.CLIP] >= 1.0
        _close(p_r, p_t, f"param after step {t}")


def test_registered_adamp_reports_projection():
    from adamp import AdamP

    shape = (16, 32)
    rng = _rng(6003)
    p_t, p_r = _new_param(rng, shape)
    opt = AdamP([p_t], lr=1e-2, weight_decay=0.1, nesterov=True)
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    h = _hyper("adamp", lr=1e-2, weight_decay=0.1, nesterov=True).at(0)
    for t in range(1, 21):
        g = _orthogonal_rows(_randn(rng, shape), p_t.detach().numpy())
        g_r = _feed(p_t, g)
        opt.step()
        assert KERNELS["adamp"].reference(p_r, g_r, st, t, h) == {Report.PROJECTED: True}
        _close(p_r, p_t, f"param after step {t}")


# ----------------------------------------------------------------------------- the reference backend


def test_step_over_flat_buffers_matches_per_tensor_oracles():
    """`reference.step` over a multi-tensor flat layout, with per-tensor hyperparameters,
    per-tensor step counts and an inactive tensor, equals one oracle per tensor.

    Tensors: 0, 1 AdamW (lr mode; schedule mode with its own lr₀), 2 AdamW fixed mode, each
    with its own lr; tensor 1 is skipped on every third step (its step count lags)."""
    shapes = [(16, 24), (37,), (4, 3, 5)]
    lr0s, wds, modes = [1e-2, 3e-3, 1e-2], [0.1, 1e-2, 1e-2], ["lr", "schedule", "fixed"]
    layout = FlatLayout(shapes, [{"exp_avg": s, "exp_avg_sq": s} for s in shapes])
    state = FlatState.zeros(layout)
    rng = _rng(7001)
    oracles = []
    for i, s in enumerate(shapes):
        p_t, p_r = _new_param(rng, s)
        layout.param_view(state.param, i)[...] = p_r
        torch_wd = wds[i] if modes[i] == "lr" else wds[i] / lr0s[i]
        oracles.append((p_t, torch.optim.AdamW([p_t], lr=lr0s[i], weight_decay=torch_wd,
                                               foreach=False)))
    for t in range(1, 31):
        active = np.array([True, t % 3 != 0, True])
        grad = np.full(layout.numel, np.nan, np.float32)   # inactive segments must not be read
        lrs = [_cosine_lr(lr0s[0], t, 30), _cosine_lr(lr0s[1], t, 30), lr0s[2]]
        for i, (p_t, opt) in enumerate(oracles):
            if not active[i]:
                continue
            g = _randn(rng, shapes[i])
            layout.param_view(grad, i)[...] = _feed(p_t, g)
            opt.param_groups[0]["lr"] = lrs[i]
            opt.step()
        state.steps[active] += 1
        groups = [group_to_proto("adamw", {**REGISTRY["adamw"].defaults, "lr": lrs[i],
                                           "weight_decay": wds[i], "weight_decay_mode": modes[i]},
                                 lr0s[i]) for i in range(3)]
        out = reference.step("adamw", layout, state, grad, active, Hyper.from_groups(groups, [0, 1, 2]))
        assert out.reports == {}
        for i, (p_t, opt) in enumerate(oracles):
            _close(layout.param_view(state.param, i), p_t, f"tensor {i} after step {t}")
            for name in ("exp_avg", "exp_avg_sq"):
                _close(layout.field_view(state, name, i), opt.state[p_t][name],
                       f"tensor {i} {name} after step {t}")
    assert list(state.steps) == [30, 20, 30]


def test_step_over_flat_buffers_adafactor_and_adamp():
    """The reference backend with per-tensor state fields that differ in kind (factored vs
    not) and with AdamP's projection reported per tensor."""
    from adamp import AdamP
    from transformers.optimization import Adafactor

    # Adafactor: a factored matrix, a vector, a 3-D tensor.
    shapes = [(16, 24), (37,), (6, 8, 10)]
    fields = [_adafactor_state(s, None) for s in shapes]
    layout = FlatLayout(shapes, [{k: v.shape for k, v in f.items()} for f in fields])
    state = FlatState.zeros(layout)
    rng = _rng(7002)
    oracles = []
    for i, s in enumerate(shapes):
        p_t, p_r = _new_param(rng, s)
        layout.param_view(state.param, i)[...] = p_r
        oracles.append((p_t, Adafactor([p_t], clip_threshold=0.5, weight_decay=0.1)))
    active = np.ones(3, bool)
    hyper = _hyper("adafactor", 3, clip_threshold=0.5, weight_decay=0.1)
    for t in range(1, 21):
        grad = np.empty(layout.numel, np.float32)
        for i, (p_t, opt) in enumerate(oracles):
            layout.param_view(grad, i)[...] = _feed(p_t, _randn(rng, shapes[i]))
            opt.step()
        state.steps += 1
        out = reference.step("adafactor", layout, state, grad, active, hyper)
        assert set(out.reports) == {Report.CLIP} and (out.reports[Report.CLIP] >= 1.0).all()
        for i, (p_t, opt) in enumerate(oracles):
            _close(layout.param_view(state.param, i), p_t, f"tensor {i} after step {t}")
            for name in layout.field_shapes[i]:
                _close(layout.field_view(state, name, i), opt.state[p_t][name],
                       f"tensor {i} {name} after step {t}")

    # AdamP: tensor 0 gets row-orthogonal gradients (projected), tensor 1 aligned ones (not),
    # tensor 2 is a vector (never).
    shapes = [(16, 32), (8, 4, 3, 3), (37,)]
    layout = FlatLayout(shapes, [{"exp_avg": s, "exp_avg_sq": s} for s in shapes])
    state = FlatState.zeros(layout)
    rng = _rng(7003)
    oracles = []
    for i, s in enumerate(shapes):
        p_t, p_r = _new_param(rng, s)
        layout.param_view(state.param, i)[...] = p_r
        oracles.append((p_t, AdamP([p_t], lr=1e-2, weight_decay=0.1, nesterov=True)))
    hyper = _hyper("adamp", 3, lr=1e-2, weight_decay=0.1, nesterov=True)
    kinds = [_orthogonal_rows, _aligned, lambda g, p: g]
    for t in range(1, 21):
        grad = np.empty(layout.numel, np.float32)
        for i, (p_t, opt) in enumerate(oracles):
            g = kinds[i](_randn(rng, shapes[i]), p_t.detach().numpy())
            layout.param_view(grad, i)[...] = _feed(p_t, g)
            opt.step()
        state.steps += 1
        out = reference.step("adamp", layout, state, grad, active, hyper)
        assert out.reports[Report.PROJECTED].tolist() == [True, False, False]
        for i, (p_t, opt) in enumerate(oracles):
            _close(layout.param_view(state.param, i), p_t, f"tensor {i} after step {t}")


# ----------------------------------------------------------------------------- exact zeros


def _zero_masked(rng, shape) -> np.ndarray:
    """A gradient with EXACT zeros: row 0 and column 0 (of the last two dims) every step, plus
    ~20% scattered zeros. Exact zeros are deterministic (no rounding noise, unlike the trap of
    docs/optimizers.md): both sides must leave those moments at 0 (Adam) or at the ε1 floor
    (Adafactor), and a missing ε1 shows up as 0/0."""
    g = _randn(rng, shape)
    g[rng.random(shape) < 0.2] = 0.0
    if len(shape) >= 2:
        g[..., 0, :] = 0.0
        g[..., :, 0] = 0.0
    elif len(shape) == 1:
        g[:5] = 0.0
    return g


@pytest.mark.parametrize("shape_id", ["1d", "2d", "3d"])
@pytest.mark.parametrize("config", ["defaults", "beta1", "explicit-lr-noscale", "wd0.1"])
def test_adafactor_exact_zero_gradients(config, shape_id):
    from transformers.optimization import Adafactor

    shape = SHAPES_ND[shape_id]
    hf_kwargs = ADAFACTOR_CONFIGS[config]
    rng = _rng(8000 + 11 * list(ADAFACTOR_CONFIGS).index(config) + list(SHAPES_ND).index(shape_id))
    p_t, p_r = _new_param(rng, shape)
    opt = Adafactor([p_t], **hf_kwargs)
    kw = _ref_adafactor_kwargs(hf_kwargs)
    st = _adafactor_state(shape, kw.get("beta1"))
    for t in range(1, 21):
        g_r = _feed(p_t, _zero_masked(rng, shape))
        opt.step()
        adafactor.adafactor(p_r, g_r, st, step=t, **kw)
        assert np.isfinite(p_r).all()
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], sorted(st), t)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "adamp"])
def test_adam_family_exact_zero_gradients(optimizer):
    from adamp import AdamP

    shape, lr, wd = (16, 24), 1e-2, 0.1
    rng = _rng(8100 + ["adamw", "adam", "adamp"].index(optimizer))
    p_t, p_r = _new_param(rng, shape)
    oracle = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "adamp": AdamP}[optimizer]
    extra = {} if optimizer == "adamp" else {"foreach": False}
    opt = oracle([p_t], lr=lr, weight_decay=wd, **extra)
    fn = {"adamw": adam.adamw, "adam": adam.adam, "adamp": adamp.adamp}[optimizer]
    st = {"exp_avg": np.zeros(shape, np.float32), "exp_avg_sq": np.zeros(shape, np.float32)}
    for t in range(1, 21):
        g_r = _feed(p_t, _zero_masked(rng, shape))
        opt.step()
        fn(p_r, g_r, st, step=t, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)
        _close(p_r, p_t, f"param after step {t}")
        _compare_state(st, opt.state[p_t], ("exp_avg", "exp_avg_sq"), t)


def test_every_registered_optimizer_has_an_oracle_test():
    """A registered optimizer without a test against an independent implementation here
    fails this test (the kernels' parity tests only compare with the reference)."""
    oracle_tests = {"adamw": test_adamw_matches_torch, "adam": test_adam_coupled_l2_matches_torch,
                    "adamp": test_adamp_matches_package,
                    "adafactor": test_adafactor_matches_transformers,
                    "torch_adafactor": test_torch_adafactor_matches_torch,
                    "lion": test_lion_matches_lion_pytorch}
    assert set(oracle_tests) == set(REGISTRY) == set(KERNELS)
