"""Bad input gets the status code of DESIGN.md's table and a clear message, and leaves the
parameters and optimizer state bit-for-bit as they were (checked by pulling both)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from models import make_data, make_model
from optserve.client import FailedPrecondition, NotFound, RemoteOptimizer
from peer import chunks
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc

JOB = "errors"


@pytest.fixture
def job(shard):
    """A job with three real steps behind it, and a raw stub to misbehave with."""
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job=JOB, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    channel = grpc.insecure_channel(shard.address)
    yield opt, pb_grpc.OptimizerStub(channel)
    channel.close()
    opt.close()


def snapshot(stub, job: str = JOB) -> tuple[bytes, bytes, bytes]:
    """Parameters, state header and state payload as the shard reports them."""
    params = b"".join(m.chunk.data for m in stub.PullParameters(pb.PullParametersRequest(job=job))
                      if m.WhichOneof("kind") == "chunk")
    header, payload = None, []
    for m in stub.GetOptimizerState(pb.GetOptimizerStateRequest(job=job)):
        if m.WhichOneof("kind") == "header":
            header = m.header.SerializeToString(deterministic=True)
        else:
            payload.append(m.chunk.data)
    return params, header, b"".join(payload)


def step_header(opt, step=None, tensors=None, dtype=pb.FLOAT32, **overrides) -> pb.StepHeader:
    groups = [opt._group_proto(g, i) for i, g in enumerate(opt.param_groups)]
    h = pb.StepHeader(job=JOB, worker=0, step=opt._step_no[0] + 1 if step is None else step,
                      tensors=range(len(opt.spec.tensors)) if tensors is None else tensors,
                      groups=groups, dtype=dtype)
    for k, v in overrides.items():
        setattr(h, k, v)
    return h


def grad_bytes(opt, tensors=None, value=0.01) -> bytes:
    idx = range(len(opt.spec.tensors)) if tensors is None else tensors
    n = sum(int(np.prod(opt.spec.tensors[t].shape)) for t in idx)
    return np.full(n, value, "<f4").tobytes()


def send_step(stub, header, payload=b"", chunk_list=None):
    msgs = [pb.StepRequest(header=header)]
    body = chunk_list if chunk_list is not None else list(chunks(payload, limit=1000))
    msgs += [pb.StepRequest(chunk=c) for c in body]
    return list(stub.Step(iter(msgs)))


def refused(stub, call, code, fragment, job: str = JOB):
    before = snapshot(stub, job)
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    assert fragment in e.value.details(), e.value.details()
    assert snapshot(stub, job) == before, "a refused request changed the stored state"


def test_unknown_job(job):
    opt, stub = job
    refused(stub, lambda: send_step(stub, step_header(opt, job="nope"), grad_bytes(opt)),
            grpc.StatusCode.NOT_FOUND, "unknown job 'nope'")


def test_unknown_tensor(job):
    opt, stub = job
    refused(stub, lambda: send_step(stub, step_header(opt, tensors=[0, 99]), grad_bytes(opt, [0])),
            grpc.StatusCode.NOT_FOUND, "no tensor with index 99")


@pytest.mark.parametrize("cut", [-4, -1, 4])
def test_wrong_byte_count(job, cut):
    opt, stub = job
    payload = grad_bytes(opt)
    payload = payload[:cut] if cut < 0 else payload + b"\0" * cut
    refused(stub, lambda: send_step(stub, step_header(opt), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "expected")


def test_missing_chunk(job):
    opt, stub = job
    body = list(chunks(grad_bytes(opt), limit=1000))
    del body[1]
    refused(stub, lambda: send_step(stub, step_header(opt), chunk_list=body),
            grpc.StatusCode.INVALID_ARGUMENT, "contiguous and in order")


def test_duplicate_chunk(job):
    opt, stub = job
    body = list(chunks(grad_bytes(opt), limit=1000))
    body.insert(1, body[0])
    refused(stub, lambda: send_step(stub, step_header(opt), chunk_list=body),
            grpc.StatusCode.INVALID_ARGUMENT, "contiguous and in order")


def test_wrong_dtype(job):
    opt, stub = job
    payload = grad_bytes(opt)[: len(grad_bytes(opt)) // 2]
    refused(stub, lambda: send_step(stub, step_header(opt, dtype=pb.BFLOAT16), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "must travel as FLOAT32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient(job, bad):
    opt, stub = job
    g = np.frombuffer(grad_bytes(opt), "<f4").copy()
    g[len(g) // 2] = bad
    refused(stub, lambda: send_step(stub, step_header(opt), g.tobytes()),
            grpc.StatusCode.INVALID_ARGUMENT, "non-finite gradient")


def test_bad_hyperparameter(job):
    opt, stub = job
    header = step_header(opt)
    header.groups[0].lr = float("nan")
    refused(stub, lambda: send_step(stub, header, grad_bytes(opt)),
            grpc.StatusCode.INVALID_ARGUMENT, "lr must be finite")


@pytest.mark.parametrize("option,value,change", [
    ("amsgrad", True, "amsgrad from False to True"),
    ("eps_mode", pb.EPS_KERAS, "eps_mode from torch to keras")])
def test_a_step_may_not_change_an_option_fixed_at_registration(job, option, value, change):
    """amsgrad decides whether a tensor keeps max_exp_avg_sq, and eps_mode the rule its state
    was built under: a step may not switch either."""
    opt, stub = job
    header = step_header(opt)
    setattr(header.groups[0], option, value)
    refused(stub, lambda: send_step(stub, header, grad_bytes(opt)),
            grpc.StatusCode.INVALID_ARGUMENT, f"group 0 cannot change {change} after registration")


def test_header_not_first(job):
    opt, stub = job
    msgs = [pb.StepRequest(chunk=pb.Chunk(offset=0, data=b"x"))]
    refused(stub, lambda: list(stub.Step(iter(msgs))), grpc.StatusCode.INVALID_ARGUMENT,
            "first message must be the header")


def test_step_out_of_order(job):
    opt, stub = job
    refused(stub, lambda: send_step(stub, step_header(opt, step=opt._step_no[0] + 2),
                                    grad_bytes(opt)),
            grpc.StatusCode.FAILED_PRECONDITION, "out of order")


def test_async_step_zero_or_ahead_is_out_of_order(shard):
    """Async steps count from 1, one after another: step 0 and a skipped step are refused."""
    x, y = make_data()
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job=JOB,
                          mode="async", lr=1e-2)
    with grpc.insecure_channel(shard.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        for steps_taken in range(2):
            for step in (0, steps_taken + 2):
                refused(stub, lambda: send_step(stub, step_header(opt, step=step),
                                                grad_bytes(opt)),
                        grpc.StatusCode.FAILED_PRECONDITION, "out of order")
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    opt.close()


def test_step_for_a_finished_sync_step_is_dropped(job):
    """A gradient for a step the job already took is late: counted, not applied."""
    opt, stub = job
    before = snapshot(stub)
    reply = send_step(stub, step_header(opt, step=opt._step_no[0] - 1), grad_bytes(opt))
    assert reply[0].header.dropped and reply[0].header.drop_reason == "late"
    assert reply[0].header.version == opt._version[0]
    assert snapshot(stub) == before


def test_registration_with_another_spec(job, shard):
    opt, stub = job
    other = torch.nn.Linear(3, 2)
    with pytest.raises(FailedPrecondition, match="different spec"):
        RemoteOptimizer(other.parameters(), "adamw", servers=[shard.address], job=JOB)
    before = snapshot(stub)
    model = make_model()
    with pytest.raises(FailedPrecondition, match="optimizer: 'adamw' registered, 'adamp' sent"):
        RemoteOptimizer(model.parameters(), "adamp", servers=[shard.address], job=JOB)
    assert snapshot(stub) == before


def test_bad_spec(shard):
    stub = pb_grpc.OptimizerStub(grpc.insecure_channel(shard.address))
    spec = pb.JobSpec(job="bad", optimizer="sgd9000", num_workers=1, num_shards=1,
                      grad_dtype=pb.FLOAT32, groups=[pb.Hyperparameters(lr=1)],
                      tensors=[pb.TensorSpec(name="w", shape=[2])])
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterJob(iter([pb.RegisterJobRequest(header=pb.RegisterHeader(spec=spec))]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown optimizer 'sgd9000'" in e.value.details()


def test_set_state_with_wrong_shape(job):
    opt, stub = job
    before = snapshot(stub)
    header = pb.StateHeader()
    for m in stub.GetOptimizerState(pb.GetOptimizerStateRequest(job=JOB)):
        if m.WhichOneof("kind") == "header":
            header.CopyFrom(m.header)
    payload = before[2]
    header.entries[0].shape[:] = [1, 2, 3]
    msgs = [pb.StateStream(header=header)] + [pb.StateStream(chunk=c)
                                              for c in chunks(payload, limit=1 << 20)]
    refused(stub, lambda: stub.SetOptimizerState(iter(msgs)), grpc.StatusCode.INVALID_ARGUMENT,
            "has shape (1, 2, 3)")


def test_client_raises_with_the_server_message(shard):
    model = make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="gone")
    opt.job = "renamed"  # the shard holds no such job
    x, y = make_data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(NotFound, match="unknown job 'renamed'"):
        opt.step()


def test_a_step_that_fails_inline_is_neither_applied_nor_cached(shard, monkeypatch):
    """A backend failure in a small step (a fault no input can cause, so the backend is made
    to raise) is INTERNAL, and nothing is settled: the version stays, no worker is answered
    from it, and the step sent again is applied once, as torch's AdamW takes one step."""
    from optserve.client import Internal
    backend = shard.backend

    x, y = make_data()
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="inline",
                          lr=1e-2)
    step = backend.step

    def fails(*args, **kwargs):
        raise MemoryError("no room")

    torch.nn.functional.cross_entropy(model(x), y).backward()
    monkeypatch.setattr(backend, "step", fails)
    with pytest.raises(Internal, match="no room"):
        opt.step()
    assert shard.store.job("inline").version == 0 and not shard.store.job("inline").results
    monkeypatch.setattr(backend, "step", step)
    opt.step()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    torch.nn.functional.cross_entropy(ref_model(x), y).backward()
    ref.step()
    assert shard.store.job("inline").version == 1
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.close()


