"""IngestMany: many independent requests in one call, on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.errors import DeadlinePassed
from apex_ingest.server.storage import EventStore
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project
from tests.server.test_grpc_integration import rows

Event = ingest_pb2.Event


def request(key: str, *events: Event, origin: str = "") -> ingest_pb2.IngestEventsRequest:
    return ingest_pb2.IngestEventsRequest(
        project_key=key,
        events=list(events),
        context=ingest_pb2.RequestContext(origin=origin, client_ip="127.0.0.1"),
    )


def event(event_id: str, url: str = "/") -> Event:
    return Event(id=event_id, type="pageview", url=url, visitor_id="v")


def test_each_request_keeps_its_own_outcome(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url, "open")
    strict = make_project(server.database_url, "strict", ("https://shop.example",))
    answer = stub.IngestMany(
        ingest_pb2.IngestManyRequest(
            requests=[
                request(key, event("a1"), event("a2")),
                request(key, event("b1"), event("b2", url="not a url")),  # one bad event
                request("pk_live_nobody", event("c1")),
                request(strict, event("d1"), origin="https://evil.example"),
                request(strict, event("e1"), origin="https://shop.example"),
                request(key),  # no events
            ]
        ),
        timeout=10,
    )
    codes = [result.status.code for result in answer.results]
    assert codes == [
        code_pb2.OK,
        code_pb2.INVALID_ARGUMENT,
        code_pb2.UNAUTHENTICATED,
        code_pb2.PERMISSION_DENIED,
        code_pb2.OK,
        code_pb2.INVALID_ARGUMENT,
    ]
    assert [result.received for result in answer.results] == [2, 0, 0, 0, 1, 0]
    # The details are those IngestEvents gives, and parse as a google.rpc.Status.
    rich = status_pb2.Status.FromString(answer.results[1].status.SerializeToString())
    bad = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("events[1].url", "must be an absolute http(s) URL or a path starting with /")
    ]
    # Only the accepted requests are stored, each whole: nothing of the refused ones.
    assert sorted(row["event_id"] for row in rows(server.database_url)) == ["a1", "a2", "e1"]


def test_twenty_requests_in_one_call_are_all_stored(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    answer = stub.IngestMany(
        ingest_pb2.IngestManyRequest(requests=[request(key, event(f"g{i}")) for i in range(20)]),
        timeout=10,
    )
    assert all(result.status.code == code_pb2.OK for result in answer.results)
    assert len(rows(server.database_url)) == 20


def test_a_repeated_call_stores_nothing_twice(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    many = ingest_pb2.IngestManyRequest(
        requests=[request(key, event("r1")), request(key, event("r1"), event("r2"))]
    )
    for _ in range(2):
        answer = stub.IngestMany(many, timeout=10)
        assert [result.received for result in answer.results] == [1, 2]
    assert sorted(row["event_id"] for row in rows(server.database_url)) == ["r1", "r2"]


def test_too_many_requests_in_one_call_is_invalid(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    with pytest.raises(grpc.RpcError) as raised:
        stub.IngestMany(
            ingest_pb2.IngestManyRequest(requests=[request(key, event("x"))] * 1001), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rows(server.database_url) == []


def test_requests_whose_deadline_passed_while_queued_are_not_stored(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    store = EventStore(create_session_factory(engine), retry_after_seconds=1)
    make_project(sqlite_url)
    row = {
        "event_id": "late",
        "type": "pageview",
        "visitor_id": None,
        "user_id": None,
        "url": "/",
        "referrer": None,
        "data": "{}",
        "occurred_at": datetime.now(UTC),
        "received_at": datetime.now(UTC),
        "ip": None,
        "user_agent": None,
    }
    errors = store.store_many([(1, [dict(row)]), (1, [dict(row, event_id="late2")])], 0.0)
    assert all(isinstance(error, DeadlinePassed) for error in errors)
    assert rows(sqlite_url) == []
    assert store.store_many([(1, [dict(row)])], time.monotonic() + 10) == [None]
    assert [r["event_id"] for r in rows(sqlite_url)] == ["late"]
    engine.dispose()
