"""Job spec helpers both sides share: placement, wire dtypes, the drop reasons and the
bounds on a spec's names and shapes.

Placement is a pure function of the spec, so every worker and every shard computes the
same answer without talking to each other.
"""
from __future__ import annotations

import ctypes
import heapq
import math
from enum import Enum
from typing import Sequence

from optserve.proto import optimizers
from optserve.proto.v1 import optserve_pb2 as pb

# Job and tensor names are metric label values, log fields and checkpoint paths.
MAX_NAME_BYTES = 256      # UTF-8
# A shape is in every header entry of its tensor's state: bounded, so is the header.
MAX_DIMS = 8

WIRE_ITEMSIZE = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
DTYPE_NAMES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}
WIRE_NAMES = {dtype: name for name, dtype in DTYPE_NAMES.items()}


class DropReason(str, Enum):
    """Why a Step's gradient was received but not applied (TensorHeader.drop_reason, and
    the `reason` label of optserve_skipped_steps_total)."""
    LATE = "late"                 # sync: the step was taken without it (backup workers)
    STALE = "stale"               # async: computed more than max_staleness versions ago
    NONFINITE = "nonfinite"       # a NaN or Inf under the skip policy
    ROLLED_BACK = "rolled_back"   # the shard came back from a checkpoint at an earlier version


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def place(sizes: Sequence[int], num_shards: int) -> list[int]:
    """Shard index for each tensor: largest first onto the least-loaded shard (ties: lowest
    index). Deterministic, and within one largest tensor of perfect balance."""
    loads = [(0, s) for s in range(num_shards)]
    home = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, shard = heapq.heappop(loads)
        home[i] = shard
        heapq.heappush(loads, (load + sizes[i], shard))
    return home


def shard_tensors(spec: pb.JobSpec, shard: int) -> list[int]:
    """Spec indices of the tensors whose home is `shard`, in spec order."""
    home = place([numel(t.shape) for t in spec.tensors], max(1, spec.num_shards))
    return [i for i, s in enumerate(home) if s == shard]


def header_bytes_per_tensor() -> int:
    """The most bytes a tensor adds to a header the API sends: to a StateHeader, its entries
    (the registry's largest set of state fields, MAX_DIMS dims each) with its index and step
    count; to a StepHeader (more than a TensorHeader), its index and a parameter group of its
    own. Every number at its widest varint, every field of the group set."""
    group = pb.Hyperparameters()
    for f in group.DESCRIPTOR.fields:   # a double takes 8 bytes whatever its value
        setattr(group, f.name, max(f.enum_type.values_by_number) if f.enum_type else 1)
    shape = (2**63 - 1,) * MAX_DIMS
    state = max(pb.StateHeader(tensors=[2**32 - 1], steps=[2**64 - 1], entries=[
        pb.StateEntry(tensor=2**32 - 1, field=name, shape=dims, offset=2**64 - 1)
        for name, dims in info.state_fields(shape, group).items()]).ByteSize()
        for info in optimizers.REGISTRY.values())
    return max(state, pb.StepHeader(tensors=[2**32 - 1], groups=[group]).ByteSize())


def tensors_that_fit(message_bytes: int) -> int:
    """The most tensors (and parameter groups) a job may have for every header to fit in half
    of a message of `message_bytes`: the other half is the margin for the fixed fields."""
    return message_bytes // 2 // header_bytes_per_tensor()


def spec_key(spec: pb.JobSpec) -> bytes:
    """Canonical bytes of a spec, for "is this the same job" checks."""
    return spec.SerializeToString(deterministic=True)


def tune_malloc() -> None:
    """Keeps glibc from returning every freed multi-MB payload buffer to the OS and faulting
    it back in page by page on the next step (a measured 3.4 ms -> 0.2 ms per 4 MB chunk).
    The same as MALLOC_MMAP_THRESHOLD_=64MiB MALLOC_TRIM_THRESHOLD_=256MiB; a no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)


def dtype_name(dtype: int) -> str:
    """A wire dtype's name, also for values no DType defines (they arrive from the wire)."""
    return pb.DType.Name(dtype) if dtype in pb.DType.values() else f"unknown dtype {dtype}"
