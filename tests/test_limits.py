"""What a single request may ask of a shard: counts, names, hyperparameters and step counts
are bounded, checked before anything is placed, allocated or written, and a refusal leaves
the stored parameters and optimizer state bit-for-bit as they were (test_errors.refused)."""
from __future__ import annotations

import pathlib
import re
import resource
import subprocess

import grpc
import numpy as np
import pytest

from optserve import local
from optserve.proto import optimizers
from optserve.proto.errors import InvalidArgument
from optserve.proto.spec import MAX_DIMS, MAX_NAME_BYTES, shard_tensors
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc
from optserve.proto.wire import MAX_MESSAGE_BYTES
from optserve.server import Limits, ShardConfig, ShardServer, TLSFiles
from peer import chunks
from support import DEVICE
from test_errors import refused, send_step, snapshot

HELD = "held"
RPC_TIMEOUT = 30       # seconds: every refusal here comes back long before
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
ADAMW = pb.Hyperparameters(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def job_spec(job: str, shapes=((4, 3), (3,)), optimizer="adamw", group=ADAMW,
             **fields) -> pb.JobSpec:
    fields = {"num_workers": 1, "num_shards": 1, "grad_dtype": pb.FLOAT32, **fields}
    return pb.JobSpec(job=job, optimizer=optimizer, groups=[group], **fields,
                      tensors=[pb.TensorSpec(name=f"t{i}", shape=s) for i, s in enumerate(shapes)])


def register(stub, spec: pb.JobSpec) -> pb.RegisterJobResponse:
    """Registers `spec` as worker 0 on shard 0, every parameter 0.5."""
    n = sum(int(np.prod(spec.tensors[t].shape)) for t in shard_tensors(spec, 0))
    msgs = [pb.RegisterJobRequest(header=pb.RegisterHeader(spec=spec))]
    msgs += [pb.RegisterJobRequest(chunk=c)
             for c in chunks(np.full(n, 0.5, "<f4").tobytes(), limit=1 << 20)]
    return stub.RegisterJob(iter(msgs), timeout=RPC_TIMEOUT)


def step_header(spec: pb.JobSpec, step: int, group=ADAMW) -> pb.StepHeader:
    return pb.StepHeader(job=spec.job, worker=0, step=step, tensors=range(len(spec.tensors)),
                         groups=[group], dtype=pb.FLOAT32, version=step - 1)


def step(stub, spec: pb.JobSpec, number: int, group=ADAMW) -> list:
    n = sum(int(np.prod(t.shape)) for t in spec.tensors)
    return send_step(stub, step_header(spec, number, group), np.full(n, 0.01, "<f4").tobytes())


def state_messages(stub, job: str, **changes) -> list[pb.StateStream]:
    """The job's optimizer state as GetOptimizerState reads it, to write back with `changes`
    made to its header."""
    header, payload = pb.StateHeader(), b""
    for m in stub.GetOptimizerState(pb.GetOptimizerStateRequest(job=job), timeout=RPC_TIMEOUT):
        if m.WhichOneof("kind") == "header":
            header.CopyFrom(m.header)
        else:
            payload += m.chunk.data
    for name, value in changes.items():
        del getattr(header, name)[:]
        getattr(header, name).extend(value)
    return [pb.StateStream(header=header)] + [pb.StateStream(chunk=c)
                                              for c in chunks(payload, limit=1 << 20)]


@pytest.fixture(autouse=True)
def bounded_memory():
    """Caps this process, shards included, at 2 GiB of address space over what it holds now:
    a request that a missing limit lets through fails its test with MemoryError instead of
    taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = pathlib.Path("/proc/self/status").read_text()
    held = int(re.search(r"VmSize:\s+(\d+) kB", status)[1]) << 10
    resource.setrlimit(resource.RLIMIT_AS, (held + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def held(shard):
    """A raw stub to `shard`, which holds a job (HELD) that has taken a step."""
    with grpc.insecure_channel(shard.address) as channel:
        stub = pb_grpc.OptimizerStub(channel)
        register(stub, job_spec(HELD))
        step(stub, job_spec(HELD), 1)
        yield stub


def refused_registration(stub, shard, spec, code, fragment):
    """The header alone: it is refused before a parameter is read."""
    msgs = [pb.RegisterJobRequest(header=pb.RegisterHeader(spec=spec))]
    refused(stub, lambda: stub.RegisterJob(iter(msgs), timeout=RPC_TIMEOUT), code, fragment,
            job=HELD)
    assert spec.job not in shard.store.jobs


# ---- counts that size what a job allocates -------------------------------------------------

def test_worker_shard_and_group_counts_are_bounded_before_placement(shard, held):
    """Workers, shards and parameter groups over the limits are refused before placement or
    any per-worker allocation: the smaller counts first, which a shard without the limits
    takes (a few MB), then counts that it would spend minutes and gigabytes on."""
    limits = Limits()
    for fields in (dict(num_workers=limits.max_workers + 1),
                   dict(num_shards=limits.max_shards + 1),
                   dict(num_workers=2**32 - 1), dict(num_shards=2**32 - 1)):
        refused_registration(held, shard, job_spec("many", **fields), EXHAUSTED,
                             "over this shard's limit")
    groups = job_spec("many")
    groups.groups.extend([ADAMW] * limits.max_tensors)
    refused_registration(held, shard, groups, EXHAUSTED,
                         f"{limits.max_tensors + 1} parameter groups, over this shard's limit")
    at_limit = job_spec("at-limit", num_workers=limits.max_workers, num_shards=limits.max_shards)
    assert register(held, at_limit).created   # shard 0 holds the largest tensor


def test_per_worker_buffers_count_against_the_state_limit():
    """A 16K-parameter AdamW job holds 192 KiB of parameters and state; each worker adds a
    64 KiB gradient buffer. Under a 1 MiB limit one worker fits and sixteen do not."""
    server = ShardServer(ShardConfig(port=0, device=DEVICE,
                                     limits=Limits(max_state_bytes=1 << 20))).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.OptimizerStub(channel)
            register(stub, job_spec(HELD, shapes=[(16384,)]))
            crowd = job_spec("crowd", shapes=[(16384,)], num_workers=16)
            refused_registration(stub, server, crowd, EXHAUSTED, "the rest for its 16 workers")
    finally:
        server.stop(0)


# ---- step counts that would wrap or lose exactness -----------------------------------------

def test_set_state_bounds_step_counts_before_writing_anything(shard, held):
    """A step count that the next steps would wrap (int64) or round (float64) is refused
    with nothing written, the moments sent with it included; the bound itself is taken,
    and the job steps on from it."""
    for bad in (2**64 - 1, 2**63, 2**63 - 1, 2**53, 2**52):
        msgs = state_messages(held, HELD, steps=[bad, 1])
        refused(held, lambda: held.SetOptimizerState(iter(msgs), timeout=RPC_TIMEOUT), INVALID,
                "at most 2^52 - 1", job=HELD)
    held.SetOptimizerState(iter(state_messages(held, HELD, steps=[2**52 - 1, 2**52 - 1])),
                           timeout=RPC_TIMEOUT)
    step(held, job_spec(HELD), 2)
    assert state_messages(held, HELD)[0].header.steps == [2**52, 2**52]


# ---- mutual TLS without the shard's own certificate ----------------------------------------

def test_a_client_ca_without_a_certificate_is_refused_at_startup(tmp_path):
    """--tls-client-ca alone would serve plaintext to clients without certificates: the
    shard refuses to start, from the command line and embedded."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")   # never read: refused before
    for flags in (["--tls-client-ca", ca], ["--tls-cert", ca, "--tls-client-ca", ca]):
        done = subprocess.run(local.shard_command("--device", DEVICE, *map(str, flags)),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "listening" not in done.stdout, done.stdout
        assert ("TLS needs the shard's certificate and its key (--tls-cert and --tls-key)"
                in done.stderr), done.stderr
    with pytest.raises(ValueError, match="TLS needs the shard's certificate"):
        ShardConfig(port=0, tls=TLSFiles("", "", client_ca=str(ca)))


# ---- hyperparameters the float32 kernels cannot represent ----------------------------------

@pytest.mark.parametrize("lr", [1e39, 3e38])
def test_an_lr_that_overflows_float32_is_refused(shard, held, lr):
    """1e39 is no float32; 3e38 is, but AdamW's first step size lr/(1 − β1) is not. Both
    are refused at registration and in a Step, the parameters left as they were (they
    became -inf before)."""
    group = pb.Hyperparameters()
    group.CopyFrom(ADAMW)
    group.lr = lr
    refused(held, lambda: step(held, job_spec(HELD), 2, group), INVALID,
            "must be finite in float32", job=HELD)
    refused_registration(held, shard, job_spec("huge", group=group), INVALID,
                         "must be finite in float32")


# Each optimizer's float hyperparameters, and coefficients formed from them, out of float32.
OVERFLOWS = [("adamw", "lr", 1e39), ("adamw", "eps", 1e39), ("adamw", "weight_decay", 1e39),
             ("adamw", "lr", 3e38), ("adam", "betas", (0.9, 1e39)), ("adam", "lr", 3e38),
             ("adamp", "delta", 1e39), ("adamp", "lr", 3e38), ("lion", "lr", 1e39),
             ("lion", "betas", (1e39, 0.99)), ("lion", "weight_decay", 1e39),
             ("adafactor", "lr", 1e39), ("adafactor", "eps", (1e39, 1e-3)),
             ("adafactor", "eps", (1e-30, 1e39)), ("adafactor", "clip_threshold", 1e39),
             ("adafactor", "decay_rate", -1e39), ("adafactor", "weight_decay", 1e39),
             ("torch_adafactor", "lr", 1e39), ("torch_adafactor", "eps", (1e20, 1e-3)),
             ("torch_adafactor", "eps", (None, 1e39)), ("torch_adafactor", "d", 1e39),
             ("torch_adafactor", "beta2_decay", -1e39), ("torch_adafactor", "weight_decay", 1e39)]


@pytest.mark.parametrize("optimizer,key,value", OVERFLOWS)
def test_hyperparameters_that_overflow_float32_are_refused(optimizer, key, value):
    group = dict(optimizers.REGISTRY[optimizer].defaults, lr=1e-3, relative_step=False)
    optimizers.group_to_proto(optimizer, group, 1e-3)   # as it is: fine
    with pytest.raises(InvalidArgument, match="must be finite in float32"):
        optimizers.group_to_proto(optimizer, {**group, key: value}, 1e-3)


def test_every_optimizer_has_overflow_cases():
    assert {optimizer for optimizer, _, _ in OVERFLOWS} == set(optimizers.REGISTRY)


# ---- names ---------------------------------------------------------------------------------

def test_job_and_tensor_names_are_bounded(shard, held):
    """Job and tensor names of more than 256 UTF-8 bytes are refused (a 1 MiB job name made
    /metrics 91 MiB), without being quoted."""
    at_limit = "é" * (MAX_NAME_BYTES // 2)
    register(held, job_spec(at_limit))
    long_tensor = job_spec("long-tensor")
    long_tensor.tensors[1].name = at_limit + "x"
    for spec in (job_spec(at_limit + "x"), long_tensor):
        refused_registration(held, shard, spec, INVALID,
                             f"257 UTF-8 bytes, at most {MAX_NAME_BYTES} may")


def test_a_long_unknown_job_name_is_quoted_only_in_part(held):
    """Every other RPC names its job too: a 1 MiB name that no job has is NOT_FOUND with
    its first characters quoted, in every RPC."""
    long = "x" * (1 << 20)
    state = state_messages(held, HELD)
    state[0].header.job = long
    before = snapshot(held, HELD)
    for call in (lambda: list(held.PullParameters(pb.PullParametersRequest(job=long))),
                 lambda: list(held.GetOptimizerState(pb.GetOptimizerStateRequest(job=long))),
                 lambda: held.SetOptimizerState(iter(state)),
                 lambda: send_step(held, pb.StepHeader(job=long, step=2, version=1)),
                 lambda: held.LeaveJob(pb.LeaveJobRequest(job=long)),
                 lambda: held.Checkpoint(pb.CheckpointRequest(job=long)),
                 lambda: held.Restore(pb.RestoreRequest(job=long)),
                 lambda: held.DeleteJob(pb.DeleteJobRequest(job=long))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown job 'xxxx" in e.value.details() and len(e.value.details()) < 400
    assert snapshot(held, HELD) == before


# ---- tensors -------------------------------------------------------------------------------

def test_at_the_tensor_limit_the_largest_headers_fit_in_a_message():
    """The default limit, from the headers' encoding: a StateHeader of that many tensors of
    the largest state (AMSGrad's exp_avg, exp_avg_sq and max_exp_avg_sq, MAX_DIMS dims of
    int64's widest each; Adafactor with momentum has two of its three entries one dim
    shorter), and a StepHeader with as many parameter groups, every number at its widest,
    fit in half of a message (and the state's hardly fits in less)."""
    n = Limits().max_tensors
    group = pb.Hyperparameters(adafactor_beta1=1, weight_decay_mode=pb.WEIGHT_DECAY_FIXED)
    for f in group.DESCRIPTOR.fields:
        if f.type in (f.TYPE_DOUBLE, f.TYPE_BOOL):
            setattr(group, f.name, 1)
    shape = [2**63 - 1] * MAX_DIMS
    state = pb.StateHeader(job="j" * MAX_NAME_BYTES, optimizer="adamw", version=2**64 - 1,
                           total_bytes=2**64 - 1, tensors=[2**32 - 1] * n, steps=[2**64 - 1] * n)
    for t in range(n):
        for field in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            state.entries.add(tensor=2**32 - 1, field=field, shape=shape, offset=2**64 - 1)
    steps = pb.StepHeader(job="j" * MAX_NAME_BYTES, worker=2**32 - 1, step=2**64 - 1,
                          tensors=[2**32 - 1] * n, groups=[group] * n, dtype=pb.FLOAT16,
                          version=2**64 - 1, session="s" * 64)
    half = MAX_MESSAGE_BYTES // 2
    assert 0.95 * half < state.ByteSize() <= half   # the largest: the limit is the state's
    assert steps.ByteSize() <= half


def test_a_job_at_the_tensor_limit_reads_its_state_back_and_one_more_is_refused(shard, held):
    """A job of the default limit's tensors, each with Adafactor's three state entries,
    registers and reads its state back (a 200K-tensor job could not); one more tensor is
    refused at registration."""
    n = Limits().max_tensors
    momentum = pb.Hyperparameters(lr=1e-3, eps=1e-30, eps2=1e-3, clip_threshold=1,
                                  decay_rate=-0.8, adafactor_beta1=0.9)
    at_limit = job_spec("at-limit", shapes=[(1,) * MAX_DIMS] * n, optimizer="adafactor",
                        group=momentum)
    over = job_spec("over", shapes=[(1,) * MAX_DIMS] * (n + 1), optimizer="adafactor",
                    group=momentum)
    refused_registration(held, shard, over, EXHAUSTED,
                         f"{n + 1} tensors, over this shard's limit of {n}")
    register(held, at_limit)
    header = state_messages(held, "at-limit")[0].header
    assert len(header.tensors) == n and len(header.entries) == 3 * n
    assert snapshot(held, "at-limit")[0] == np.full(n, 0.5, "<f4").tobytes()
