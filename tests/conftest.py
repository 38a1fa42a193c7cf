"""Shared fixtures: real shards on loopback, and the backend the tests run against."""
from __future__ import annotations

import os

import pytest

from optserve.server import ShardServer

# The backend every end-to-end test drives; the kernel tests compare backends directly.
DEVICE = os.environ.get("OPTSERVE_TEST_DEVICE", "cpu")


@pytest.fixture
def shard():
    """A fresh shard on a free loopback port, stopped after the test."""
    server = ShardServer("127.0.0.1", 0, device=DEVICE, barrier_timeout=30.0).start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def shards():
    """Two shards, for tests that spread one job over several."""
    servers = [ShardServer("127.0.0.1", 0, device=DEVICE, barrier_timeout=30.0).start()
               for _ in range(2)]
    yield servers
    for s in servers:
        s.stop(grace=0)
