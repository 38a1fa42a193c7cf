"""RemoteOptimizer: a torch.optim.Optimizer whose step runs on optserve shards.

    opt = RemoteOptimizer(model.named_parameters(), torch.optim.AdamW,
                          servers=["127.0.0.1:50051"], job="run-1", lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

step() streams each gradient to the shard that owns its tensor (all shards at once,
client/transport.py), packed chunk by chunk (client/payloads.py), and copies the updated
parameters into `param.data` chunk by chunk as they come back. When step() raises, some
parameters may already hold the new values: pull_parameters() brings the model back in line
with the shards.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import grpc
import torch

from optserve.client.options import JobOptions, placement, ranks, servers_from_env
from optserve.client.payloads import TORCH_WIRE, Buffers, packed_chunks
from optserve.client.shm import Segment, attach
from optserve.client.transport import Shards, delete_job, delete_on
from optserve.proto import optimizers, state_codec
from optserve.proto.errors import InvalidArgument, OptserveError
from optserve.proto.spec import DropReason, tune_malloc
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk, chunked

log = logging.getLogger("optserve.client")


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


def _resolve_optimizer(optimizer: str | type, hyperparameters: dict[str, Any]
                       ) -> tuple[optimizers.OptimizerInfo, dict[str, Any]]:
    """(the registry entry, the param-group defaults) of `optimizer`: a registry name takes
    the registry's defaults (under its peer's names), a peer class its own; an argument
    that neither has is refused by name."""
    if not isinstance(optimizer, str):
        return optimizers.peer_class(optimizer).resolve(hyperparameters)
    info = optimizers.REGISTRY.get(optimizer)
    if info is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of "
                         f"{sorted(optimizers.REGISTRY)}, or pass an optimizer class "
                         f"({', '.join(sorted(p.path for p in optimizers.PEERS.values()))})")
    unknown = set(hyperparameters) - set(info.defaults)
    if unknown:
        raise TypeError(f"{optimizer} got unexpected hyperparameters {sorted(unknown)}")
    return info, dict(info.defaults)


class RemoteOptimizer(torch.optim.Optimizer):
    """A torch optimizer that runs on optserve shards.

    Args:
      params: parameters, `model.named_parameters()`, or param-group dicts, as for torch.
      optimizer: the optimizer class to run, which then takes its own keyword arguments
        with its own defaults (torch.optim.AdamW, torch.optim.Adam, torch.optim.Adafactor,
        adamp.AdamP, transformers.optimization.Adafactor, lion_pytorch.Lion: the keys of
        optserve.proto.optimizers.PEERS; its implementation switches such as foreach or
        fused are accepted and change nothing), or a name in
        optserve.proto.optimizers.REGISTRY ("adamw", "adam", "adamp", "adafactor",
        "torch_adafactor", "lion"), which takes the same arguments and a few of optserve's
        own (weight_decay_mode; eps_mode for adam and adamw; maximize for lion).
      servers: shard addresses ("host:port"); tensors are placed on them by size. Default:
        $OPTSERVE_SERVERS, comma-separated.
      job: the job's name; every worker of one training run uses the same.
      rank, world_size: this worker's index and the number of workers (torch.distributed's
        names). Default: the initialised process group's, else $RANK and $WORLD_SIZE (as
        torchrun sets them), else 0 and 1.
      resume: continue a job that has taken steps with a rank an earlier process held (a
        restarted worker, the crash-recovery recipe). Without it that registration fails, so
        that running a script twice does not silently continue the first run.
      connect_timeout: seconds to wait for every shard to answer at construction; a shard
        that does not is named in the Unavailable raised.
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
      shared_memory: with a shard on this machine (and in this PID namespace), move the
        gradients and parameters through a shared-memory segment the shard offers, with only
        the headers on gRPC; a shard elsewhere, or one that offers none, streams as before.
        Default: on, unless $OPTSERVE_SHARED_MEMORY is 0.
      token: the job's bearer token, when the shards check tokens.
      tls_ca, tls_cert, tls_key: PEM files: the CA that signed the shards' certificates
        (TLS), and this worker's certificate and key (mutual TLS).
      **hyperparameters: the optimizer class's keyword arguments (lr, betas, eps,
        weight_decay, amsgrad, maximize, ...), or for a registry name its peer's (HF's for
        adafactor, torch's for torch_adafactor, lion-pytorch's for lion) and
        weight_decay_mode for adamw and lion, eps_mode ("torch", or "keras": Keras's ε̂ on the
        raw √v, the bias correction in the step size) for adam and adamw. Any other name is
        refused (TypeError).
    """

    def __init__(self, params, optimizer: str | type = "adamw", *,
                 servers: Sequence[str] | None = None,
                 job: str, rank: int | None = None, world_size: int | None = None,
                 resume: bool = False, connect_timeout: float = 5.0, mode: str = "sync",
                 backup_workers: int = 0, max_staleness: int | None = None,
                 staleness_lr: bool = False, timeout: float | None = None,
                 on_timeout: str = "fail", grad_dtype: str = "float32",
                 param_dtype: str = "float32", rpc_timeout: float | None = 600.0,
                 retries: int = 12, nonfinite: str = "refuse",
                 shared_memory: bool | None = None, token: str | None = None,
                 tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, **hyperparameters):
        info, defaults = _resolve_optimizer(optimizer, hyperparameters)
        servers = servers_from_env() if servers is None else servers
        rank, world_size = ranks(rank, world_size)
        options = JobOptions(servers, job, rank, world_size, mode, backup_workers, max_staleness,
                             staleness_lr, timeout, on_timeout, grad_dtype, param_dtype, nonfinite)
        options.check()
        super().__init__(params, {**defaults, **hyperparameters})
        tune_malloc()
        self.info = info
        self.job = job
        self.rank = rank
        self.dropped_steps = 0
        self._params = [p for g in self.param_groups for p in g["params"]]
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("a parameter is listed twice; torch would step it twice, a job "
                             "holds it once")
        self._initial_lrs = [info.initial_lr(g, self.defaults) for g in self.param_groups]
        groups = [self._group_proto(g, gi) for gi, g in enumerate(self.param_groups)]
        self.spec = options.spec(info.name, groups, self._tensors())
        self._shard_tensors = placement(self.spec)
        self._shards = Shards(servers, job, rpc_timeout=rpc_timeout, retries=retries, token=token,
                              tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        wire = TORCH_WIRE[self.spec.grad_dtype]
        self._buffers = [Buffers(tensors, self._params, wire) for tensors in self._shard_tensors]
        self._step_no = [0] * len(servers)   # the last step completed, per shard
        self._version = [0] * len(servers)   # the parameter version held, per shard
        self._session = os.urandom(16).hex()   # this client's claim on its rank (RegisterHeader)
        self._resume = resume
        self._segments: list[Segment | None] = [None] * len(servers)
        self._shards.wait_ready(connect_timeout)
        self._register()
        if shared_memory if shared_memory is not None else os.environ.get(
                "OPTSERVE_SHARED_MEMORY", "1") != "0":
            self._shards.call_all(self._attach)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "spec"):   # after construction: the job's tensors are registered
            raise NotImplementedError(
                "a job's tensors are fixed when it is registered: build the RemoteOptimizer "
                "with every parameter group (a frozen group can have lr=0)")
        super().add_param_group(param_group)

    # ---- construction ------------------------------------------------------------------
    def _tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, group) of every parameter, in group order."""
        out = []
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names") or [f"group{gi}.param{k}" for k in range(len(g["params"]))]
            for name, p in zip(names, g["params"]):
                if p.dtype != torch.float32:
                    raise ValueError(f"parameter {name!r} {tuple(p.shape)} is {p.dtype}; optserve "
                                     "keeps float32 masters")
                out.append((name, tuple(p.shape), gi))
        return out

    def _group_proto(self, group: dict, gi: int) -> pb.Hyperparameters:
        """A param group in the wire form; bad or conflicting values fail here (ValueError)."""
        try:
            return optimizers.group_to_proto(self.info.name, group, self._initial_lrs[gi])
        except InvalidArgument as e:
            raise ValueError(str(e)) from None

    def _register(self) -> None:
        def register(shard: int) -> pb.RegisterJobResponse:
            header = pb.RegisterHeader(spec=self.spec, shard=shard, worker=self.rank,
                                       session=self._session, resume=self._resume)
            tensors = [self._params[t] for t in self._shard_tensors[shard]]
            values = torch.empty(sum(p.numel() for p in tensors))
            msgs = [pb.RegisterJobRequest(header=header), *packed_chunks(tensors, values)]
            return self._shards.retrying(lambda: self._shards.stubs[shard].RegisterJob(
                iter(msgs), timeout=self._shards.rpc_timeout))

        for shard, reply in enumerate(self._shards.call_all(register)):
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

    def _attach(self, shard: int) -> None:
        """Maps the shard's shared-memory segment for this worker, when it offers one this
        process can reach (client/shm.py); a segment held before is let go."""
        old = self._segments[shard]
        self._segments[shard] = attach(
            self._shards.stubs[shard], self.job, self.rank, self._session,
            self._shards.rpc_timeout, self._params, self._shard_tensors[shard],
            TORCH_WIRE[self.spec.grad_dtype])
        if old is not None:
            old.close()

    @property
    def data_paths(self) -> list[str]:
        """How each shard's steps travel: "shared_memory" or "grpc"."""
        return ["grpc" if s is None else "shared_memory" for s in self._segments]

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
        # With several shards, each sees only its part: the whole gradient is checked here so
        # that a NaN/Inf anywhere skips (or refuses) the step on every shard alike.
        nonfinite = len(self._shards) > 1 and self._nonfinite(have_grad)
        replies = self._shards.call_all(lambda k: self._step_shard(k, groups, have_grad, nonfinite))
        if any(reply.dropped for reply in replies):   # once per step, however many shards
            self.dropped_steps += 1
        rolled = [reply.version for reply in replies if reply.drop_reason == DropReason.ROLLED_BACK]
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

    def _nonfinite(self, have_grad: list[bool]) -> bool:
        grads = [p.grad for t, p in enumerate(self._params) if have_grad[t]]
        return bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def _roll_back_to(self, version: int) -> None:
        """Brings every shard to `version` (the checkpoint a restarted shard came back at)
        and the model to its parameters."""
        def restore(k: int):
            if self._version[k] != version:
                reply = self._shards.stubs[k].Restore(
                    pb.RestoreRequest(job=self.job, version=version, worker=self.rank),
                    timeout=self._shards.rpc_timeout)
                self._step_no[k] = reply.last_step   # async: this worker's own step count
            self._pull(k)
        self._shards.call_all(restore)

    def _step_shard(self, shard: int, groups, have_grad, nonfinite: bool) -> pb.TensorHeader:
        tensors = [t for t in self._shard_tensors[shard] if have_grad[t]]
        step = self._step_no[shard] + 1
        header = pb.StepHeader(job=self.job, worker=self.rank, step=step, tensors=tensors,
                               groups=groups, dtype=self.spec.grad_dtype,
                               version=self._version[shard], session=self._session,
                               nonfinite=nonfinite)
        if self._segments[shard] is None:
            reply = self._step_streamed(shard, header, tensors)
        else:
            try:
                reply = self._step_shared(shard, header, tensors)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # The shard no longer knows the segment (it restarted), or refused the step:
                # attach again and send it once more, which refuses it again if it was wrong.
                # A client that cannot attach (another holds its rank) gets the step's error.
                log.info("job %r: shard %d refused a shared-memory step (%s); attaching again",
                         self.job, shard, e.details())
                try:
                    self._attach(shard)
                except grpc.RpcError:
                    raise e from None
                header.ClearField("shared_memory_key")
                reply = (self._step_streamed(shard, header, tensors) if self._segments[shard] is None
                         else self._step_shared(shard, header, tensors))
        if reply.dropped:
            log.info("job %r: shard %d dropped this worker's %s gradient for step %d",
                     self.job, shard, reply.drop_reason, step)
        # sync: steps are numbered by version, so a late worker catches up to the job's.
        if self.spec.mode == pb.SYNC:
            self._step_no[shard] = reply.version
        else:
            self._step_no[shard] = (reply.last_step if reply.drop_reason == DropReason.ROLLED_BACK
                                    else step)
        self._version[shard] = reply.version
        return reply

    def _step_streamed(self, shard: int, header: pb.StepHeader, tensors: list[int]) -> pb.TensorHeader:
        """The step over its gRPC stream: the gradient out and the parameters back in chunks."""
        buffers = self._buffers[shard]
        grads = [self._params[t].grad for t in tensors]

        def requests():
            yield pb.StepRequest(header=header)
            yield from packed_chunks(grads, buffers.send)

        return self._shards.retrying(lambda: buffers.receive(
            self._shards.stubs[shard].Step(requests(), timeout=self._shards.rpc_timeout), self._params))

    def _step_shared(self, shard: int, header: pb.StepHeader, tensors: list[int]) -> pb.TensorHeader:
        """The step through the shard's segment: a unary call carries the two headers."""
        segment = self._segments[shard]
        segment.pack(self._params, tensors)
        header.shared_memory_key = segment.key
        return self._shards.retrying(lambda: segment.receive(
            self._shards.stubs[shard].StepShared(header, timeout=self._shards.rpc_timeout),
            self._params))

    def _pull(self, shard: int) -> None:
        """Overwrites this shard's parameters with its current values."""
        request = pb.PullParametersRequest(job=self.job)
        reply = self._shards.retrying(lambda: self._buffers[shard].receive(
            self._shards.stubs[shard].PullParameters(request, timeout=self._shards.rpc_timeout), self._params))
        self._version[shard] = reply.version

    def pull_parameters(self) -> None:
        """Overwrites the local parameters with the shards' current values."""
        self._shards.call_all(self._pull)

    # ---- state dicts in torch's format -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's format: an "adamw" state dict loads into torch.optim.AdamW and back."""
        self.state.clear()
        for header, payload in self._shards.call_all(self._get_state):
            steps = dict(zip(header.tensors, header.steps))
            for (t, field), value in state_codec.unpack(header, payload).items():
                if steps[t] == 0:
                    continue  # never stepped: torch keeps no state for it
                p = self._params[t]
                name, shape = self.info.peer_field(field, tuple(p.shape))   # the peer's
                value = torch.from_numpy(value.copy())
                self.state[p][name] = (value if shape is None else value.reshape(shape)).to(p.device)
            for t, s in steps.items():
                if s:
                    self.state[self._params[t]]["step"] = (
                        torch.tensor(float(s)) if self.info.step_is_tensor else int(s))
        try:
            return super().state_dict()
        finally:
            self.state.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads torch's format and pushes the optimizer state to the shards. The groups'
        options fixed at registration (amsgrad and eps_mode; Adafactor's beta1) must be the
        job's: a state dict of an eps_mode="keras" job does not load into a torch-ε job."""
        groups = self.param_groups
        super().load_state_dict(state_dict)
        try:
            for gi, g in enumerate(self.param_groups):
                for k, v in self.defaults.items():
                    g.setdefault(k, v)
                loaded = dict(self.info.fixed_options(self._group_proto(g, gi)))
                registered = dict(self.info.fixed_options(self.spec.groups[gi]))
                if loaded != registered:
                    differ = [k for k in registered if loaded[k] != registered[k]]
                    theirs = {k: loaded[k] for k in differ}
                    ours = {k: registered[k] for k in differ}
                    raise ValueError(f"the state dict's group {gi} has {theirs}, the job was "
                                     f"registered with {ours}: build the RemoteOptimizer with "
                                     "the same options")
            self._shards.call_all(self._set_state)
        except BaseException:
            self.param_groups = groups
            raise
        finally:
            self.state.clear()

    def _get_state(self, shard: int) -> tuple[pb.StateHeader, bytes]:
        header, parts = None, []
        for msg in self._shards.stubs[shard].GetOptimizerState(
                pb.GetOptimizerStateRequest(job=self.job), timeout=self._shards.rpc_timeout):
            if isinstance(msg, RawChunk):
                parts.append(msg.data)
            else:
                header = msg.header
        return header, b"".join(parts)

    def _set_state(self, shard: int) -> pb.SetOptimizerStateResponse:
        tensors = self._shard_tensors[shard]
        header = pb.StateHeader(job=self.job, optimizer=self.info.name, tensors=tensors)
        entries = []
        for t in tensors:
            p, spec = self._params[t], self.spec.tensors[t]
            st = self.state.get(p, {})
            fields = self.info.state_fields(tuple(spec.shape), self.spec.groups[spec.group])
            peer = {name: self.info.peer_field(name, tuple(p.shape)) for name in fields}
            held = "step" in st or any(peer[name][0] in st for name in fields)
            # lion_pytorch keeps no step count (Lion needs none): a tensor with state has stepped
            header.steps.append(int(st.get("step", 1 if held else 0)))
            for name, shape in sorted(fields.items()):
                peer_name, peer_shape = peer[name]
                value = st.get(peer_name) if held else None
                if value is None and held:
                    raise ValueError(f"the state of {spec.name!r} has no {peer_name!r} (it has "
                                     f"{sorted(st)}): a state dict of another optimizer?")
                if value is None:
                    value = torch.zeros(shape)
                elif peer_shape is not None:   # the peer's shape, e.g. torch's kept dims
                    if tuple(value.shape) != peer_shape:
                        raise ValueError(f"state {peer_name!r} of {spec.name!r} has shape "
                                         f"{tuple(value.shape)}, expected {peer_shape}")
                    value = value.reshape(shape)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"state {name!r} of {spec.name!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(shape)}")
                entries.append((t, name, value.detach().to("cpu", torch.float32).numpy()))
        payload = state_codec.pack(header, entries)
        msgs = [pb.StateStream(header=header), *chunked(payload)]
        return self._shards.stubs[shard].SetOptimizerState(iter(msgs),
                                                           timeout=self._shards.rpc_timeout)

    # ---- the job ------------------------------------------------------------------------
    def checkpoint(self) -> int:
        """Asks every shard to checkpoint the job now; returns the version checkpointed."""
        replies = self._shards.call_all(lambda k: self._shards.stubs[k].Checkpoint(
            pb.CheckpointRequest(job=self.job), timeout=self._shards.rpc_timeout))
        return min(r.version for r in replies)

    def leave(self) -> None:
        """Tells the shards this worker is gone, so sync steps stop waiting for it."""
        request = pb.LeaveJobRequest(job=self.job, worker=self.rank, session=self._session)
        self._shards.call_all(lambda k: self._shards.stubs[k].LeaveJob(
            request, timeout=self._shards.rpc_timeout))

    def delete_job(self) -> None:
        """Deletes the job on every shard (parameters, optimizer state, metric series and
        checkpoints) and closes this optimizer; other workers' next calls get NotFound."""
        if self._shards.closed:   # after close(): over connections of its own
            delete_job(self._shards.addresses, self.job, **self._shards.credentials)
            return
        try:
            self._shards.call_all(lambda k: delete_on(self._shards.stubs[k], self.job,
                                                      self._shards.rpc_timeout))
        finally:
            self.close(leave=False)

    def close(self, leave: bool = True) -> None:
        """Leaves the job (unless leave=False) and closes the connections. The job stays on
        the shards (see delete_job). Closing twice does nothing."""
        if self._shards.closed:
            return
        if leave:
            try:
                self.leave()
            except OptserveError as e:  # closing must not fail because a shard is gone
                log.info("job %r: could not leave cleanly: %s", self.job, e)
        self._shards.close()
        for segment in self._segments:
            if segment is not None:
                segment.close()

    def __enter__(self) -> "RemoteOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
