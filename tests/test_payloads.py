"""The shard's payload handling (server/payloads.py): decoding chunks into place as they
arrive, however the chunks cut the elements, and reusing reply buffers only once nothing
reads them."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from optserve.client import InvalidArgument
from optserve.kernels import reference
from optserve.proto.wire import RawChunk, chunked
from optserve.server.payloads import Decoder, SnapshotPool

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
    reference.decode(np.frombuffer(payload, np.uint8), wire, decoded)
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
    pool = SnapshotPool()
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
