"""Every fast backend against the NumPy reference, for every registered optimizer.

One parity body runs over backend x case: the numba CPU backend with three tilings (the
default, where big tensors span several tiles; tiny tiles, where rows, columns and batches
get split the way they only are for big tensors; one tile per tensor, where row and column
sums need no combining), the CUDA kernels on the host emulation, and the CUDA kernels on a
real GPU (skipped, with its reason, where there is none).

Each case runs a few steps of the reference and the backend on copies of one job: tensors
of many shapes (size 1, odd sizes, sizes that are not multiples of a tile, 0-D to 4-D), two
parameter groups with different hyperparameters, some tensors with zero gradients and some
inactive; it compares θ, every state field, the reports and the step sums after every step,
and checks that inactive tensors stay bit-for-bit untouched. A third copy steps with
sums=False and must come out bit-for-bit equal to the sums=True copy.
"""
from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from optserve.kernels import FlatLayout, FlatState, Hyper, Report, cpu, cpu_tiles, cuda, reference
from optserve.kernels.backend import SUM_NAMES
from optserve.kernels.registry import KERNELS
from optserve.proto.optimizers import REGISTRY, group_to_proto

SHAPES = [(1,), (7,), (1, 1), (5, 3), (33, 17), (3, 4, 5), (2, 3, 4, 5), (4, 1), (300, 301),
          (2, 70001), (129,), ()]
ZERO_GRAD = {3, 7}      # (5, 3) and (4, 1): all-zero gradients
INACTIVE = {2, 6}       # never stepped: must stay bit-for-bit untouched
TOGGLED = 10            # active on even steps only, so step counts differ between tensors
STEPS = 5
RTOL = 1e-6
# Absolute slack, relative to the largest element of the same tensor and field: a few float32
# ulps. Reductions accumulate in float64 in the fast paths and in float32 in the reference,
# so an input can differ by an ulp, and an EMA that nearly cancels (m = β1·m + (1−β1)·u)
# turns that into a large relative error on a near-zero element.
ATOL_SCALED = 1e-6


@dataclass
class Case:
    optimizer: str
    groups: tuple[dict, dict]          # overrides of REGISTRY defaults for groups 0 and 1
    grad: str = "random"               # random | orthogonal | layer | parallel (AdamP)
    initial_lr_scale: float = 1.0      # initial_lr = lr * this (weight_decay_mode="schedule")
    expect_projected: bool | None = None  # AdamP: every active ndim > 1 tensor is (not) projected


