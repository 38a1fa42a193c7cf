"""A job's state object (kernels/state.py): the GPU's DeviceState (on the CuPy test double
without a GPU, on the GPU where there is one) against the host's HostState, fed the same
gradient chunks.

What must agree bit for bit with the host: the received gradients, the sync mean over the
workers that sent each tensor (rank order), the parameters of AdamW after a step (the
kernels round as the reference does), and the reply in each wire format (against the NumPy
reference encoders, which tests/test_convert.py holds to torch's casts). What must agree to
float32 rounding: Adafactor. And what a step moves over PCIe: the wire bytes, and no more
than a small constant besides.
"""
from __future__ import annotations

import numpy as np
import pytest

from optserve.kernels import FlatLayout, FlatState, Hyper, cpu, cuda
from optserve.kernels.convert import encode_reference
from optserve.proto.optimizers import REGISTRY, group_to_proto
from optserve.proto.spec import WIRE_ITEMSIZE, WIRE_NAMES
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import chunked

SHAPES = [(33, 17), (7,), (300, 301), (2, 3, 4, 5), (129,), (1,)]
WIRES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}


@pytest.fixture(params=["emulated", "gpu"])
def device(request):
    """The CUDA backend's runtime: the test double, or a real GPU."""
    request.getfixturevalue("emulated_cuda" if request.param == "emulated" else "gpu_cuda")
    return cuda


def job(optimizer: str, seed: int = 0, **group):
    """(layout, initial parameters, hyper) of a job of SHAPES in one group."""
    info = REGISTRY[optimizer]
    h = group_to_proto(optimizer, {**info.defaults, **group}, group.get("lr") or 1e-2)
    layout = FlatLayout(SHAPES, [info.state_fields(s, h) for s in SHAPES])
    params = np.random.default_rng(seed).standard_normal(layout.numel).astype(np.float32)
    return layout, params, Hyper.from_groups([h], np.zeros(len(SHAPES), int))


def wire_bytes(values: np.ndarray, wire: int) -> np.ndarray:
    out = np.empty(values.size * WIRE_ITEMSIZE[wire], np.uint8)
    encode_reference(values, WIRE_NAMES[wire], out)
    return out


def send(state, worker: int, wire: int, tensors: np.ndarray, grad: np.ndarray,
         chunk: int) -> bool:
    """Sends the gradient of `tensors` to `state` in chunks of `chunk` bytes."""
    payload = wire_bytes(np.concatenate([state.layout.param_view(grad, k).reshape(-1)
                                         for k in tensors]), wire)
    receiver = state.receive(worker, wire, tensors, "test gradient")
    for c in chunked(payload, chunk):
        receiver.add(c)
    return receiver.finish()


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


@pytest.mark.parametrize("wire", list(WIRES))
def test_a_sync_step_of_three_workers_matches_the_host_bit_for_bit(device, wire):
    """Three workers, each missing some tensors, in odd-sized chunks (elements cut in two,
    more chunks than staging slots); the mean and the AdamW step over two parts."""
    layout, params, hyper = job("adamw", weight_decay=0.1)
    host, dev = cpu.new_state(layout, params), device.new_state(layout, params)
    rng = np.random.default_rng(1)
    senders = {0: np.arange(6), 1: np.array([0, 2, 3, 5]), 2: np.array([1, 2, 4])}
    for step in range(3):
        for w, tensors in senders.items():
            grad = rng.standard_normal(layout.numel).astype(np.float32)
            for state in (host, dev):
                assert send(state, w, WIRES[wire], tensors, grad, chunk=65_537)
        for part in (np.array([0, 1, 2]), np.array([3, 4, 5])):
            for state in (host, dev):
                state.steps[part] += 1
                state.step("adamw", senders, part, hyper, sums=True)
        got, want = dev.host(), host.host()
        np.testing.assert_array_equal(bits(got.param), bits(want.param), err_msg=f"step {step}")
        for name in want.fields:
            np.testing.assert_array_equal(bits(got.fields[name]), bits(want.fields[name]))
    np.testing.assert_array_equal(bits(dev.rt.download(dev.mean)), bits(host.mean))


