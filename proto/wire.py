"""Tensor streams on the wire: chunking, reassembly, and a codec that skips protobuf's copies.

Every streaming message of the API is `oneof kind { <Header> header = 1; Chunk chunk = 2; }`,
and nearly all the bytes are in chunks of up to 4 MiB. protobuf (upb) copies a `bytes` field
when it is set, when the message is serialized, when it is parsed and on every read of the
field: four copies of every payload byte per hop, more than gRPC itself costs. This codec
writes and reads the chunk case itself, in exactly the bytes protobuf writes, so sending a
chunk costs one copy and receiving one costs none. Headers and every other message still go
through protobuf, and a peer that uses the generated code sees no difference.

Both sides use it: `OptimizerStub` on the client, `add_servicer` on the shard. Received
chunks arrive as `RawChunk`s whose `data` is a view into gRPC's message buffer.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from optserve.proto.errors import InvalidArgument
from optserve.proto.v1 import optserve_pb2 as pb
from optserve.proto.v1 import optserve_pb2_grpc as pb_grpc

# Chunks stay well under gRPC's default 4 MiB message limit once framed.
CHUNK_BYTES = 4 * 1024 * 1024 - 1024
# The message limit shards and channels set: room for a chunk and any header; anything
# larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]

SERVICE = pb.DESCRIPTOR.services_by_name["Optimizer"]

# protobuf tags (field number << 3 | wire type) of the chunk case.
_TAG_CHUNK = 2 << 3 | 2     # <Stream>.chunk, length-delimited
_TAG_OFFSET = 1 << 3 | 0    # Chunk.offset, varint
_TAG_DATA = 2 << 3 | 2      # Chunk.data, length-delimited


class Undecodable(NamedTuple):
    """A request whose bytes protobuf cannot parse. The shard's deserializer returns it
    instead of raising, which gRPC would answer with a bare INTERNAL; the servicer answers
    INVALID_ARGUMENT with `detail`."""
    detail: str


class RawChunk(NamedTuple):
    """A chunk of a tensor stream: `data` sits at byte `offset` of the announced payload."""
    offset: int
    data: memoryview | bytes


def chunked(payload, limit: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    """A payload (anything with the buffer protocol) as chunks of at most `limit` bytes. The
    chunks are views: nothing is copied until they are serialized."""
    view = memoryview(payload).cast("B")
    for off in range(0, len(view), limit):
        yield RawChunk(off, view[off:off + limit])


# ---- encoding --------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(offset: int, data) -> bytes:
    """The serialized `<Stream>(chunk=Chunk(offset=offset, data=data))`, byte for byte what
    protobuf writes (proto3 leaves out zero and empty fields), with one copy of `data`."""
    size = len(memoryview(data).cast("B"))
    fields = b""
    if offset:
        fields += bytes((_TAG_OFFSET,)) + _varint(offset)
    if size:
        fields += bytes((_TAG_DATA,)) + _varint(size)
    head = bytes((_TAG_CHUNK,)) + _varint(len(fields) + size) + fields
    return head + data if size else head


def serialize(message) -> bytes:
    """The request/response serializer of every method: RawChunks by hand, the rest by protobuf."""
    if isinstance(message, RawChunk):
        return encode_chunk(message.offset, message.data)
    return message.SerializeToString()


# ---- decoding --------------------------------------------------------------------------------
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); (-1, pos) for a truncated or overlong varint."""
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return (value, pos) if value < 2**64 else (-1, pos)
        shift += 7
    return -1, pos


def parse_chunk(buf: bytes) -> RawChunk | None:
    """The chunk in a serialized stream message, when it is in the canonical form that
    protobuf writes; None for anything else (a header, unknown fields, another field order),
    which protobuf then parses. `data` is a view into `buf`."""
    end = len(buf)
    if end < 2 or buf[0] != _TAG_CHUNK:
        return None
    length, pos = _read_varint(buf, 1)
    if length < 0 or pos + length != end:
        return None
    offset = 0
    if pos < end and buf[pos] == _TAG_OFFSET:
        offset, pos = _read_varint(buf, pos + 1)
        if offset < 0:
            return None
    if pos == end:
        return RawChunk(offset, b"")
    if buf[pos] != _TAG_DATA:
        return None
    size, pos = _read_varint(buf, pos + 1)
    if size < 0 or pos + size != end:
        return None
    return RawChunk(offset, memoryview(buf)[pos:])


