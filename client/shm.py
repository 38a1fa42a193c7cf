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


class Segment:
    """One shard's segment, mapped. `gradient` holds every tensor of the shard at its place
    in the shard's flat layout (`tensors`, in spec order), as the job's grad dtype."""

    def __init__(self, described: pb.HostSegment, params: list[torch.Tensor], tensors: list[int],
                 wire: torch.dtype):
        fd = os.open(f"/proc/{described.pid}/fd/{described.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            numel = sum(params[t].numel() for t in tensors)
            itemsize = torch.empty((), dtype=wire).element_size()
            if (size != described.size or described.gradient_bytes != numel * itemsize
                    or described.gradient_offset + described.gradient_bytes > size
                    or described.reply_offset + described.reply_bytes > size):
                raise ValueError("the segment's size or regions do not match the job's")
            memory = torch.from_numpy(map_fd(fd, size))
        finally:
            os.close(fd)
        self.key = memory[:KEY_BYTES].numpy().tobytes()
        if hashlib.sha256(self.key).digest() != described.key_sha256:
            raise ValueError("the segment holds another key: not the shard's (another PID namespace)")
        self.tensors = set(tensors)
        grad_at = described.gradient_offset
        flat = memory[grad_at:grad_at + numel * itemsize].view(wire)
        self.reply = memory[described.reply_offset:described.reply_offset + described.reply_bytes]
        self.slots: dict[int, torch.Tensor] = {}     # spec index -> its gradient's place
        start = 0
        for t in tensors:
            self.slots[t] = flat[start:start + params[t].numel()]
            start += params[t].numel()

    def pack(self, params: list[torch.Tensor], tensors: list[int]) -> None:
        """Writes the gradients of `tensors` into their places, converted to the wire dtype."""
        for t in tensors:
            self.slots[t].copy_(params[t].grad.detach().reshape(-1))

    def receive(self, stream, params: list[torch.Tensor]) -> pb.TensorHeader:
        """Reads a Step's answer: a header alone, whose payload is in the reply region."""
        messages = list(stream)
        if len(messages) != 1 or not hasattr(messages[0], "WhichOneof") \
                or messages[0].WhichOneof("kind") != "header" or not messages[0].header.shared_memory:
            raise OptserveError("the shard's answer to a shared-memory step is not a lone "
                                "header that points into the segment")
        header = messages[0].header
        targets = check_reply(header, self.tensors, params)
        if header.total_bytes > len(self.reply):
            raise OptserveError(f"the shard's reply of {header.total_bytes} bytes overruns the "
                                f"segment's {len(self.reply)}")
        values = self.reply[:header.total_bytes].view(TORCH_WIRE[header.dtype])
        start = 0
        for p in targets:
            p.data.copy_(values[start:start + p.numel()].view(p.shape))
            start += p.numel()
        return header

    def close(self) -> None:
        """Lets go of the mapping: it is unmapped once no view of it is left."""
        self.slots, self.reply = {}, None


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
        return Segment(answer.host, params, tensors, wire)
    except (OSError, ValueError) as e:
        log.info("job %r: cannot map the shard's shared memory (%s): steps stream over gRPC", job, e)
        return None
