"""RemoteOptimizer: a torch.optim.Optimizer whose step runs on optserve shards.

    opt = RemoteOptimizer(model.named_parameters(), optimizer="adamw",
                          servers=["127.0.0.1:50051"], job="run-1", lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

step() streams each gradient to the shard that owns its tensor (all shards at once),
and copies the updated parameters into `param.data` chunk by chunk as they come back.
When step() raises, some parameters may already hold the new values: pull_parameters()
brings the model back in line with the shards.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
import torch

from optserve.proto import optimizers
from optserve.proto.errors import InvalidArgument, OptserveError, from_rpc_error
from optserve.proto.spec import DTYPE_NAMES, WIRE_ITEMSIZE, numel, place, tune_malloc
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import (CHUNK_BYTES, GRPC_OPTIONS, Assembler, OptimizerStub, RawChunk,
                                 chunked)

if sys.byteorder != "little":  # the wire format is little-endian and we send native bytes
    raise ImportError("optserve.client needs a little-endian machine")

class RolledBack(OptserveError):
    """A shard came back from a checkpoint at an earlier step. The model already holds the
    parameters of that step, and every shard is back at it: replay from `step`.

        step = 0
        while step < total:
            try:
                train_step(step); step += 1
            except RolledBack as e:
                step = e.step
    """

    def __init__(self, step: int):
        super().__init__(f"the job rolled back to step {step}")
        self.step = step


_TORCH_WIRE = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}
_MODES = {"sync": pb.SYNC, "async": pb.ASYNC}
_NONFINITE = {"refuse": pb.NONFINITE_REFUSE, "skip": pb.NONFINITE_SKIP}
# Failures after which the same request is sent again: the shard answers a repeated
# (job, worker, step) from the result it already computed, so a retry is never applied twice.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Backoff between attempts, doubling up to the cap: long enough in total (~25 s with the
# default 12 retries) to ride out a shard restart.
_BACKOFF_FIRST, _BACKOFF_CAP = 0.05, 4.0
log = logging.getLogger("optserve.client")


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer that runs on optserve shards.

    Args:
      params: parameters, `model.named_parameters()`, or param-group dicts, as for torch.
      optimizer: "adamw", "adam", "adamp" or "adafactor".
      servers: shard addresses ("host:port"); tensors are placed on them by size.
      job: the job's name; every worker of one training run uses the same.
      rank, world_size: this worker's index and the number of workers (torch.distributed's names).
      mode: "sync" (average all workers' gradients, one step) or "async".
      backup_workers: sync: step once all but this many workers have sent; a late gradient
        is dropped (and counted) and the worker takes the new parameters.
      max_staleness: async: drop gradients computed on a version more than this behind.
      staleness_lr: async: scale lr by 1/staleness for stale gradients.
      timeout: sync: seconds a step waits for the other workers (None: the shard's default).
      on_timeout: sync: "fail" (DEADLINE_EXCEEDED, nothing applied, retried by the client) or
        "proceed" (step with the workers present; the missing ones rejoin when they return).
      grad_dtype, param_dtype: wire dtypes of gradients and of returned parameters:
        "float32", "bfloat16" or "float16". Master weights and state stay float32.
      rpc_timeout: seconds for any one call; retries: attempts on UNAVAILABLE or
        DEADLINE_EXCEEDED, with exponential backoff.
      nonfinite: "refuse" (a NaN/Inf gradient raises InvalidArgument, nothing applied) or
        "skip" (the step is skipped and counted, as GradScaler does on overflow).
      token: the job's bearer token, when the shards check tokens.
      tls_ca, tls_cert, tls_key: PEM files: the CA that signed the shards' certificates
        (TLS), and this worker's certificate and key (mutual TLS).
      **hyperparameters: under the peer optimizer's names (lr, betas, eps, weight_decay, ...;
        weight_decay_mode for adamw; delta, wd_ratio, nesterov for adamp; HF's names for
        adafactor).
    """

    def __init__(self, params, optimizer: str = "adamw", *, servers: Sequence[str], job: str,
                 rank: int = 0, world_size: int = 1, mode: str = "sync",
                 backup_workers: int = 0, max_staleness: int | None = None,
                 staleness_lr: bool = False, timeout: float | None = None,
                 on_timeout: str = "fail", grad_dtype: str = "float32",
                 param_dtype: str = "float32", rpc_timeout: float | None = 600.0,
                 retries: int = 12, nonfinite: str = "refuse", token: str | None = None,
                 tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, **hyperparameters):
        info = optimizers.REGISTRY.get(optimizer)
        if info is None:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(optimizers.REGISTRY)}")
        unknown = set(hyperparameters) - set(info.defaults)
        if unknown:
            raise TypeError(f"{optimizer} got unexpected hyperparameters {sorted(unknown)}")
        if mode not in _MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        for name, dtype in (("grad_dtype", grad_dtype), ("param_dtype", param_dtype)):
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be 'refuse' or 'skip', got {nonfinite!r}")
        if on_timeout not in ("fail", "proceed"):
            raise ValueError(f"on_timeout must be 'fail' or 'proceed', got {on_timeout!r}")
        if not 0 <= backup_workers < world_size:
            raise ValueError(f"backup_workers must be in [0, world_size), got {backup_workers}")
        _check_servers(servers)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if mode == "sync" and (max_staleness is not None or staleness_lr):
            raise ValueError("max_staleness and staleness_lr are for mode='async'")
        if mode == "async" and (backup_workers or timeout is not None or on_timeout != "fail"):
            raise ValueError("backup_workers, timeout and on_timeout are for mode='sync'")
        super().__init__(params, {**info.defaults, **hyperparameters})
        tune_malloc()
        self.info = info
        self.job = job
        self.rank = rank
        self.rpc_timeout = rpc_timeout
        self.retries = retries
        self.dropped_steps = 0
        self._params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("a parameter is listed twice; torch would step it twice, a job "
                             "holds it once")
        self._initial_lrs = [g.get("initial_lr", g["lr"]) or 0.0 for g in self.param_groups]
        for g in self.param_groups:
            self._group_proto(g, 0)  # conflicting or bad values fail here, not at the first step
        self.spec = self._build_spec(mode, world_size, grad_dtype, len(servers))
        self.spec.backup_workers = backup_workers
        if max_staleness is not None:
            self.spec.max_staleness = max_staleness
        self.spec.staleness_lr = staleness_lr
        self.spec.barrier_timeout_s = timeout or 0.0
        self.spec.proceed_on_timeout = on_timeout == "proceed"
        self.spec.param_dtype = DTYPE_NAMES[param_dtype]
        self.spec.nonfinite = _NONFINITE[nonfinite]
        self._wire_dtype = _TORCH_WIRE[self.spec.grad_dtype]
        home = place([numel(t.shape) for t in self.spec.tensors], len(servers))
        self._shard_tensors = [[i for i, s in enumerate(home) if s == k] for k in range(len(servers))]
        _warn_if_unbalanced(self.spec, home, len(servers))
        self._channels = [_channel(a, tls_ca, tls_cert, tls_key) for a in servers]
        calls = [grpc.intercept_channel(c, _BearerToken(token)) if token else c
                 for c in self._channels]
        self._stubs = [OptimizerStub(c) for c in calls]
        self._pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="optserve-client")
        self._buffers = [_Buffers(tensors, self._params, self._wire_dtype)
                         for tensors in self._shard_tensors]
        self._step_no = [0] * len(servers)   # the last step completed, per shard
        self._version = [0] * len(servers)   # the parameter version held, per shard
        self._closed = False
        self._session = os.urandom(16).hex()   # this client's claim on its rank (RegisterHeader)
        self._register()

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "spec"):   # after construction: the job's tensors are registered
            raise NotImplementedError(
                "a job's tensors are fixed when it is registered: build the RemoteOptimizer "
                "with every parameter group (a frozen group can have lr=0)")
        super().add_param_group(param_group)

    # ---- construction ------------------------------------------------------------------
    def _names(self) -> list[str]:
        names = []
        for gi, g in enumerate(self.param_groups):
            given = g.get("param_names")
            names += given if given else [f"group{gi}.param{k}" for k in range(len(g["params"]))]
        return names

    def _group_proto(self, group: dict, gi: int) -> pb.Hyperparameters:
        try:
            return optimizers.group_to_proto(self.info.name, group, self._initial_lrs[gi])
        except InvalidArgument as e:
            raise ValueError(str(e)) from None

    def _build_spec(self, mode: str, world_size: int, grad_dtype: str, num_shards: int) -> pb.JobSpec:
        spec = pb.JobSpec(job=self.job, optimizer=self.info.name, num_workers=world_size,
                          mode=_MODES[mode], grad_dtype=DTYPE_NAMES[grad_dtype], num_shards=num_shards)
        names = iter(self._names())
        for gi, g in enumerate(self.param_groups):
            spec.groups.append(self._group_proto(g, gi))
            for p in g["params"]:
                name = next(names)
                if p.dtype != torch.float32:
                    raise ValueError(f"parameter {name!r} {tuple(p.shape)} is {p.dtype}; optserve "
                                     "keeps float32 masters")
                spec.tensors.add(name=name, shape=list(p.shape) or [1], group=gi)
        return spec

    def _register(self) -> None:
        def register(shard: int) -> pb.RegisterJobResponse:
            header = pb.RegisterHeader(spec=self.spec, shard=shard, worker=self.rank,
                                       session=self._session)
            tensors = [self._params[t] for t in self._shard_tensors[shard]]
            values = torch.empty(sum(p.numel() for p in tensors))
            msgs = [pb.RegisterJobRequest(header=header), *_packed_chunks(tensors, values)]
            return self._retrying(lambda: self._stubs[shard].RegisterJob(iter(msgs),
                                                                          timeout=self.rpc_timeout))

        for shard, reply in enumerate(self._call_all(register)):
            self._step_no[shard], self._version[shard] = reply.last_step, reply.version
            if not reply.created:  # the job's parameters win over this worker's initial ones
                log.info("job %r exists on shard %d at version %d: joined it, with its "
                         "parameters", self.job, shard, reply.version)
                self._pull(shard)
        if self.spec.mode == pb.SYNC and len(set(self._version)) > 1:
            # A shard came back from a checkpoint while no worker that knew the newer version
            # stepped: claim the newest everywhere, so that the first step rolls every shard
            # back to the oldest (RolledBack) instead of mixing versions in one model.
            log.warning("job %r: the shards hold versions %s; the first step will roll them "
                        "back to %d", self.job, self._version, min(self._version))
            self._version = [max(self._version)] * len(self._version)

    @property
    def version(self) -> int:
        """The parameter version the model holds (the lowest over the shards): in sync mode,
        the number of steps the job has taken, which is where a restarted worker resumes."""
        return min(self._version)

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Sends the gradients to the shards, waits for the step, writes back the parameters.
        Parameters whose .grad is None are left alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._group_proto(g, gi) for gi, g in enumerate(self.param_groups)]
        have_grad = [p.grad is not None for p in self._params]
        self._check_grads(have_grad)
        # Every shard hears from every worker each step, even with no gradient for it, so
        # that a sync barrier never waits for a worker that has nothing to send.
        replies = self._call_all(lambda k: self._step_shard(k, groups, have_grad))
        if any(reply.dropped for reply in replies):   # once per step, however many shards
            self.dropped_steps += 1
        rolled = [reply.version for reply in replies if reply.drop_reason == "rolled_back"]
        if rolled:
            self._roll_back_to(min(rolled))
            raise RolledBack(min(rolled))
        return loss

    def _check_grads(self, have_grad: list[bool]) -> None:
        """Refuses, before anything is sent, what the wire format cannot carry."""
        for t, p in enumerate(self._params):
            if not have_grad[t]:
                continue
            name, registered = self.spec.tensors[t].name, tuple(self.spec.tensors[t].shape)
            if (tuple(p.shape) or (1,)) != registered:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}; the job "
                                 f"registered {registered}")
            if p.grad.layout != torch.strided:
                raise ValueError(f"parameter {name!r} has a {p.grad.layout} gradient; optserve "
                                 "takes dense gradients (e.g. nn.Embedding(sparse=False))")
            if p.grad.shape != p.shape:
                raise ValueError(f"parameter {name!r} {tuple(p.shape)} has a gradient of shape "
                                 f"{tuple(p.grad.shape)}")

    def _roll_back_to(self, version: int) -> None:
        """Brings every shard to `version` (the checkpoint a restarted shard came back at)
        and the model to its parameters."""
        def restore(k: int):
            if self._version[k] != version:
                reply = self._stubs[k].Restore(
                    pb.RestoreRequest(job=self.job, version=version, worker=self.rank),
                    timeout=self.rpc_timeout)
                self._step_no[k] = reply.last_step   # async: this worker's own step count
            self._pull(k)
        self._call_all(restore)

    def _step_shard(self, shard: int, groups, have_grad) -> pb.TensorHeader:
        tensors = [t for t in self._shard_tensors[shard] if have_grad[t]]
        step = self._step_no[shard] + 1
        header = pb.StepHeader(job=self.job, worker=self.rank, step=step, tensors=tensors,
                               groups=groups, dtype=self.spec.grad_dtype,
                               version=self._version[shard], session=self._session)
        buffers = self._buffers[shard]
        grads = [self._params[t].grad for t in tensors]

        def requests():
            yield pb.StepRequest(header=header)
            yield from _packed_chunks(grads, buffers.send)

        reply = self._retrying(lambda: buffers.receive(
            self._stubs[shard].Step(requests(), timeout=self.rpc_timeout), self._params))
        if reply.dropped:
            log.info("job %r: shard %d dropped this worker's %s gradient for step %d",
                     self.job, shard, reply.drop_reason, step)
        # sync: steps are numbered by version, so a late worker catches up to the job's.
        if self.spec.mode == pb.SYNC:
            self._step_no[shard] = reply.version
        else:
            self._step_no[shard] = reply.last_step if reply.drop_reason == "rolled_back" else step
        self._version[shard] = reply.version
        return reply

    def _pull(self, shard: int) -> None:
        """Overwrites this shard's parameters with its current values."""
        request = pb.PullParametersRequest(job=self.job)
        reply = self._retrying(lambda: self._buffers[shard].receive(
            self._stubs[shard].PullParameters(request, timeout=self.rpc_timeout), self._params))
        self._version[shard] = reply.version

    def pull_parameters(self) -> None:
        """Overwrites the local parameters with the shards' current values."""
        self._call_all(self._pull)

    # ---- state dicts in torch's format -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's format: an "adamw" state dict loads into torch.optim.AdamW and back."""
        self.state.clear()
        for header, payload in self._call_all(self._get_state):
            steps = dict(zip(header.tensors, header.steps))
            for e in header.entries:
                if steps[e.tensor] == 0:
                    continue  # never stepped: torch keeps no state for it
                p = self._params[e.tensor]
                n = numel(e.shape)
                value = np.frombuffer(payload, "<f4", count=n, offset=e.offset).copy()
                self.state[p][e.field] = torch.from_numpy(value).view(tuple(e.shape)).to(p.device)
            for t, s in steps.items():
                if s:
                    self.state[self._params[t]]["step"] = (
                        torch.tensor(float(s)) if self.info.step_is_tensor else int(s))
        try:
            return super().state_dict()
        finally:
            self.state.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads torch's format and pushes the optimizer state to the shards."""
        super().load_state_dict(state_dict)
        for gi, g in enumerate(self.param_groups):
            for k, v in self.info.defaults.items():
                g.setdefault(k, v)
            self._group_proto(g, gi)
        try:
            self._call_all(self._set_state)
        finally:
            self.state.clear()

    def _get_state(self, shard: int) -> tuple[pb.StateHeader, bytes]:
        header, parts = None, []
        for msg in self._stubs[shard].GetOptimizerState(
                pb.GetOptimizerStateRequest(job=self.job), timeout=self.rpc_timeout):
            if isinstance(msg, RawChunk):
                parts.append(msg.data)
            else:
                header = msg.header
        return header, b"".join(parts)

    def _set_state(self, shard: int) -> pb.SetOptimizerStateResponse:
        tensors = self._shard_tensors[shard]
        header = pb.StateHeader(job=self.job, optimizer=self.info.name, tensors=tensors)
        parts, offset = [], 0
        for t in tensors:
            p, spec = self._params[t], self.spec.tensors[t]
            st = self.state.get(p, {})
            header.steps.append(int(st.get("step", 0)))
            fields = self.info.state_fields(tuple(spec.shape), self.spec.groups[spec.group])
            for name, shape in sorted(fields.items()):
                value = st.get(name) if "step" in st else None
                if value is None:
                    value = torch.zeros(shape)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"state {name!r} of {spec.name!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(shape)}")
                data = value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                header.entries.add(tensor=t, field=name, shape=shape, offset=offset)
                parts.append(data)
                offset += len(data)
        header.total_bytes = offset
        payload = b"".join(parts)
        msgs = [pb.StateStream(header=header), *chunked(payload)]
        return self._stubs[shard].SetOptimizerState(iter(msgs), timeout=self.rpc_timeout)

    # ---- plumbing -----------------------------------------------------------------------
    def _call_all(self, fn) -> list:
        """Runs fn(shard) on every shard at once; raises the first failure as an OptserveError,
        once every call has ended (none is left running behind the caller's back).
        The last shard's call runs on this thread: a hand-off to the pool and back costs a
        few hundred microseconds on a busy machine, which a one-shard job need not pay."""
        if self._closed:
            raise ValueError(f"the RemoteOptimizer of job {self.job!r} is closed")
        last = len(self._stubs) - 1
        futures = [self._pool.submit(fn, k) for k in range(last)]
        try:
            try:
                mine = fn(last)
            finally:
                concurrent.futures.wait(futures)
            return [f.result() for f in futures] + [mine]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _retrying(self, call):
        """call() until it succeeds, retrying UNAVAILABLE and DEADLINE_EXCEEDED with backoff."""
        delay = _BACKOFF_FIRST
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE or attempt == self.retries:
                    raise
                log.info("job %r: %s (%s); retrying in %.2fs", self.job, e.code().name,
                         e.details(), delay)
                time.sleep(delay)
                delay = min(2 * delay, _BACKOFF_CAP)

    def checkpoint(self) -> int:
        """Asks every shard to checkpoint the job now; returns the version checkpointed."""
        replies = self._call_all(lambda k: self._stubs[k].Checkpoint(
            pb.CheckpointRequest(job=self.job), timeout=self.rpc_timeout))
        return min(r.version for r in replies)

    def leave(self) -> None:
        """Tells the shards this worker is gone, so sync steps stop waiting for it."""
        request = pb.LeaveJobRequest(job=self.job, worker=self.rank, session=self._session)
        self._call_all(lambda k: self._stubs[k].LeaveJob(request, timeout=self.rpc_timeout))

    def delete_job(self) -> None:
        """Deletes the job on every shard (parameters, optimizer state, metric series and
        checkpoints) and closes this optimizer; other workers' next calls get NotFound."""
        try:
            self._call_all(lambda k: _delete_on(self._stubs[k], self.job, self.rpc_timeout))
        finally:
            self.close(leave=False)

    def close(self, leave: bool = True) -> None:
        """Leaves the job (unless leave=False) and closes the connections. The job stays on
        the shards (see delete_job). Closing twice does nothing."""
        if self._closed:
            return
        if leave:
            try:
                self.leave()
            except OptserveError as e:  # closing must not fail because a shard is gone
                log.info("job %r: could not leave cleanly: %s", self.job, e)
        self._closed = True
        self._pool.shutdown(wait=False)
        for c in self._channels:
            c.close()

    def __enter__(self) -> "RemoteOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def delete_job(servers: Sequence[str], job: str, *, token: str | None = None,
               tls_ca: str | None = None, tls_cert: str | None = None,
               tls_key: str | None = None, timeout: float = 60.0) -> None:
    """Deletes `job` on every shard in `servers` that holds it: for a job whose workers are
    gone, or one whose registration failed part way."""
    _check_servers(servers)
    for address in servers:
        with _channel(address, tls_ca, tls_cert, tls_key) as channel:
            calls = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
            try:
                _delete_on(OptimizerStub(calls), job, timeout)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None