@pytest.mark.parametrize("wire", list(WIRES))
def test_the_reply_is_encoded_on_the_device_as_the_reference_encodes(device, wire):
    """Every wire format, over values that round every way: ties, carries into the next
    exponent, overflow to infinity, subnormals of the 16-bit formats, signed zeros."""
    layout, _, _ = job("adamw")
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(layout.numel) * np.exp2(rng.integers(-30, 18, layout.numel))
              ).astype(np.float32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -1e9, 6e-8, 3e-8, 2.98e-8,
                        6.1e-5, 1.0 + 2**-11, 1.0 + 3 * 2**-11], np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFF8000, 0x7F7F8000], np.uint32)
    values[:len(special)] = special
    values[len(special):len(special) + len(ties)] = ties.view(np.float32)
    state = device.new_state(layout, values)
    every = np.arange(layout.num_tensors)
    out = state.reply_buffer(layout.numel * WIRE_ITEMSIZE[WIRES[wire]])
    written = state.encode(every, WIRES[wire], out, 0)
    assert written[-1].end == out.size
    written[-1].wait()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, wire_bytes(values, WIRES[wire]))
    # A part: only its tensors, back to back from `pos`.
    part = np.array([1, 3])
    out = state.reply_buffer(8 + int(layout.sizes[part].sum()) * WIRE_ITEMSIZE[WIRES[wire]])
    out[:8] = 7
    state.encode(part, WIRES[wire], out, 8)[-1].wait()
    with np.errstate(over="ignore"):
        want = wire_bytes(np.concatenate([layout.param_view(values, k).reshape(-1) for k in part]),
                          WIRES[wire])
    assert (out[:8] == 7).all()
    np.testing.assert_array_equal(out[8:], want)


def test_the_reply_is_copied_back_chunk_by_chunk(device, monkeypatch):
    """Each reply chunk has its own event: once a piece's wait() returns, the payload up to
    its end is in place, whatever the later pieces are doing."""
    from optserve.kernels import cuda_state
    monkeypatch.setattr(cuda_state, "CHUNK_BYTES", 4096)
    layout, params, _ = job("adamw")
    state = device.new_state(layout, params)
    every = np.arange(layout.num_tensors)
    out = state.reply_buffer(2 * layout.numel + 100)
    written = state.encode(every, pb.BFLOAT16, out, 100)
    want = wire_bytes(params, pb.BFLOAT16)
    assert [w.end for w in written] == [*range(4096, out.size, 4096), out.size]
    for w in written:
        w.wait()
        np.testing.assert_array_equal(out[100:w.end], want[:w.end - 100])


def test_a_reply_still_copying_keeps_the_values_it_was_encoded_from(device):
    """The next step's encoding must not overwrite what an earlier reply has yet to copy."""
    layout, params, hyper = job("adamw")
    state = device.new_state(layout, params)
    every = np.arange(layout.num_tensors)
    first = state.reply_buffer(4 * layout.numel)
    pending = state.encode(every, pb.FLOAT32, first, 0)
    send(state, 0, pb.FLOAT32, every, np.ones(layout.numel, np.float32), chunk=1 << 16)
    state.steps[:] += 1
    state.step("adamw", {0: every}, every, hyper, sums=True)
    second = state.reply_buffer(4 * layout.numel)
    done = state.encode(every, pb.FLOAT32, second, 0)[-1]
    state.host()                   # a checkpoint now: the job's stream runs to here
    pending[-1].wait()
    done.wait()
    np.testing.assert_array_equal(first.view(np.float32), params)
    assert not np.array_equal(second.view(np.float32), params)


def test_a_nonfinite_gradient_is_found_in_its_tensor(device):
    layout, params, _ = job("adamw")
    grad = np.ones(layout.numel, np.float32)
    layout.param_view(grad, 3).reshape(-1)[7] = np.inf
    for state in (cpu.new_state(layout, params), device.new_state(layout, params)):
        assert send(state, 0, pb.BFLOAT16, np.arange(6), grad, chunk=4096) is False
        assert state.first_nonfinite(0, np.arange(6)) == 3
        assert send(state, 0, pb.BFLOAT16, np.array([0, 1, 2]), grad, chunk=4096) is True


