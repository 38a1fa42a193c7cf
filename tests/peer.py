"""Talking to a shard as a plain protobuf peer would: the generated stub and messages, none
of optserve's chunk codec. Tests that send malformed or hand-built streams use these, which
also checks that the shard's codec accepts what protobuf itself writes."""
from __future__ import annotations

from optserve.proto.v1 import optserve_pb2 as pb


def chunks(payload: bytes, limit: int) -> list[pb.Chunk]:
    """`payload` as protobuf Chunk messages of at most `limit` bytes."""
    view = memoryview(payload).cast("B")
    return [pb.Chunk(offset=off, data=bytes(view[off:off + limit]))
            for off in range(0, len(view), limit)]
