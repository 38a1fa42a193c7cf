"""A worker's side of a shard's shared-memory segment (server/segments.py): mapped when the
worker shares the shard's host and PID namespace, proven by the key found in it. Each step
then packs the gradient straight into the segment and reads the parameters back from it;
the Step stream carries only its headers.
"""
from __future__ import annotations

import hashlib
import logging
import os

import grpc
import torch

from optserve.client.payloads import TORCH_WIRE, check_reply
from optserve.proto.errors import OptserveError
from optserve.proto.shared_memory import KEY_BYTES, map_fd
from optserve.proto.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.client")


def _map(described: pb.HostSegment) -> torch.Tensor:
    """A segment the shard described, mapped whole as uint8, once its key is the one the
    shard announced (else it is another process's file: another PID namespace)."""
    fd = os.open(f"/proc/{described.pid}/fd/{described.fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if (size != described.size or described.gradient_offset + described.gradient_bytes > size
                or described.reply_offset + described.reply_bytes > size):
            raise ValueError("the segment's regions lie outside it")
        memory = torch.from_numpy(map_fd(fd, size))
    finally:
        os.close(fd)
    if hashlib.sha256(memory[:KEY_BYTES].numpy().tobytes()).digest() != described.key_sha256:
        raise ValueError("the segment holds another key: not the shard's (another PID namespace)")
    return memory


def _region(memory: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    return memory[offset:offset + nbytes]


class Segment:
    """One shard's segment for this worker, mapped, and the job's rounds segment where the
    job has one. `slots` hold every tensor of the shard at its place in the shard's flat
    layout (`tensors`, in spec order), as the job's grad dtype."""

    def __init__(self, answer: pb.AttachSharedMemoryResponse, params: list[torch.Tensor],
                 tensors: list[int], wire: torch.dtype):
        own = answer.host
        memory = _map(own)
        self.key = memory[:KEY_BYTES].numpy().tobytes()
        numel = sum(params[t].numel() for t in tensors)
        if own.gradient_bytes != numel * torch.empty((), dtype=wire).element_size():
            raise ValueError("the segment's gradient region does not fit the job's tensors")
        self.reply = _region(memory, own.reply_offset, own.reply_bytes)
        self.rounds = (_region(_map(answer.rounds), answer.rounds.reply_offset,
                               answer.rounds.reply_bytes) if answer.HasField("rounds") else None)
        self.tensors = set(tensors)
        flat = _region(memory, own.gradient_offset, own.gradient_bytes).view(wire)
        self.slots: dict[int, torch.Tensor] = {}     # spec index -> its gradient's place
        start = 0
        for t in tensors:
            self.slots[t] = flat[start:start + params[t].numel()]
            start += params[t].numel()

    def pack(self, params: list[torch.Tensor], tensors: list[int]) -> None:
        """Writes the gradients of `tensors` into their places, converted to the wire dtype."""
        for t in tensors:
            self.slots[t].copy_(params[t].grad.detach().reshape(-1))

    def receive(self, header: pb.TensorHeader, params: list[torch.Tensor]) -> pb.TensorHeader:
        """Copies a StepShared's answer, which lies in a reply region, into the parameters."""
        region = self.rounds if header.in_rounds_segment else self.reply
        if not header.shared_memory or region is None:
            raise OptserveError("the shard's answer to StepShared does not point into a segment")
        targets = check_reply(header, self.tensors, params)
        if header.total_bytes > len(region):
            raise OptserveError(f"the shard's reply of {header.total_bytes} bytes overruns the "
                                f"segment's {len(region)}")
        values = region[:header.total_bytes].view(TORCH_WIRE[header.dtype])
        start = 0
        for p in targets:
            p.data.copy_(values[start:start + p.numel()].view(p.shape))
            start += p.numel()
        return header

    def close(self) -> None:
        """Lets go of the mappings: each is unmapped once no view of it is left."""
        self.slots, self.reply, self.rounds = {}, None, None


def attach(stub, job: str, worker: int, session: str, timeout: float | None,
           params: list[torch.Tensor], tensors: list[int], wire: torch.dtype) -> Segment | None:
    """The shard's segment for this worker, mapped; None when there is none to be had (the
    shard offers none, or it lies out of this process's reach), the reason logged."""
    try:
        answer = stub.AttachSharedMemory(pb.AttachSharedMemoryRequest(
            job=job, worker=worker, session=session), timeout=timeout)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:   # a shard older than shared memory
            raise
        return None
    if answer.WhichOneof("segment") != "host":
        log.info("job %r: the shard offers no shared memory (%s): steps stream over gRPC",
                 job, answer.reason or "no reason given")
        return None
    try:
        return Segment(answer, params, tensors, wire)
    except (OSError, ValueError) as e:
        log.info("job %r: cannot map the shard's shared memory (%s): steps stream over gRPC", job, e)
        return None
