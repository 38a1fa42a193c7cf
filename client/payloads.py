"""Tensor payloads on the worker: gradients packed into the wire dtype chunk by chunk just
before each chunk is sent, and the shard's reply written into the parameters chunk by
chunk as it arrives, into buffers kept per shard.

Fresh memory costs a page fault per 4 KiB the first time it is written: filling a fresh
400 MB buffer took 6x as long as refilling a used one, so the buffers are reused every step.
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterator

import numpy as np
import torch

from optserve.proto.errors import OptserveError
from optserve.proto.spec import WIRE_ITEMSIZE
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import CHUNK_BYTES, Assembler, RawChunk

if sys.byteorder != "little":  # the wire format is little-endian and we send native bytes
    raise ImportError("optserve.client needs a little-endian machine")

TORCH_WIRE = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}


def packed_chunks(tensors: list[torch.Tensor], out: torch.Tensor) -> Iterator[RawChunk]:
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


class Buffers:
    """One shard's payload buffers, reused every step: a send buffer in the wire dtype, and
    room for every tensor's reply as float32."""

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
        targets = check_reply(header, self.tensors, params)
        reply = WriteBack(header.total_bytes, targets, self.inbox[:header.total_bytes],
                           TORCH_WIRE[header.dtype])
        for msg in it:
            if not isinstance(msg, RawChunk):
                raise OptserveError("the shard's reply has a second header")
            reply.add(msg)
        reply.finish()
        return header


def check_reply(header: pb.TensorHeader, mine: set[int], params: list[torch.Tensor]
                ) -> list[torch.Tensor]:
    """The parameters a reply's payload holds, in order, once its header fits them."""
    targets = [params[t] for t in header.tensors if t in mine]
    itemsize = WIRE_ITEMSIZE.get(header.dtype, 0)
    if header.dtype not in TORCH_WIRE or len(targets) != len(header.tensors) \
            or header.total_bytes != itemsize * sum(p.numel() for p in targets):
        raise OptserveError(f"the shard's reply announces {header.total_bytes} bytes of "
                            f"dtype {header.dtype} for tensors {list(header.tensors)}, "
                            "which do not match this worker's tensors")
    return targets


class WriteBack(Assembler):
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