CASES = {
    "adamw-lr": Case("adamw", ({"weight_decay": 0.1, "lr": 1e-2}, {"weight_decay": 0.0, "lr": 3e-3})),
    "adamw-schedule": Case("adamw", ({"weight_decay_mode": "schedule", "weight_decay": 0.05},
                                     {"weight_decay_mode": "lr", "betas": (0.8, 0.99)}),
                           initial_lr_scale=2.0),
    "adamw-fixed": Case("adamw", ({"weight_decay_mode": "fixed", "weight_decay": 0.01},
                                  {"weight_decay": 0.2, "eps": 1e-6})),
    "adamw-maximize": Case("adamw", ({"maximize": True, "weight_decay": 0.1}, {"maximize": False})),
    "adam-l2": Case("adam", ({"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 1e-2})),
    "adam-maximize": Case("adam", ({"maximize": True, "weight_decay": 0.01}, {"betas": (0.5, 0.9)})),
    # AMSGrad in one group only: tensors with and without a max_exp_avg_sq in one job
    "adamw-amsgrad": Case("adamw", ({"amsgrad": True, "weight_decay": 0.1},
                                    {"maximize": True, "lr": 1e-2})),
    "adam-amsgrad-maximize": Case("adam", ({"amsgrad": True, "maximize": True, "weight_decay": 0.01},
                                           {"amsgrad": True, "lr": 1e-2, "betas": (0.5, 0.9)})),
    # Keras's ε̂ in one group and torch's ε in the other, then in both with AMSGrad in one
    "adamw-keras-eps": Case("adamw", ({"eps_mode": "keras", "eps": 1e-3, "weight_decay": 0.1},
                                      {"eps_mode": "torch", "eps": 1e-3, "maximize": True})),
    "adam-keras-amsgrad": Case("adam", ({"eps_mode": "keras", "amsgrad": True, "maximize": True,
                                         "weight_decay": 0.01},
                                        {"eps_mode": "keras", "eps": 1e-3, "lr": 1e-2})),
    "adamp-random": Case("adamp", ({"nesterov": False}, {"nesterov": True, "weight_decay": 0.1})),
    "adamp-orthogonal": Case("adamp", ({"nesterov": False}, {"nesterov": True}), "orthogonal",
                             expect_projected=True),
    "adamp-orthogonal-wd": Case("adamp", ({"weight_decay": 0.1, "wd_ratio": 0.2},
                                          {"weight_decay": 0.01, "nesterov": True}), "orthogonal",
                                expect_projected=True),
    "adamp-layer": Case("adamp", ({"weight_decay": 0.1}, {"nesterov": True, "delta": 0.2}), "layer"),
    "adamp-parallel": Case("adamp", ({"weight_decay": 0.1}, {"nesterov": True}), "parallel",
                           expect_projected=False),
    "adafactor-defaults": Case("adafactor", ({}, {"scale_parameter": False})),
    "adafactor-warmup": Case("adafactor", ({"warmup_init": True}, {"warmup_init": True,
                                                                   "scale_parameter": False})),
    "adafactor-lr": Case("adafactor", ({"lr": 1e-2, "relative_step": False},
                                       {"lr": 3e-3, "relative_step": False, "scale_parameter": False})),
    "adafactor-beta1": Case("adafactor", ({"beta1": 0.9}, {})),
    "adafactor-clip": Case("adafactor", ({"clip_threshold": 0.5}, {"clip_threshold": 100.0})),
    "adafactor-weight-decay": Case("adafactor", ({"weight_decay": 0.1},
                                                 {"weight_decay": 0.01, "beta1": 0.5, "lr": 1e-2,
                                                  "relative_step": False, "decay_rate": -0.5})),
    "torch-adafactor-defaults": Case("torch_adafactor", ({}, {"lr": 3e-3})),
    "torch-adafactor-wd-maximize": Case("torch_adafactor", ({"weight_decay": 0.1, "maximize": True},
                                                            {"weight_decay": 0.01, "d": 2.0,
                                                             "beta2_decay": -0.5})),
    # ε1 large enough that max(mean(R), ε1) and max(V, ε1²) bite on the small gradients
    "torch-adafactor-eps": Case("torch_adafactor", ({"eps": (0.05, 1e-3)},
                                                    {"eps": (1e-20, 0.1), "lr": 0.1})),
    "lion-lr": Case("lion", ({"weight_decay": 0.1, "lr": 1e-3}, {"weight_decay": 0.0, "betas": (0.95, 0.98)})),
    "lion-schedule-maximize": Case("lion", ({"weight_decay_mode": "schedule", "weight_decay": 0.5,
                                             "maximize": True},
                                            {"weight_decay_mode": "fixed", "weight_decay": 0.01}),
                                   initial_lr_scale=2.0),
}


def test_every_registered_optimizer_has_a_case():
    assert {c.optimizer for c in CASES.values()} == set(KERNELS)


# ---- the backends ------------------------------------------------------------------------------

CPU_TILINGS = {"cpu": {}, "cpu-tiny-tiles": {"TILE": 37, "FACTORED_MIN_ROWS": 4},
               "cpu-one-tile": {"TILE": 1 << 30}}
CUDA_RUNTIMES = {"cuda-emulated": "emulated_cuda", "cuda-gpu": "gpu_cuda"}


@pytest.fixture(params=[*CPU_TILINGS, *CUDA_RUNTIMES])
def backend(request, monkeypatch):
    """A fast backend, ready to step."""
    if request.param in CPU_TILINGS:
        for name, value in CPU_TILINGS[request.param].items():
            monkeypatch.setattr(cpu_tiles, name, value)
        return cpu
    request.getfixturevalue(CUDA_RUNTIMES[request.param])
    return cuda


@pytest.fixture(params=list(CUDA_RUNTIMES))
def cuda_backend(request):
    """The CUDA backend on each of its runtimes."""
    request.getfixturevalue(CUDA_RUNTIMES[request.param])
    return cuda


# ---- one job, its gradients, its comparisons ---------------------------------------------------

def make_job(case_name: str, shapes=SHAPES):
    """(case, rng, hyper, layout, state): the case's job with random parameters."""
    case = CASES[case_name]
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    group_of = np.arange(len(shapes)) % 2
    protos = []
    for overrides in case.groups:
        group = {**REGISTRY[case.optimizer].defaults, **overrides}
        lr = group["lr"] or 1e-2
        protos.append(group_to_proto(case.optimizer, group, initial_lr=lr * case.initial_lr_scale))
    info = REGISTRY[case.optimizer]
    layout = FlatLayout(shapes, [info.state_fields(s, protos[g]) for s, g in zip(shapes, group_of)])
    state = FlatState.zeros(layout)
    state.param[:] = rng.standard_normal(layout.numel).astype(np.float32)
    return case, rng, Hyper.from_groups(protos, group_of), layout, state


def make_grad(kind: str, layout: FlatLayout, param: np.ndarray, rng) -> np.ndarray:
    """A gradient for every tensor; for AdamP, shaped against the current θ by channel row."""
    grad = np.empty_like(param)
    for i, shape in enumerate(layout.shapes):
        p = layout.param_view(param, i).astype(np.float64)
        g = rng.standard_normal(shape) * 10 ** rng.uniform(-2, 1)
        if kind != "random" and len(shape) > 1:
            rows_p, rows_g = p.reshape(shape[0], -1), g.reshape(shape[0], -1)
            if kind == "parallel":
                rows_g[:] = 0.5 * rows_p + 1e-3 * rows_g
            else:  # orthogonal to θ in every channel row
                rows_g -= (rows_g * rows_p).sum(1, keepdims=True) / (rows_p * rows_p).sum(
                    1, keepdims=True) * rows_p
                if kind == "layer":  # one parallel row: the channel test fails, the layer test passes
                    rows_g[0] = 1e-5 * rows_p[0]
        if i in ZERO_GRAD:
            g[...] = 0.0
        layout.param_view(grad, i)[...] = g
    return grad


def segments(layout: FlatLayout, state: FlatState, i: int) -> dict[str, np.ndarray]:
    out = {"param": layout.param_view(state.param, i)}
    out.update({name: layout.field_view(state, name, i) for name in layout.field_shapes[i]})
    return out


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32).copy()


def assert_sums_close(got, want, what: str) -> None:
    """The float64 step sums (w2 = ‖w‖², wdw = ⟨w, Δw⟩, dw2 = ‖Δw‖², g2 = ‖g‖²). Δw is a
    difference of float32 parameters, so an ulp of w in either implementation moves wdw
    and dw2 by up to about ulp·‖w‖·‖Δw‖; and an element of w_{t+1} one float32 ulp away
    moves wdw by up to 2^-23·‖w‖², which matters only where wdw is itself that small: a
    projected AdamP tensor, whose Δw is orthogonal to w by construction (the CUDA kernels
    form its radial term in float64, the reference in float32)."""
    cross = np.sqrt(want.w2 * want.dw2)
    for name in SUM_NAMES:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == np.float64, name
        slack = ATOL_SCALED * cross if name in ("wdw", "dw2") else 0.0
        if name == "wdw":
            slack = np.maximum(slack, 2.0 ** -23 * want.w2)
        bad = np.abs(g - w) > slack + RTOL * np.abs(w)
        assert not bad.any(), (what, name, np.flatnonzero(bad), g[bad], w[bad])


def assert_reports_equal(got, want, what: str) -> None:
    assert got.reports.keys() == want.reports.keys(), what
    for report, expected in want.reports.items():
        assert got.reports[report].dtype == expected.dtype, (what, report)
        if report is Report.PROJECTED:
            np.testing.assert_array_equal(got.reports[report], expected, err_msg=what)
        else:
            np.testing.assert_allclose(got.reports[report], expected, rtol=RTOL, err_msg=what)


def assert_lean_identical(lean: FlatState, full: FlatState, lean_out, full_out, what: str) -> None:
    """A step with sums=False (lean) against the same step with sums=True (full): the same
    bits in θ and every state field, the same reports, and no step sums."""
    assert lean_out.sums is None and full_out.sums is not None, what
    assert_reports_equal(lean_out, full_out, what)
    np.testing.assert_array_equal(bits(lean.param), bits(full.param), err_msg=f"{what}, param")
    assert lean.fields.keys() == full.fields.keys()
    for name in full.fields:
        np.testing.assert_array_equal(bits(lean.fields[name]), bits(full.fields[name]),
                                      err_msg=f"{what}, {name}")


def _wire(grad: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the backend gets, its float32 value for the reference)."""
    if dtype == "bfloat16":   # bf16 bits; the reference gets the same values
        wire = (grad.view(np.uint32) >> 16).astype(np.uint16)
        return wire, (wire.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        wire = grad.astype(np.float16)
        return wire, wire.astype(np.float32)
    return grad, grad


def run_parity(backend, case_name: str, *, device_state: bool = False,
               grad_dtype: str = "float32", steps: int = STEPS) -> None:
    """The reference and `backend` step copies of the case's job side by side."""
    case, rng, hyper, layout, ref = make_job(case_name)
    on_device = cuda.to_device if device_state else FlatState.copy
    on_host = cuda.to_host if device_state else (lambda s: s)
    fast, lean = on_device(ref), on_device(ref)
    frozen = {i: {k: bits(v) for k, v in segments(layout, ref, i).items()} for i in INACTIVE}
    for t in range(steps):
        what = f"{case_name} step {t}"
        active = np.array([i not in INACTIVE and (i != TOGGLED or t % 2 == 0)
                           for i in range(len(SHAPES))])
        wire, grad = _wire(make_grad(case.grad, layout, ref.param, rng), grad_dtype)
        for st in (ref, fast, lean):
            st.steps[active] += 1
        want = reference.step(case.optimizer, layout, ref, grad.copy(), active, hyper)
        got = backend.step(case.optimizer, layout, fast, wire.copy(), active, hyper)
        lean_got = backend.step(case.optimizer, layout, lean, wire.copy(), active, hyper, sums=False)
        host = on_host(fast)
        assert_lean_identical(on_host(lean), host, lean_got, got, f"{what}, sums=False")
        assert_reports_equal(got, want, what)
        assert_sums_close(got.sums, want.sums, what)
        if case.expect_projected is not None:  # the case does what it is meant to
            multi = np.array([len(s) > 1 for s in SHAPES]) & active
            multi[list(ZERO_GRAD)] = False  # a zero gradient has cosine 0: always projected
            assert (want.reports[Report.PROJECTED][multi] == case.expect_projected).all()
        for i in range(len(SHAPES)):
            seg_got, seg_want = segments(layout, host, i), segments(layout, ref, i)
            for name, expected in seg_want.items():
                scale = float(np.abs(expected).max(initial=0.0))
                np.testing.assert_allclose(seg_got[name], expected, rtol=RTOL,
                                           atol=ATOL_SCALED * scale,
                                           err_msg=f"{what}, tensor {i} {SHAPES[i]}, {name}")
    host = on_host(fast)
    np.testing.assert_array_equal(host.steps, ref.steps)
    for i, fields in frozen.items():
        for name, frozen_bits in fields.items():
            np.testing.assert_array_equal(bits(segments(layout, host, i)[name]), frozen_bits,
                                          err_msg=f"inactive tensor {i}, {name}")


# ---- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case_name", list(CASES))
def test_backend_matches_reference(backend, case_name):
    run_parity(backend, case_name)


@pytest.mark.parametrize("case_name", ["adamw-lr", "adamw-amsgrad", "adamp-orthogonal",
                                       "adafactor-beta1", "torch-adafactor-wd-maximize", "lion-lr"])
def test_cuda_device_resident_state(cuda_backend, case_name):
    """State kept as device arrays (what a shard would hold) steps the same."""
    run_parity(cuda_backend, case_name, device_state=True, steps=3)


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case_name", ["adamw-maximize", "adamp-random", "adafactor-defaults",
                                       "torch-adafactor-eps", "lion-schedule-maximize"])
