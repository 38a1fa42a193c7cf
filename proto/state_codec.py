"""The optimizer state on the wire (GetOptimizerState, SetOptimizerState), both ways.

A StateHeader lists entries (tensor, torch's field name, shape, byte offset) and each
tensor's step count; the payload that follows holds every entry's float32 values,
little-endian, back to back in entry order. The client packs what it sends and unpacks
what it reads with the same functions the shard uses.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from optserve.proto.errors import InvalidArgument
from optserve.proto.v1 import optserve_pb2 as pb

Key = tuple[int, str]            # (spec index of the tensor, field name)

# The largest step count a client may set. The kernels take counts as float64, exact up to
# 2^53: from here 2^52 more steps stay exact, and their int64 is far from wrapping.
MAX_STEP = 2**52 - 1


def pack(header: pb.StateHeader, entries: Iterable[tuple[int, str, np.ndarray]]) -> bytes:
    """Adds each (tensor, field, values) to header.entries, back to back, sets total_bytes,
    and returns the payload."""
    parts, offset = [], 0
    for tensor, field, values in entries:
        data = np.ascontiguousarray(values, "<f4").tobytes()
        header.entries.add(tensor=tensor, field=field, shape=values.shape, offset=offset)
        parts.append(data)
        offset += len(data)
    header.total_bytes = offset
    return b"".join(parts)


def check_layout(header: pb.StateHeader, expected: Mapping[Key, tuple[int, ...]], what: str,
                 names: Mapping[int, str] | None = None) -> None:
    """Refuses (InvalidArgument) a header whose entries are not exactly `expected`, each of
    its shape, contiguous from byte 0, with total_bytes their sum, or with a step count over
    MAX_STEP: checked before a single payload byte is received or allocated. `names` name
    the tensors in messages."""
    name = (lambda t: repr(names[t])) if names else str
    for t, step in zip(header.tensors, header.steps):
        if step > MAX_STEP:
            raise InvalidArgument(f"{what}: tensor {name(t)} has step count {step}; at most "
                                  f"2^52 - 1 ({MAX_STEP}) may be set")
    got = {(e.tensor, e.field): e for e in header.entries}
    if set(got) != set(expected) or len(got) != len(header.entries):
        raise InvalidArgument(f"{what}: state entries {sorted(got)} do not match the expected "
                              f"fields {sorted(expected)}")
    total = 0
    for e in sorted(header.entries, key=lambda e: e.offset):
        shape = tuple(expected[(e.tensor, e.field)])
        if tuple(e.shape) != shape:
            raise InvalidArgument(f"{what}: state {e.field!r} of tensor {name(e.tensor)} has "
                                  f"shape {tuple(e.shape)}, expected {shape}")
        if e.offset != total:
            raise InvalidArgument(f"{what}: state entries must be contiguous: {e.field!r} of "
                                  f"tensor {name(e.tensor)} at byte {e.offset}, expected {total}")
        total += 4 * math.prod(shape)
    if header.total_bytes != total:
        raise InvalidArgument(f"{what}: state payload declared as {header.total_bytes} bytes, "
                              f"its entries need {total}")


def unpack(header: pb.StateHeader, payload) -> dict[Key, np.ndarray]:
    """Every entry's values, shaped, as float32 views into `payload`."""
    return {(e.tensor, e.field): np.frombuffer(payload, "<f4", count=math.prod(e.shape),
                                               offset=e.offset).reshape(tuple(e.shape))
            for e in header.entries}
