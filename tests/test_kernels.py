"""Parity of the numba CPU backend (kernels/cpu.py) with the NumPy reference (kernels/reference.py).

Each case runs a few steps of both backends on copies of one job: tensors of many shapes
(size 1, odd sizes, sizes that are not multiples of the tile, 0-D to 4-D), two parameter
groups with different hyperparameters, some tensors with zero gradients and some inactive;
it compares θ, every state field and the returned statistics after every step, and checks
that inactive tensors stay bit-for-bit untouched. A third copy steps with stats=False and
must come out bit-for-bit equal to the stats=True copy, with only "projected" and "clip"
returned.
Every case also runs with tiny tiles, so that rows, columns and batches get split the way
they only are for big tensors with the default tile, and with one tile per tensor.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from optserve.kernels import cpu, reference
from optserve.kernels.layout import HYPER_KEYS, FlatLayout, FlatState
from optserve.proto.optimizers import REGISTRY, group_to_proto

SHAPES = [(1,), (7,), (1, 1), (5, 3), (33, 17), (3, 4, 5), (2, 3, 4, 5), (4, 1), (300, 301),
          (2, 70001), (129,), ()]
ZERO_GRAD = {3, 7}      # (5, 3) and (4, 1): all-zero gradients
INACTIVE = {2, 6}       # never stepped: must stay bit-for-bit untouched
TOGGLED = 10            # active on even steps only, so step counts differ between tensors
STEPS = 5
RTOL = 1e-6
# Absolute slack, relative to the largest element of the same tensor and field: a few float32
# ulps. Reductions accumulate in float64 here and in float32 in the reference, so an input can
# differ by an ulp, and an EMA that nearly cancels (m = β1·m + (1−β1)·u) turns that into a
# large relative error on a near-zero element.
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
}


def test_every_registered_optimizer_has_a_case():
    assert {c.optimizer for c in CASES.values()} == set(REGISTRY)


def _hyper(case: Case, group_of: np.ndarray) -> tuple[dict, list]:
    """Per-tensor float64 hyperparameter arrays, through the wire form (group_to_proto)."""
    protos = []
    for overrides in case.groups:
        group = {**REGISTRY[case.optimizer].defaults, **overrides}
        lr = group["lr"] or 1e-2
        protos.append(group_to_proto(case.optimizer, group, initial_lr=lr * case.initial_lr_scale))
    hyper = {}
    for key in HYPER_KEYS:
        if key == "adafactor_beta1":
            per_group = [h.adafactor_beta1 if h.HasField(key) else math.nan for h in protos]
        else:
            per_group = [float(getattr(h, key)) for h in protos]
        hyper[key] = np.array(per_group, np.float64)[group_of]
    return hyper, protos


def _grad(kind: str, layout: FlatLayout, param: np.ndarray, rng) -> np.ndarray:
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


def _segments(layout: FlatLayout, state: FlatState, i: int) -> dict[str, np.ndarray]:
    out = {"param": layout.param_view(state.param, i)}
    out.update({name: layout.field_view(state, name, i) for name in layout.field_shapes[i]})
    return out


def _assert_step_sums_close(got: dict, want: dict, what: str) -> None:
    """The float64 step statistics (w2 = ‖w‖², wdw = ⟨w, Δw⟩, dw2 = ‖Δw‖², g2 = ‖g‖²), as far
    as the reference returns them. Δw is a difference of float32 parameters, so an ulp of w
    in either backend moves wdw and dw2 by up to about ulp·‖w‖·‖Δw‖: that is their slack."""
    assert set(want) <= set(got), set(want) - set(got)
    cross = np.sqrt(want.get("w2", 0.0) * want.get("dw2", 0.0))
    for key in set(want) - {"projected", "clip"}:
        assert got[key].dtype == np.float64, key
        slack = ATOL_SCALED * cross if key in ("wdw", "dw2") else 0.0
        bad = np.abs(got[key] - want[key]) > slack + RTOL * np.abs(want[key])
        assert not bad.any(), (what, key, np.flatnonzero(bad), got[key][bad], want[key][bad])


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32).copy()


STEP_SUMS = ("w2", "wdw", "dw2", "g2")


def assert_stats_off_identical(layout: FlatLayout, lean: FlatState, full: FlatState,
                               lean_out: dict, full_out: dict, what: str) -> None:
    """A step with stats=False (lean) against the same step with stats=True (full): the same
    bits in θ and every state field, the same "projected" and "clip", and no step sums."""
    assert set(lean_out) == {"projected", "clip"}, (what, sorted(lean_out))
    assert set(STEP_SUMS) <= set(full_out), (what, sorted(full_out))
    np.testing.assert_array_equal(lean_out["projected"], full_out["projected"], err_msg=what)
    np.testing.assert_array_equal(lean_out["clip"], full_out["clip"], err_msg=what)
    np.testing.assert_array_equal(_bits(lean.param), _bits(full.param), err_msg=f"{what}, param")
    assert lean.fields.keys() == full.fields.keys()
    for name in full.fields:
        np.testing.assert_array_equal(_bits(lean.fields[name]), _bits(full.fields[name]),
                                      err_msg=f"{what}, {name}")


@pytest.fixture(params=["default-tile", "tiny-tile", "one-tile"])
def tiling(request, monkeypatch):
    """default: the big tensors span several tiles; tiny: every tensor does, with rows,
    columns and batches split; one: no tensor is split (row/col sums need no combining)."""
    if request.param == "tiny-tile":
        monkeypatch.setattr(cpu, "TILE", 37)
        monkeypatch.setattr(cpu, "FACTORED_MIN_ROWS", 4)
    elif request.param == "one-tile":
        monkeypatch.setattr(cpu, "TILE", 1 << 30)
    return request.param


@pytest.mark.parametrize("case_name", list(CASES))
def test_cpu_matches_reference(case_name, tiling):
    case = CASES[case_name]
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    group_of = np.arange(len(SHAPES)) % 2
    hyper, protos = _hyper(case, group_of)
    info = REGISTRY[case.optimizer]
    layout = FlatLayout(SHAPES, [info.state_fields(s, protos[g]) for s, g in zip(SHAPES, group_of)])
    ref = FlatState.zeros(layout)
    ref.param[:] = rng.standard_normal(layout.numel).astype(np.float32)
    fast = ref.copy()
    lean = ref.copy()   # stepped with stats=False
    frozen = {i: {k: _bits(v) for k, v in _segments(layout, ref, i).items()} for i in INACTIVE}

    for t in range(STEPS):
        active = np.array([i not in INACTIVE and (i != TOGGLED or t % 2 == 0)
                           for i in range(len(SHAPES))])
        grad = _grad(case.grad, layout, ref.param, rng)
        for st in (ref, fast, lean):
            st.steps[active] += 1
        want = reference.step(case.optimizer, layout, ref, grad.copy(), active, hyper)
        got = cpu.step(case.optimizer, layout, fast, grad.copy(), active, hyper)
        lean_got = cpu.step(case.optimizer, layout, lean, grad.copy(), active, hyper, stats=False)
        assert_stats_off_identical(layout, lean, fast, lean_got, got, f"step {t}, stats=False")

        np.testing.assert_array_equal(got["projected"], want["projected"], err_msg=f"step {t}")
        np.testing.assert_allclose(got["clip"], want["clip"], rtol=RTOL, err_msg=f"step {t}")
        assert got["projected"].dtype == bool and got["clip"].dtype == np.float64
        _assert_step_sums_close(got, want, f"step {t}")
        if case.expect_projected is not None:  # the case does what it is meant to
            multi = np.array([len(s) > 1 for s in SHAPES]) & active
            multi[list(ZERO_GRAD)] = False  # a zero gradient has cosine 0: always projected
            assert (want["projected"][multi] == case.expect_projected).all()

        for i in range(len(SHAPES)):
            seg_fast, seg_ref = _segments(layout, fast, i), _segments(layout, ref, i)
            for name, expected in seg_ref.items():
                scale = float(np.abs(expected).max(initial=0.0))
                np.testing.assert_allclose(seg_fast[name], expected, rtol=RTOL,
                                           atol=ATOL_SCALED * scale,
                                           err_msg=f"step {t}, tensor {i} {SHAPES[i]}, {name}")

    np.testing.assert_array_equal(fast.steps, ref.steps)
    for i, fields in frozen.items():
        for name, bits in fields.items():
            np.testing.assert_array_equal(_bits(_segments(layout, fast, i)[name]), bits,
                                          err_msg=f"inactive tensor {i}, {name}")


@pytest.mark.parametrize("case_name", list(CASES))
def test_reference_without_stats_is_bit_identical(case_name):
    """reference.step(stats=False) steps exactly as with stats=True, and returns no sums."""
    case = CASES[case_name]
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    group_of = np.arange(len(SHAPES)) % 2
    hyper, protos = _hyper(case, group_of)
    info = REGISTRY[case.optimizer]
    layout = FlatLayout(SHAPES, [info.state_fields(s, protos[g]) for s, g in zip(SHAPES, group_of)])
    full = FlatState.zeros(layout)
    full.param[:] = rng.standard_normal(layout.numel).astype(np.float32)
    lean = full.copy()
    for t in range(2):
        active = np.array([i not in INACTIVE for i in range(len(SHAPES))])
        grad = _grad(case.grad, layout, full.param, rng)
        for st in (full, lean):
            st.steps[active] += 1
        full_out = reference.step(case.optimizer, layout, full, grad.copy(), active, hyper)
        lean_out = reference.step(case.optimizer, layout, lean, grad.copy(), active, hyper,
                                  stats=False)
        assert_stats_off_identical(layout, lean, full, lean_out, full_out, f"step {t}")


def test_adamp_projection_paths_are_exercised():
    """The AdamP cases cover a channel projection, a layer projection and no projection."""
    case = CASES["adamp-layer"]
    group_of = np.zeros(2, int)
    shapes = [(33, 17), (6, 9)]
    hyper, protos = _hyper(case, group_of)
    layout = FlatLayout(shapes, [REGISTRY["adamp"].state_fields(s, protos[0]) for s in shapes])
    state = FlatState.zeros(layout)
    rng = np.random.default_rng(0)
    state.param[:] = rng.standard_normal(layout.numel)
    state.steps[:] = 1
    active = np.ones(2, bool)
    for kind, expected in [("orthogonal", True), ("layer", True), ("parallel", False)]:
        grad = _grad(kind, layout, state.param, rng)
        got = cpu.step("adamp", layout, state.copy(), grad, active, hyper)
        assert got["projected"].tolist() == [expected] * 2, kind
    # The layer case really fails the channel test (one row is parallel to θ).
    grad = _grad("layer", layout, state.param, rng)
    p, g = (layout.param_view(x, 0).reshape(33, -1).astype(np.float64) for x in (state.param, grad))
    cos = np.abs((p * g).sum(1)) / np.linalg.norm(p, axis=1) / np.linalg.norm(g, axis=1)
    assert cos.max() > hyper["delta"][0] / math.sqrt(17)


@pytest.mark.parametrize("optimizer", sorted(REGISTRY))
def test_kernel_calls_do_not_grow_with_the_number_of_tensors(optimizer, monkeypatch):
    """Every parallel kernel walks all tensors in one call (the segment table)."""
    calls = []
    for attr, fn in vars(cpu).items():
        if getattr(fn, "targetoptions", {}).get("parallel"):
            monkeypatch.setattr(cpu, attr, lambda *a, _fn=fn, _n=attr: (calls.append(_n), _fn(*a))[1])

    def kernel_calls(n_tensors: int) -> list[str]:
        shapes = [(6, 5), (7,), (2, 3, 4)] * n_tensors
        # AdamP's projected path has one more kernel; take the case that always projects.
        case = next(c for c in CASES.values() if c.optimizer == optimizer
                    and (optimizer != "adamp" or c.expect_projected))
        group_of = np.zeros(len(shapes), int)
        hyper, protos = _hyper(case, group_of)
        layout = FlatLayout(shapes, [REGISTRY[optimizer].state_fields(s, protos[0]) for s in shapes])
        state = FlatState.zeros(layout)
        state.param[:] = np.random.default_rng(0).standard_normal(layout.numel)
        state.steps[:] = 1
        grad = _grad(case.grad, layout, state.param, np.random.default_rng(1))
        calls.clear()
        cpu.step(optimizer, layout, state, grad, np.ones(len(shapes), bool), hyper)
        return list(calls)

    few = kernel_calls(1)
    assert few and kernel_calls(40) == few


def test_no_active_tensors_is_a_no_op():
    shapes = [(3, 4)]
    layout = FlatLayout(shapes, [REGISTRY["adamw"].state_fields(s, None) for s in shapes])
    state = FlatState.zeros(layout)
    state.param[:] = 1.0
    hyper = {k: np.zeros(1) for k in HYPER_KEYS}
    out = cpu.step("adamw", layout, state, np.ones(12, np.float32), np.zeros(1, bool), hyper)
    assert not out["projected"].any() and (out["clip"] == 1.0).all()
    assert all((out[key] == 0.0).all() for key in ("w2", "wdw", "dw2", "g2"))
    out = cpu.step("adamw", layout, state, np.ones(12, np.float32), np.zeros(1, bool), hyper,
                   stats=False)
    assert set(out) == {"projected", "clip"}
    assert (state.param == 1.0).all()


def test_unknown_optimizer_is_rejected():
    shapes = [(3,)]
    layout = FlatLayout(shapes, [{}])
    hyper = {k: np.zeros(1) for k in HYPER_KEYS}
    with pytest.raises(ValueError):
        cpu.step("sgd", layout, FlatState.zeros(layout), np.zeros(3, np.float32),
                 np.ones(1, bool), hyper)