def test_cuda_16bit_gradients(cuda_backend, case_name, grad_dtype):
    """bf16 bits / fp16 gradients are widened exactly: the same result as their float32 values."""
    run_parity(cuda_backend, case_name, grad_dtype=grad_dtype, steps=2)


def test_a_missing_barrier_fails_the_parity_test(emulated_cuda):
    """The emulation shuffles the order of a block's threads and poisons shared memory per
    block, so that a race shows: without the __syncthreads after adamp_decide's thread 0
    writes the projection mode to shared memory, AdamP's parity test fails (as it would,
    now and then, on a GPU)."""
    from optserve.kernels.cuda_runtime import CupyRuntime
    source = cuda.source()
    planted = source.replace("mode_sh = mode;\n        }\n        __syncthreads();",
                             "mode_sh = mode;\n        }")
    assert planted != source
    previous = cuda.use_runtime(CupyRuntime(planted))
    try:
        with pytest.raises(AssertionError, match="Mismatch"):   # wrong numbers, not a crash
            run_parity(cuda, "adamp-orthogonal", steps=1)
    finally:
        cuda.use_runtime(previous)


@pytest.mark.parametrize("case_name", list(CASES))
def test_reference_without_sums_is_bit_identical(case_name):
    """reference.step(sums=False) steps exactly as with sums=True, and returns no sums."""
    case, rng, hyper, layout, full = make_job(case_name)
    lean = full.copy()
    for t in range(2):
        active = np.array([i not in INACTIVE for i in range(len(SHAPES))])
        grad = make_grad(case.grad, layout, full.param, rng)
        for st in (full, lean):
            st.steps[active] += 1
        full_out = reference.step(case.optimizer, layout, full, grad.copy(), active, hyper)
        lean_out = reference.step(case.optimizer, layout, lean, grad.copy(), active, hyper,
                                  sums=False)
        assert_lean_identical(lean, full, lean_out, full_out, f"step {t}")


