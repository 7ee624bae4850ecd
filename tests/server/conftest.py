"""Fixtures of the server tests: a running gRPC server on each database, a channel, a stub."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from apex_ingest.v1 import ingest_pb2_grpc
from tests.conftest import RunningServer, start_server


@pytest.fixture
def server(database_url: str) -> Iterator[RunningServer]:
    """A gRPC server on port 0, on SQLite and on PostgreSQL (database_url is parametrized)."""
    running = start_server(database_url)
    yield running
    running.server.stop(0)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.Channel) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