def _delete_on(stub: OptimizerStub, job: str, timeout: float | None) -> None:
    """DeleteJob on one shard; a shard that does not hold the job is already done."""
    try:
        stub.DeleteJob(pb.DeleteJobRequest(job=job), timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def _check_servers(servers) -> None:
    if isinstance(servers, str):
        raise TypeError(f"servers must be a list of addresses, e.g. [{servers!r}]")
    if not servers:
        raise ValueError("servers must name at least one shard")
    repeated = sorted({a for a in servers if list(servers).count(a) > 1})
    if repeated:
        raise ValueError(f"servers lists {repeated} more than once; each shard once")


def _channel(address: str, ca: str | None, cert: str | None, key: str | None) -> grpc.Channel:
    if not (ca or cert):
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    read = lambda path: open(path, "rb").read() if path else None
    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    return grpc.secure_channel(address, credentials, options=GRPC_OPTIONS)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self.metadata = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details.method, details.timeout,
                            list(details.metadata or []) + [self.metadata], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


def _packed_chunks(tensors: list[torch.Tensor], out: torch.Tensor) -> Iterator[RawChunk]:
    """The tensors back to back in `out` (converted to its dtype), as chunks of little-endian
    bytes. Each chunk is packed just before it is sent, so packing the next one overlaps
    with the shard receiving this one."""
    size = out.element_size()
    per_chunk = CHUNK_BYTES // size
    starts = list(itertools.accumulate((t.numel() for t in tensors), initial=0))
    as_bytes = out[:starts[-1]].view(torch.uint8).numpy()
    k = 0   # the first tensor not yet packed whole
    for lo in range(0, starts[-1], per_chunk):
        hi = min(lo + per_chunk, starts[-1])
        while k < len(tensors) and starts[k] < hi:   # the parts of tensors in [lo, hi)
            a, b = max(lo, starts[k]), min(hi, starts[k + 1])
            out[a:b].copy_(tensors[k].detach().reshape(-1)[a - starts[k]:b - starts[k]])
            if starts[k + 1] > hi:
                break
            k += 1
        yield RawChunk(lo * size, memoryview(as_bytes[lo * size:hi * size]))


class _Buffers:
    """One shard's payload buffers, reused every step. Fresh memory costs a page fault per
    4 KiB the first time it is written: filling a fresh 400 MB buffer took 6x as long as
    refilling a used one."""

    def __init__(self, tensors: list[int], params: list[torch.Tensor], wire_dtype: torch.dtype):
        self.tensors = set(tensors)                  # what this shard may send back
        numel = sum(params[t].numel() for t in tensors)
        self.send = torch.empty(numel, dtype=wire_dtype)
        self.inbox = np.empty(4 * numel, np.uint8)   # room for every tensor as float32

    def receive(self, stream, params: list[torch.Tensor]) -> pb.TensorHeader:
        """Reads a TensorHeader + chunks stream into the parameters it names."""
        it = iter(stream)
        first = next(it)
        if isinstance(first, RawChunk) or first.WhichOneof("kind") != "header":
            raise OptserveError("the shard's reply did not start with a header")
        header = first.header
        targets = [params[t] for t in header.tensors if t in self.tensors]
        itemsize = WIRE_ITEMSIZE.get(header.dtype, 0)
        if header.dtype not in _TORCH_WIRE or len(targets) != len(header.tensors) \
                or header.total_bytes != itemsize * sum(p.numel() for p in targets):
            raise OptserveError(f"the shard's reply announces {header.total_bytes} bytes of "
                                f"dtype {header.dtype} for tensors {list(header.tensors)}, "
                                "which do not match this worker's tensors")
        reply = _WriteBack(header.total_bytes, targets, self.inbox[:header.total_bytes],
                           _TORCH_WIRE[header.dtype])
        for msg in it:
            if not isinstance(msg, RawChunk):
                raise OptserveError("the shard's reply has a second header")
            reply.add(msg)
        reply.finish()
        return header


class _WriteBack(Assembler):
    """A reply payload that goes into the parameters as it arrives: each chunk's whole
    values are copied into their tensors while the next chunk is on its way, instead of
    all of them after the last one. `buf` holds the bytes in the wire dtype."""

    def __init__(self, total_bytes: int, targets: list[torch.Tensor], buf: np.ndarray,
                 wire: torch.dtype):
        super().__init__(total_bytes, "shard reply", out=buf)
        self.values = torch.from_numpy(buf).view(wire)
        self.itemsize = self.values.element_size()
        self.targets = targets
        self.ends = list(itertools.accumulate(p.numel() for p in targets))
        self.k = 0          # the first tensor not yet written whole
        self.written = 0    # values written back so far

    def _land(self, data: np.ndarray) -> None:
        super()._land(data)
        self._write_up_to((self.filled + len(data)) // self.itemsize)

    def _write_up_to(self, end: int) -> None:
        """Writes the values before `end` that are not yet in their tensors."""
        while self.k < len(self.targets):
            p, stop = self.targets[self.k], self.ends[self.k]
            hi = min(stop, end)
            if hi < stop and not p.is_contiguous():
                return   # a strided tensor goes in one piece once all of it is here
            if hi > self.written:
                start = stop - p.numel()
                if p.is_contiguous():
                    p.data.view(-1)[self.written - start:hi - start].copy_(
                        self.values[self.written:hi])
                else:
                    p.data.copy_(self.values[start:stop].view(p.shape))
                self.written = hi
            if hi < stop:
                return
            self.k += 1


# Below this many parameters on the busiest shard, an uneven placement costs nothing worth
# a warning: a step that small is dominated by fixed per-call costs.
_UNBALANCED_MIN_PARAMS = 1 << 20


def _warn_if_unbalanced(spec: pb.JobSpec, home: list[int], num_shards: int) -> None:
    """Placement is by whole tensors; one huge tensor can leave the shards uneven."""
    if num_shards < 2:
        return
    loads = [0] * num_shards
    for t, s in zip(spec.tensors, home):
        loads[s] += numel(t.shape)
    mean = sum(loads) / num_shards
    if max(loads) > 1.25 * mean and max(loads) >= _UNBALANCED_MIN_PARAMS:
        log.warning("job %r: placement is unbalanced (shard loads %s params, the largest tensor "
                    "has %d); tensors are never split across shards", spec.job, loads,
                    max(numel(t.shape) for t in spec.tensors))