def test_adamp_projection_paths_are_exercised():
    """The AdamP cases cover a channel projection, a layer projection and no projection."""
    _, rng, hyper, layout, state = make_job("adamp-layer", [(33, 17), (6, 9)])
    hyper = Hyper.from_groups([group_to_proto("adamp", {**REGISTRY["adamp"].defaults,
                                                        "weight_decay": 0.1}, 1e-3)], [0, 0])
    state.steps[:] = 1
    active = np.ones(2, bool)
    for kind, expected in [("orthogonal", True), ("layer", True), ("parallel", False)]:
        grad = make_grad(kind, layout, state.param, rng)
        got = cpu.step("adamp", layout, state.copy(), grad, active, hyper)
        assert got.reports[Report.PROJECTED].tolist() == [expected] * 2, kind
    # The layer case really fails the channel test (one row is parallel to θ).
    grad = make_grad("layer", layout, state.param, rng)
    p, g = (layout.param_view(x, 0).reshape(33, -1).astype(np.float64) for x in (state.param, grad))
    cos = np.abs((p * g).sum(1)) / np.linalg.norm(p, axis=1) / np.linalg.norm(g, axis=1)
    assert cos.max() > hyper.delta[0] / math.sqrt(17)


def _calls_for(optimizer: str, n_tensors: int, step, sums: bool = True) -> None:
    """One step of a job of 3·n_tensors small tensors; AdamP takes the case that always
    projects (its projected path has one more kernel)."""
    case_name = next(k for k, c in CASES.items() if c.optimizer == optimizer
                     and (optimizer != "adamp" or c.expect_projected))
    case, rng, hyper, layout, state = make_job(case_name, [(6, 5), (7,), (2, 3, 4)] * n_tensors)
    state.steps[:] = 1
    grad = make_grad(case.grad, layout, state.param, rng)
    step(optimizer, layout, state, grad, np.ones(layout.num_tensors, bool), hyper, sums=sums)