def test_retried_step_is_applied_once(job):
    """The same (job, worker, step) sent twice: same answer, state stepped once."""
    opt, stub = job
    header = step_header(opt)
    first = send_step(stub, header, grad_bytes(opt))
    after_first = snapshot(stub)
    second = send_step(stub, header, grad_bytes(opt))
    assert [m.SerializeToString() for m in first] == [m.SerializeToString() for m in second]
    assert snapshot(stub) == after_first


@pytest.mark.usefixtures("step_path")
def test_nonfinite_skip_policy_skips_and_counts_the_step(shard):
    """nonfinite="skip": a NaN gradient skips the step (as GradScaler would), leaves the state
    as it was, and the training goes on exactly as an oracle that never took that step."""
    x, y = make_data()
    model, ref_model = make_model(), make_model()
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address], job="skip",
                          nonfinite="skip", lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    job = shard.store.job("skip")
    for step in range(6):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        if step == 3:
            model.fc1.weight.grad[0, 0] = float("inf")
            state_before = job.state.host().copy()
            opt.step()
            assert opt.dropped_steps == 1
            after = job.state.host()
            assert np.array_equal(after.param, state_before.param)
            assert all(np.array_equal(after.fields[k], v) for k, v in state_before.fields.items())
            continue
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert shard.metrics.skipped.labels("skip", "nonfinite")._value.get() == 1
    opt.close()