def stream_parser(message_type):
    """The deserializer of a `oneof {header; chunk}` stream: chunks come out as RawChunks
    (however they were encoded), every other message as the protobuf message."""
    def parse(buf: bytes):
        fast = parse_chunk(buf)
        if fast is not None:
            return fast
        message = message_type.FromString(buf)
        if message.WhichOneof("kind") == "chunk":
            return RawChunk(message.chunk.offset, message.chunk.data)
        return message
    return parse


def _is_stream(descriptor) -> bool:
    """A message of the `oneof kind { header = 1; chunk = 2; }` shape."""
    fields = descriptor.fields_by_name
    return ("kind" in descriptor.oneofs_by_name and "chunk" in fields
            and fields["chunk"].number == 2 and fields["chunk"].message_type.name == "Chunk")


def _parser(descriptor):
    message_type = getattr(pb, descriptor.name)
    return stream_parser(message_type) if _is_stream(descriptor) else message_type.FromString


def _tolerant(parse, name: str):
    """`parse`, with bytes that do not parse as a `name` turned into an Undecodable."""
    def tolerant(buf: bytes):
        try:
            return parse(buf)
        except DecodeError as e:
            return Undecodable(f"the request is not a valid {name} message ({e})")
    return tolerant


def _kind(method) -> str:
    return (("stream" if method.client_streaming else "unary") + "_"
            + ("stream" if method.server_streaming else "unary"))


# ---- both ends -------------------------------------------------------------------------------
class OptimizerStub(pb_grpc.OptimizerStub):
    """The generated client stub with every method on this codec."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        for method in SERVICE.methods:
            call = getattr(channel, _kind(method))
            setattr(self, method.name, call(f"/{SERVICE.full_name}/{method.name}",
                                            request_serializer=serialize,
                                            response_deserializer=_parser(method.output_type)))


def add_servicer(servicer: pb_grpc.OptimizerServicer, server: grpc.Server) -> None:
    """Serves `servicer` as add_OptimizerServicer_to_server does, with this codec; requests
    that do not parse reach it as Undecodable."""
    handlers = {
        method.name: getattr(grpc, f"{_kind(method)}_rpc_method_handler")(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(_parser(method.input_type), method.input_type.name),
            response_serializer=serialize)
        for method in SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


# ---- reassembly ------------------------------------------------------------------------------
class Assembler:
    """Receives chunks of a payload of known size into a preallocated buffer, refusing
    gaps, overlaps, reorderings and overruns with INVALID_ARGUMENT."""

    def __init__(self, total_bytes: int, what: str, out: np.ndarray | None = None):
        self.total = total_bytes
        self.what = what
        self.buf = out if out is not None else np.empty(total_bytes, np.uint8)
        self.filled = 0

    def add(self, chunk: RawChunk) -> None:
        n = len(chunk.data)
        if chunk.offset != self.filled:
            raise InvalidArgument(
                f"{self.what}: chunk at byte offset {chunk.offset}, expected {self.filled} "
                "(chunks must be contiguous and in order)")
        if self.filled + n > self.total:
            raise InvalidArgument(
                f"{self.what}: {self.filled + n} bytes received, more than the {self.total} expected")
        if n == 0 and self.total:
            raise InvalidArgument(f"{self.what}: empty chunk")
        self._land(np.frombuffer(chunk.data, np.uint8))
        self.filled += n

    def _land(self, data: np.ndarray) -> None:
        """Puts a checked chunk's bytes where they belong."""
        self.buf[self.filled:self.filled + len(data)] = data

    def finish(self) -> np.ndarray:
        if self.filled != self.total:
            raise InvalidArgument(
                f"{self.what}: {self.filled} bytes received, expected {self.total} (missing chunks)")
        return self.buf