@pytest.mark.parametrize("optimizer,group", [
    ("adafactor", {}), ("lion", {}), ("adamp", {}), ("adam", {"amsgrad": True}),
    ("torch_adafactor", {"weight_decay": 0.1, "maximize": True})])
def test_other_optimizers_step_on_the_device_state_as_on_the_host(device, optimizer, group):
    layout, params, hyper = job(optimizer, **group)
    host, dev = cpu.new_state(layout, params), device.new_state(layout, params)
    rng = np.random.default_rng(3)
    every = np.arange(layout.num_tensors)
    for _ in range(3):
        grad = rng.standard_normal(layout.numel).astype(np.float32)
        for state in (host, dev):
            send(state, 0, pb.FLOAT32, every, grad, chunk=1 << 20)
            state.steps[:] += 1
            state.step(optimizer, {0: every}, every, hyper, sums=False)
    got, want = dev.host(), host.host()
    np.testing.assert_allclose(got.param, want.param, rtol=1e-6, atol=1e-6)
    for name in want.fields:
        np.testing.assert_allclose(got.fields[name], want.fields[name], rtol=1e-5, atol=1e-7)


def test_a_step_moves_the_wire_bytes_over_pcie_and_little_else(device):
    """Gradient in and parameters out, each in bfloat16: 4 bytes per parameter over PCIe
    (the state itself stays on the device; 28 bytes per parameter would move were it not)."""
    layout, params, hyper = job("adamw")
    state = device.new_state(layout, params)
    rt, every = state.rt, np.arange(layout.num_tensors)
    grad = np.random.default_rng(4).standard_normal(layout.numel).astype(np.float32)
    out = state.reply_buffer(2 * layout.numel)
    for step in range(2):          # the second step reuses every buffer the first allocated
        before = dict(rt.copied)
        send(state, 0, pb.BFLOAT16, every, grad, chunk=1 << 20)
        state.steps[:] += 1
        state.step("adamw", {0: every}, every, hyper, sums=True)
        state.encode(every, pb.BFLOAT16, out, 0)[-1].wait()
        h2d, d2h = (rt.copied[k] - before[k] for k in ("h2d", "d2h"))
        small = 256 * layout.num_tensors + 4096    # coefficients, masks, sums, counts
        assert 2 * layout.numel <= h2d <= 2 * layout.numel + small, (step, h2d)
        assert 2 * layout.numel <= d2h <= 2 * layout.numel + small, (step, d2h)


def test_host_load_and_write_round_trip(device):
    layout, params, _ = job("adafactor", beta1=0.9)
    state = device.new_state(layout, params)
    rng = np.random.default_rng(5)
    new = FlatState(rng.standard_normal(layout.numel).astype(np.float32),
                    {k: rng.random(n).astype(np.float32) for k, n in layout.field_totals.items()},
                    np.arange(layout.num_tensors, dtype=np.int64))
    state.load(new)
    got = state.host()
    np.testing.assert_array_equal(got.param, new.param)
    np.testing.assert_array_equal(got.steps, new.steps)
    for name in new.fields:
        np.testing.assert_array_equal(got.fields[name], new.fields[name])
    value = np.full(layout.field_shapes[2]["exp_avg"], 3.5, np.float32)
    state.write({(2, "exp_avg"): value})
    np.testing.assert_array_equal(layout.field_view(state.host(), "exp_avg", 2), value)
    with pytest.raises(ValueError, match="fit"):
        state.load(FlatState(new.param[:-1], new.fields, new.steps))


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_the_mean_kernel_is_the_numpy_mean_bit_for_bit(workers):
    """kernels/mean.py folds the copy and the division into its sums: each value must still
    be ((g0 + g1) + ...) / n rounded as NumPy's float32 operations round it."""
    from optserve.kernels.mean import mean, mean_reference
    rng = np.random.default_rng(workers)
    grads = [(rng.standard_normal(10_001) * 10.0 ** rng.integers(-30, 30, 10_001)).astype(np.float32)
             for _ in range(workers)]
    want, got = np.empty(10_001, np.float32), np.empty(10_001, np.float32)
    mean_reference(want, grads)
    mean(got, grads)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