@pytest.mark.parametrize("optimizer", sorted(KERNELS))
def test_cpu_kernel_calls_do_not_grow_with_the_number_of_tensors(optimizer, monkeypatch):
    """Every parallel kernel walks all tensors in one call (the segment table)."""
    calls = []
    driver = KERNELS[optimizer].cpu
    module = sys.modules[getattr(driver, "func", driver).__module__]   # a partial's function
    for attr, fn in vars(module).items():
        if getattr(fn, "targetoptions", {}).get("parallel"):
            monkeypatch.setattr(module, attr, lambda *a, _fn=fn, _n=attr: (calls.append(_n), _fn(*a))[1])

    def kernel_calls(n_tensors: int) -> list[str]:
        calls.clear()
        _calls_for(optimizer, n_tensors, cpu.step)
        return list(calls)

    few = kernel_calls(1)
    assert few and kernel_calls(40) == few


@pytest.mark.parametrize("optimizer", sorted(KERNELS))
def test_cuda_launches_do_not_grow_with_the_number_of_tensors(optimizer, emulated_cuda):
    def launches(n_tensors: int, sums: bool = True) -> list[str]:
        emulated_cuda.clear()
        _calls_for(optimizer, n_tensors, cuda.step, sums)
        return list(emulated_cuda)

    few = launches(1)
    assert few and launches(40) == few
    assert few == [*KERNELS[optimizer].cuda.kernels, "segment_sums"]
    # Without the step sums, the same launches less their segment_sums.
    assert launches(1, sums=False) == list(KERNELS[optimizer].cuda.kernels)


