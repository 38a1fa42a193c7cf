"""The chunk codec (optserve.proto.wire) against protobuf itself, the oracle for every byte."""
from __future__ import annotations

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings

from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.wire import (CHUNK_BYTES, OptimizerStub, RawChunk, chunked, encode_chunk,
                                 parse_chunk, serialize, stream_parser)

STREAMS = [pb.StepRequest, pb.StepResponse, pb.TensorStream, pb.StateStream,
           pb.RegisterJobRequest]
OFFSETS = [0, 1, 127, 128, 16383, 16384, CHUNK_BYTES, 2**35 + 3, 2**64 - 1]
SIZES = [0, 1, 127, 128, 16384, CHUNK_BYTES]


def protobuf_bytes(stream, offset: int, data: bytes) -> bytes:
    return stream(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_encoding_is_what_protobuf_writes(stream, offset, size):
    data = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    expected = protobuf_bytes(stream, offset, data)
    assert encode_chunk(offset, memoryview(data)) == expected
    assert serialize(RawChunk(offset, data)) == expected
    parsed = parse_chunk(expected)
    assert parsed is not None, "protobuf's own encoding must take the fast path"
    assert parsed.offset == offset and bytes(parsed.data) == data


def test_parsed_chunk_is_a_view_not_a_copy():
    wire = protobuf_bytes(pb.StepRequest, 5, b"abcdef" * 1000)
    chunk = parse_chunk(wire)
    assert isinstance(chunk.data, memoryview) and chunk.data.obj is wire


def test_chunked_views_cover_the_payload():
    payload = np.arange(3 * 1000 + 7, dtype=np.float32)
    pieces = list(chunked(payload, limit=1000))
    assert [c.offset for c in pieces] == list(range(0, payload.nbytes, 1000))
    assert b"".join(bytes(c.data) for c in pieces) == payload.tobytes()
    assert all(len(c.data) <= 1000 for c in pieces)


def test_headers_go_through_protobuf():
    msg = pb.StepRequest(header=pb.StepHeader(job="j", worker=3, step=9, tensors=[1, 4]))
    wire = serialize(msg)
    assert wire == msg.SerializeToString()
    assert parse_chunk(wire) is None
    assert stream_parser(pb.StepRequest)(wire) == msg


def varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    return bytes(out + bytes([v]))


def field(number: int, wire_type: int, body: bytes) -> bytes:
    tag = varint(number << 3 | wire_type)
    return tag + (varint(len(body)) + body if wire_type == 2 else body)


# Valid protobuf that protobuf never writes this way: the codec must hand it to protobuf.
NON_CANONICAL = {
    "data before offset": field(2, 2, field(2, 2, b"xyz") + field(1, 0, varint(7))),
    "offset twice": field(2, 2, field(1, 0, varint(1)) + field(1, 0, varint(9)) + field(2, 2, b"q")),
    "unknown field": field(2, 2, field(1, 0, varint(4)) + field(2, 2, b"ab") + field(9, 0, b"\x01")),
    "chunk then header": field(2, 2, field(2, 2, b"zz")) + field(1, 2, b""),
    "header then chunk": field(1, 2, b"") + field(2, 2, field(2, 2, b"zz")),
    "overlong varint": field(2, 2, b"\x08\x85\x80\x80\x00" + field(2, 2, b"w")),
    "empty message": b"",
}


@pytest.mark.parametrize("name", NON_CANONICAL)
def test_other_valid_encodings_parse_as_protobuf_parses_them(name):
    wire = NON_CANONICAL[name]
    assert_same_as_protobuf(pb.StepRequest, wire)


def assert_same_as_protobuf(stream, wire: bytes) -> None:
    try:
        expected = stream.FromString(wire)
    except DecodeError:
        with pytest.raises(DecodeError):
            stream_parser(stream)(wire)
        return
    got = stream_parser(stream)(wire)
    if expected.WhichOneof("kind") == "chunk":
        assert isinstance(got, RawChunk)
        assert got.offset == expected.chunk.offset and bytes(got.data) == expected.chunk.data
    else:
        assert got == expected


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_as_protobuf_parses_them(wire):
    assert_same_as_protobuf(pb.StepRequest, wire)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=300), st.integers(0, 400), st.binary(max_size=3))
def test_damaged_chunks_parse_as_protobuf_parses_them(offset, data, cut, junk):
    """Truncated, extended and overwritten encodings of real chunks."""
    wire = protobuf_bytes(pb.StepResponse, offset, data)
    for damaged in (wire[:cut], wire + junk, junk + wire[len(junk):]):
        assert_same_as_protobuf(pb.StepResponse, damaged)


def test_generated_stub_and_codec_stub_get_the_same_answers(shard):
    """The codec changes no byte on the wire: a plain protobuf client reads the same reply."""
    import torch
    from optserve.client import RemoteOptimizer
    from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc

    model = torch.nn.Linear(1100, 1000)  # 4.4 MB: two chunks
    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[shard.address], job="wire")
    with grpc.insecure_channel(shard.address) as channel:
        request = pb.PullParametersRequest(job="wire")
        plain = list(pb_grpc.OptimizerStub(channel).PullParameters(request))
        fast = list(OptimizerStub(channel).PullParameters(request))
    assert fast[0] == plain[0] and plain[0].WhichOneof("kind") == "header"
    assert [(c.offset, bytes(c.data)) for c in fast[1:]] == \
        [(m.chunk.offset, m.chunk.data) for m in plain[1:]]
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    assert b"".join(bytes(c.data) for c in fast[1:]) == expected.tobytes()
    opt.close()


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_steps_whose_tensors_straddle_chunk_boundaries(shard, wire):
    """Gradients packed chunk by chunk and decoded chunk by chunk: tensors that start and end
    inside chunks (9 MB fp32, 4.5 MB bf16: several 4 MiB chunks), a tensor without a
    gradient in the middle, and the oracle fed the same rounded gradients."""
    import torch
    from optserve.client import RemoteOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1500), torch.nn.Linear(1500, 700),
                                torch.nn.Linear(700, 11))
    oracle = [p.detach().clone().requires_grad_() for p in model.parameters()]
    dtype = getattr(torch, wire)
    opt = RemoteOptimizer(model.parameters(), "adamw", servers=[shard.address],
                          job=f"straddle-{wire}", grad_dtype=wire, lr=1e-2)
    ref = torch.optim.AdamW(oracle, lr=1e-2)
    for step in range(3):
        for k, (p, q) in enumerate(zip(model.parameters(), oracle)):
            g = torch.randn(p.shape)
            none = k == 2 and step == 1   # the middle weight sits out one step
            p.grad = None if none else g.clone()
            q.grad = None if none else g.to(dtype).float()
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), oracle):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.close()
