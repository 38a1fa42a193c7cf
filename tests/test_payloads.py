"""Payload handling on both ends: the shard (kernels/state.py) decodes gradient chunks into
place as they arrive, however the chunks cut the elements, and reuses reply buffers only
once nothing reads them; the worker (client/payloads.py) writes reply chunks into its
parameters as they arrive."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from optserve.client import InvalidArgument, OptserveError
from optserve.client.payloads import Buffers
from optserve.kernels.convert import decode_reference
from optserve.proto.spec import DTYPE_NAMES
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import RawChunk, chunked
from optserve.kernels.state import BufferPool, Decoder

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def wire_bytes(values: np.ndarray, wire: str) -> bytes:
    return torch.from_numpy(values).to(TORCH[wire]).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("wire", list(TORCH))
@pytest.mark.parametrize("chunk", [1, 3, 5, 4096, 1 << 20])
def test_decoded_into_runs_whatever_the_chunk_boundaries(wire, chunk):
    """Chunks of odd sizes cut elements in two; runs scatter the payload over the layout."""
    rng = np.random.default_rng(chunk)
    out = np.full(10_000, -7.0, np.float32)
    runs = [(0, 3), (10, 1000), (2000, 1), (5000, 4321)]
    n = sum(length for _, length in runs)
    values = rng.standard_normal(n).astype(np.float32)
    payload = wire_bytes(values, wire)
    decoder = Decoder(len(payload), "test", wire, ITEMSIZE[wire], out, runs)
    for c in chunked(payload, chunk):
        decoder.add(c)
    assert decoder.finish() is True
    expected = np.full(10_000, -7.0, np.float32)
    decoded = np.empty(n, np.float32)
    decode_reference(np.frombuffer(payload, np.uint8), wire, decoded)
    pos = 0
    for start, length in runs:
        expected[start:start + length] = decoded[pos:pos + length]
        pos += length
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("wire", list(TORCH))
def test_a_nonfinite_value_cut_by_a_chunk_boundary_is_found(wire):
    values = np.ones(100, np.float32)
    values[37] = np.inf
    payload = wire_bytes(values, wire)
    decoder = Decoder(len(payload), "test", wire, ITEMSIZE[wire], np.empty(100, np.float32),
                      [(0, 100)])
    cut = 37 * ITEMSIZE[wire] + 1
    decoder.add(RawChunk(0, payload[:cut]))
    decoder.add(RawChunk(cut, payload[cut:]))
    assert decoder.finish() is False


def test_a_short_payload_is_refused():
    decoder = Decoder(8, "test", "float32", 4, np.empty(2, np.float32), [(0, 2)])
    decoder.add(RawChunk(0, b"\0" * 6))
    with pytest.raises(InvalidArgument, match="6 bytes received, expected 8"):
        decoder.finish()


def test_a_snapshot_buffer_is_reused_only_when_nothing_reads_it():
    pool = BufferPool()
    first = pool.take(1000)
    a = first.base
    reader = list(chunked(first, 300))   # views, as a reply being streamed out holds them
    del first
    gc.collect()
    second = pool.take(1000)
    b = second.base
    assert b is not a, "a buffer was handed out again while a reader still held a view of it"
    del reader, second
    gc.collect()
    third, fourth = pool.take(1000), pool.take(1000)
    assert {id(third.base), id(fourth.base)} == {id(a), id(b)}, "released buffers not reused"


def reply_stream(tensors: list[int], payload: bytes, wire: str, chunk: int) -> list:
    header = pb.TensorHeader(version=1, tensors=tensors, total_bytes=len(payload),
                             dtype=DTYPE_NAMES[wire])
    return [pb.TensorStream(header=header), *chunked(payload, chunk)]


def worker_params() -> list[torch.Tensor]:
    """Contiguous, empty and strided (a transposed view) tensors."""
    return [torch.zeros(7, 5), torch.zeros(0), torch.zeros(30, 11).t(), torch.zeros(3),
            torch.zeros(1000)]


@pytest.mark.parametrize("wire", list(TORCH))
@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_reply_is_written_into_the_parameters_whatever_the_chunk_boundaries(wire, chunk):
    params = worker_params()
    mine = [0, 1, 2, 4]                         # tensor 3 lives on another shard
    sent = [torch.randn(params[t].shape) for t in mine]
    payload = wire_bytes(torch.cat([v.reshape(-1) for v in sent]).numpy(), wire)
    buffers = Buffers(mine, params, TORCH[wire])
    header = buffers.receive(reply_stream(mine, payload, wire, chunk), params)
    assert list(header.tensors) == mine
    for t, v in zip(mine, sent):   # torch's own cast of the whole tensor is the oracle
        assert torch.equal(params[t], v.to(TORCH[wire]).float())
    assert torch.equal(params[3], torch.zeros(3))


@pytest.mark.parametrize("tensors, extra", [([0, 3], 0), ([0, 2], 4), ([0, 2], -4)],
                         ids=["another-shards-tensor", "too-long", "too-short"])
def test_reply_that_does_not_fit_the_tensors_is_refused_before_writing(tensors, extra):
    params = worker_params()
    size = sum(params[t].numel() for t in tensors) * 4 + extra
    stream = reply_stream(tensors, b"\x01" * size, "float32", 64)
    with pytest.raises(OptserveError, match="do not match this worker's tensors"):
        Buffers([0, 1, 2, 4], params, torch.float32).receive(stream, params)
    assert all(not p.any() for p in params)