# Bytes protobuf itself refuses to parse: a truncated header, a chunk whose inner length runs
# past its end, a length prefix with nothing after it.
UNPARSEABLE = {"truncated header": b"\x0a\x05garb", "chunk overrun": b"\x12\x03\x12\x05ab",
               "dangling length": b"\x12\xff\xff"}


@pytest.mark.parametrize("name", UNPARSEABLE)
def test_bytes_that_do_not_parse_are_invalid_argument(shard, job, name):
    """gRPC answers a deserializer that raises with a bare INTERNAL; the shard says what is
    wrong instead, for a streamed and for a unary request, and changes nothing."""
    opt, stub = job
    header = pb.StepRequest(header=step_header(opt)).SerializeToString()
    with grpc.insecure_channel(shard.address) as channel:   # raw bytes, no serializer
        step = channel.stream_stream("/optserve.v1.Optimizer/Step")
        pull = channel.unary_stream("/optserve.v1.Optimizer/PullParameters")
        delete = channel.unary_unary("/optserve.v1.Optimizer/DeleteJob")
        restore = channel.unary_unary("/optserve.v1.Optimizer/Restore")
        for call in (lambda: list(step(iter([header, UNPARSEABLE[name]]))),
                     lambda: list(step(iter([UNPARSEABLE[name]]))),
                     lambda: list(pull(UNPARSEABLE[name])),
                     lambda: delete(UNPARSEABLE[name]), lambda: restore(UNPARSEABLE[name])):
            refused(stub, call, grpc.StatusCode.INVALID_ARGUMENT, "is not a valid")


def test_delete_restore_and_a_foreign_session_are_refused_without_change(job):
    """DeleteJob of another name, Restore without checkpoints or of a worker out of range, and
    a Step whose session does not hold its worker: each its status, the job untouched."""
    opt, stub = job
    refused(stub, lambda: stub.DeleteJob(pb.DeleteJobRequest(job="no-such-job")),
            grpc.StatusCode.NOT_FOUND, "unknown job 'no-such-job'")
    refused(stub, lambda: stub.Restore(pb.RestoreRequest(job=JOB, version=1)),
            grpc.StatusCode.FAILED_PRECONDITION, "no --checkpoint-dir")
    refused(stub, lambda: stub.Restore(pb.RestoreRequest(job=JOB, version=1, worker=7)),
            grpc.StatusCode.INVALID_ARGUMENT, "worker 7 out of range")
    header = step_header(opt, session="someone-else")
    refused(stub, lambda: send_step(stub, header, grad_bytes(opt)),
            grpc.StatusCode.FAILED_PRECONDITION, "held by another client")
    refused(stub, lambda: stub.LeaveJob(pb.LeaveJobRequest(job=JOB, worker=0,
                                                          session="someone-else")),
            grpc.StatusCode.FAILED_PRECONDITION, "held by another client")
