"""One retention setting (APEX_RETENTION_DAYS) for the servers and `db retention`, which says
what it removed; an accepted event is never deleted at the next maintenance and then
"accepted" again without being stored (issue 16, items 2 and 3)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import requests
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import create_engine, text

from apex_ingest.ops import partitions
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project, start_server

Event = ingest_pb2.Event


def retention_cli(
    database_url: str, *args: str, days: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APEX_DATABASE_URL": database_url}
    env.pop("APEX_RETENTION_DAYS", None)
    if days is not None:
        env["APEX_RETENTION_DAYS"] = days
    return subprocess.run(
        [sys.executable, "-m", "apex_ingest", "db", "retention", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stamp(moment: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment)
    return result


def count(database_url: str, sql: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def server_without_horizon(database_url: str) -> Iterator[RunningServer]:
    """A server as before the setting existed: it accepts events of any age."""
    running = start_server(database_url)
    yield running
    running.server.stop(0)


def send(server: RunningServer, key: str, *events: ingest_pb2.Event) -> int:
    with grpc.insecure_channel(server.target) as channel:
        stub: Any = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        request = ingest_pb2.IngestEventsRequest(project_key=key, events=list(events))
        return int(stub.IngestEvents(request, timeout=10).received)


def test_a_removed_event_is_never_accepted_again_without_being_stored(
    database_url: str, server_without_horizon: RunningServer
) -> None:
    """The issue's story: an old event lands in events_default, retention deletes it, and its
    repeat was answered {"received": 1} and stored nowhere (its id outlived it)."""
    key = make_project(database_url)
    old = Event(id="old-1", type="a", url="/", timestamp=stamp(datetime(2001, 5, 17, tzinfo=UTC)))
    assert send(server_without_horizon, key, old, Event(id="new-1", type="a", url="/")) == 2

    out = retention_cli(database_url, days="400")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "keeping 400 days (APEX_RETENTION_DAYS)" in lines
    where = "events_default" if "postgresql" in database_url else "events"
    assert f"deleted 1 rows from {where}" in lines
    assert "no partition is old enough" not in out.stdout
    if "postgresql" in database_url:
        assert "forgot 1 event ids of removed events" in lines
        assert count(database_url, "SELECT count(*) FROM event_ids") == 1

    # A server that keeps 400 days refuses the repeat, naming its timestamp...
    horizon = start_server(database_url, retention_days=400)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            send(horizon, key, old)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        horizon.server.stop(0)
    # ...and one that keeps everything stores it again: never "accepted" and not stored.
    assert send(server_without_horizon, key, old) == 1
    stored = "SELECT count(*) FROM events WHERE event_id = 'old-1'"
    assert count(database_url, stored) == 1
    assert send(server_without_horizon, key, Event(id="new-1", type="a", url="/")) == 1
    assert count(database_url, "SELECT count(*) FROM events WHERE event_id = 'new-1'") == 1


def test_retention_needs_a_period(sqlite_url: str) -> None:
    result = retention_cli(sqlite_url)
    assert result.returncode == 2
    assert "APEX_RETENTION_DAYS" in result.stderr and "--days" in result.stderr


def test_days_override_the_setting_and_say_so(sqlite_url: str) -> None:
    result = retention_cli(sqlite_url, "--days", "30", days="400")
    assert result.returncode == 0, result.stderr
    assert "keeping 30 days (--days)" in result.stdout
    assert "deleted 0 rows from events" in result.stdout
    assert "shorter than APEX_RETENTION_DAYS=400" in result.stderr


@pytest.mark.postgres
def test_retention_reports_partitions_rows_and_ids(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    key = make_project(postgres_url)
    now = datetime.now(UTC)
    two_years = partitions.add_months(partitions.month_start(now), -24)
    try:
        with engine.begin() as connection:
            partitions.create_month_partition(connection, two_years)
        server = start_server(postgres_url)
        try:
            events = [
                Event(id=f"p{i}", type="a", url="/", timestamp=stamp(two_years + timedelta(i)))
                for i in range(3)
            ]
            events.append(Event(id="d", type="a", url="/", timestamp=stamp(datetime(2001, 1, 1))))
            assert send(server, key, *events, Event(id="now", type="a", url="/")) == 5
        finally:
            server.server.stop(0)
        out = retention_cli(postgres_url, "--days", "400")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert f"dropped partition {partitions.partition_name(two_years)} (3 rows)" in lines
        assert "deleted 1 rows from events_default" in lines
        assert "forgot 4 event ids of removed events" in lines
        again = retention_cli(postgres_url, "--days", "400").stdout.splitlines()
        assert "dropped no partition (none ends before that)" in again
        assert "deleted 0 rows from events_default" in again
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_migration_0004_fills_occurred_at_and_forgets_ids_without_events(
    postgres_url: str,
) -> None:
    from alembic import command

    from apex_ingest.ops.migrate import alembic_config, upgrade

    key = make_project(postgres_url)
    command.downgrade(alembic_config(postgres_url), "0003")
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            project = connection.execute(
                text("SELECT id FROM projects WHERE key = :k"), {"k": key}
            ).scalar_one()
            when = datetime(2026, 11, 3, tzinfo=UTC)
            connection.execute(
                text(
                    "INSERT INTO events (project_id, event_id, type, url, data, occurred_at, "
                    "received_at) VALUES (:p, 'kept', 'a', '/', '{}', :t, now())"
                ),
                {"p": project, "t": when},
            )
            connection.execute(
                text(
                    "INSERT INTO event_ids (project_id, event_id, received_at) "
                    "VALUES (:p, 'kept', now()), (:p, 'gone', now())"
                ),
                {"p": project},
            )
        upgrade(postgres_url)
        with engine.connect() as connection:
            ids = connection.execute(text("SELECT event_id, occurred_at FROM event_ids")).all()
        assert [(row[0], row[1]) for row in ids] == [("kept", when)]
    finally:
        engine.dispose()


def test_an_old_event_over_http_is_a_400_naming_timestamp(sqlite_url: str) -> None:
    from tests.service import running_service

    key = make_project(sqlite_url)
    with running_service(sqlite_url, env={"APEX_RETENTION_DAYS": "30"}) as service:
        old = (datetime.now(UTC) - timedelta(days=31)).isoformat()
        body = {"type": "pageview", "visitorId": "v", "projectKey": key, "url": "/"}
        answer = requests.post(f"{service.base_url}/api/events", json={**body, "timestamp": old})
        assert answer.status_code == 400, answer.text
        fields = [detail["field"] for detail in answer.json()["error"]["details"]]
        assert fields == ["timestamp"]
        ok = requests.post(f"{service.base_url}/api/events", json=body)
        assert ok.status_code == 200, ok.text
