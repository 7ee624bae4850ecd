"""APEX_RETENTION_DAYS on the server: events older than the retention period are refused with
INVALID_ARGUMENT naming their timestamp (400 over HTTP), since the next `db retention` would
remove them (issue 16, item 3). On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from apex_ingest.common.settings import ServerSettings, load
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project, start_server
from tests.server.test_grpc_integration import ingest, rejection, rows

Event = ingest_pb2.Event


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


@pytest.fixture
def server(database_url: str) -> Iterator[RunningServer]:
    running = start_server(database_url, retention_days=30)
    yield running
    running.server.stop(0)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]


def test_events_older_than_the_retention_period_are_refused(
    stub: Any, server: RunningServer
) -> None:
    key = make_project(server.database_url)
    now = datetime.now(UTC)
    old = Event(id="old", type="a", url="/", timestamp=stamp(now - timedelta(days=30, minutes=1)))
    recent = Event(id="recent", type="a", url="/", timestamp=stamp(now - timedelta(days=29)))
    code, fields, _ = rejection(lambda: ingest(stub, key, recent, old))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert list(fields) == ["events[1].timestamp"]
    assert "30 days" in fields["events[1].timestamp"]
    assert rows(server.database_url) == []  # the request is refused whole
    assert ingest(stub, key, recent, Event(id="now", type="a", url="/")) == 2


def test_without_a_retention_period_old_events_are_kept(database_url: str) -> None:
    running = start_server(database_url)
    try:
        key = make_project(database_url)
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            old = Event(type="a", url="/", timestamp=stamp(datetime(1999, 1, 1, tzinfo=UTC)))
            assert ingest(stub, key, old) == 1
    finally:
        running.server.stop(0)


def test_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APEX_RETENTION_DAYS", raising=False)
    assert load(ServerSettings).retention is None
    monkeypatch.setenv("APEX_RETENTION_DAYS", "400")
    assert load(ServerSettings).retention == timedelta(days=400)
    monkeypatch.setenv("APEX_RETENTION_DAYS", "0")
    with pytest.raises(ValueError, match="APEX_RETENTION_DAYS"):
        load(ServerSettings)