@pytest.mark.parametrize("step", [cpu.step, cuda.step, reference.step], ids=["cpu", "cuda", "reference"])
def test_no_active_tensors_is_a_no_op(step, emulated_cuda):
    _, _, hyper, layout, state = make_job("adamw-lr", [(3, 4)])
    state.param[:] = 1.0
    for sums in (True, False):
        out = step("adamw", layout, state, np.ones(12, np.float32), np.zeros(1, bool), hyper,
                   sums=sums)
        assert out.reports == {} and (out.sums is not None) == sums
        assert out.sums is None or all((getattr(out.sums, k) == 0.0).all() for k in SUM_NAMES)
    assert (state.param == 1.0).all() and not emulated_cuda


@pytest.mark.parametrize("step", [cpu.step, cuda.step, reference.step], ids=["cpu", "cuda", "reference"])
def test_unknown_optimizer_is_rejected(step):
    _, _, hyper, layout, state = make_job("adamw-lr", [(3,)])
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        step("sgd", layout, state, np.zeros(3, np.float32), np.ones(1, bool), hyper)


def test_cuda_refuses_a_float64_gradient(emulated_cuda):
    _, _, hyper, layout, state = make_job("adamw-lr", [(3,)])
    with pytest.raises(TypeError, match="float64"):
        cuda.step("adamw", layout, state, np.zeros(3, np.float64), np.ones(1, bool), hyper)
