"""Dead letters (issue #17): the events of requests refused for their content, kept bounded."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.deadletters import (
    MAX_EVENT_BYTES,
    DeadLetterRecorder,
    event_from_record,
    prune,
    replay,
)
from apex_ingest.server.errors import FieldViolation, InvalidRequest
from apex_ingest.server.models import DeadLetter
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project

Event = ingest_pb2.Event


def dead_letters(database_url: str, wait_for: int = 0) -> list[dict[str, Any]]:
    """The dead letters, waiting up to 3 s for at least `wait_for` of them."""
    engine = create_engine(database_url)
    deadline = time.monotonic() + 3
    try:
        while True:
            with engine.connect() as connection:
                found = [
                    dict(row._mapping)
                    for row in connection.execute(text("SELECT * FROM dead_letters ORDER BY id"))
                ]
            if len(found) >= wait_for or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        engine.dispose()


def count_events(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM events")).scalar_one())
    finally:
        engine.dispose()


def test_a_refused_request_with_a_known_key_is_kept_with_its_reasons(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    request = ingest_pb2.IngestEventsRequest(
        project_key=key,
        user_id="u1",
        events=[
            Event(id="ok-1", type="pageview", url="/fine", data='{"n": 1.50}'),
            Event(id="bad-1", type="click", url="ftp://nope", visitor_id="v1"),
            Event(id="own-1", type="click", url="/", user_id="u2"),  # its own user (the SDK's)
        ],
        context=ingest_pb2.RequestContext(
            client_ip="::ffff:192.0.2.1", user_agent="UA\x01/1", request_id="req-1"
        ),
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.IngestEvents(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the answer is unchanged
    kept = dead_letters(server.database_url, wait_for=2)
    assert [row["event_index"] for row in kept] == [0, 1, 2]
    assert {row["reason"] for row in kept} == {"invalid_argument"}
    assert json.loads(kept[0]["violations"]) == []  # valid, refused with its request
    assert [v["field"] for v in json.loads(kept[1]["violations"])] == ["events[1].url"]
    event = event_from_record(kept[0]["event"])
    assert event is not None and event.data == '{"n": 1.50}' and event.id == "ok-1"
    # IP and UA as events store them.
    assert kept[1]["ip"] == "::ffff:c000:201"  # normalized as events store it
    assert kept[1]["user_agent"] == "UA/1"
    assert kept[1]["user_id"] == "u1" and kept[1]["request_id"] == "req-1"
    assert kept[2]["user_id"] == "u2"
    assert count_events(server.database_url) == 0  # still not events


def test_origin_refusals_are_kept_and_unknown_keys_never(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url, allowed_origins=("https://shop.example",))
    events = [Event(type="pageview", url="/")]
    with pytest.raises(grpc.RpcError) as unknown:
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(project_key="pk_live_nobody", events=events), timeout=5
        )
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as foreign:
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(
                project_key=key,
                events=events,
                context=ingest_pb2.RequestContext(origin="https://evil.example"),
            ),
            timeout=5,
        )
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
    kept = dead_letters(server.database_url, wait_for=1)
    assert len(kept) == 1
    assert kept[0]["reason"] == "permission_denied"
    assert kept[0]["origin"] == "https://evil.example"
    assert json.loads(kept[0]["violations"])[0]["field"] == "context.origin"


def test_a_big_event_is_kept_cut_and_marked(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    big = json.dumps({"blob": "x" * 20_000})
    with pytest.raises(grpc.RpcError):
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(
                project_key=key, events=[Event(id="big", type="", url="/", data=big)]
            ),
            timeout=5,
        )
    kept = dead_letters(server.database_url, wait_for=1)
    assert len(kept[0]["event"].encode()) <= MAX_EVENT_BYTES
    record = json.loads(kept[0]["event"])
    assert record["truncated"] is True and record["id"] == "big"
    assert event_from_record(kept[0]["event"]) is None  # cannot be replayed


def _invalid(key: str, events: int = 1) -> tuple[ingest_pb2.IngestEventsRequest, InvalidRequest]:
    request = ingest_pb2.IngestEventsRequest(
        project_key=key, events=[Event(type="", url="/") for _ in range(events)]
    )
    return request, InvalidRequest([FieldViolation("events[0].type", "is required")])


def _projects(database_url: str, count: int) -> tuple[sessionmaker[Session], list[int]]:
    factory = create_session_factory(create_db_engine(database_url))
    ids = []
    for n in range(count):
        make_project(database_url, name=f"p{n}")
    with factory() as session:
        ids = list(session.scalars(text("SELECT id FROM projects ORDER BY id")))
    return factory, ids


def test_a_flood_from_one_key_stays_within_its_cap_and_costs_others_nothing(
    database_url: str,
) -> None:
    factory, (flooder, other) = _projects(database_url, 2)
    recorder = DeadLetterRecorder(factory, max_rows=50, queue_size=800)
    request, error = _invalid("k", events=10)
    recorder.record(other, "other", *_invalid("o", events=3))
    assert recorder.flush()
    started = time.perf_counter()
    for _ in range(200):
        recorder.record(flooder, "flooder", request, error)
    assert time.perf_counter() - started < 0.5  # queueing only: 2,000 events
    assert recorder.flush(30)
    with factory() as session:
        counts: dict[int, int] = dict(
            session.execute(
                text("SELECT project_id, count(*) FROM dead_letters GROUP BY project_id")
            ).all()
        )
    assert counts[flooder] <= 50 and counts[other] == 3
    # The newest are kept.
    with factory() as session:
        newest = session.scalars(select(DeadLetter.id).order_by(DeadLetter.id.desc())).first()
        oldest_kept = session.scalars(
            select(DeadLetter.id).where(DeadLetter.project_id == flooder).order_by(DeadLetter.id)
        ).first()
    assert newest is not None and oldest_kept is not None and newest - oldest_kept == 49


def test_the_queue_is_shared_fairly_and_never_blocks(database_url: str) -> None:
    factory, (flooder, other) = _projects(database_url, 2)
    gate = threading.Event()

    class Blocked:
        """A session factory whose writes wait for the gate (a slow database)."""

        def begin(self) -> Any:
            gate.wait(10)
            return factory.begin()

    recorder = DeadLetterRecorder(Blocked(), queue_size=16)  # type: ignore[arg-type]
    request, error = _invalid("k")
    started = time.perf_counter()
    taken = [recorder.record(flooder, "flooder", request, error) for _ in range(100)]
    assert time.perf_counter() - started < 0.5
    assert sum(taken) <= 3  # one being written, at most 16 // 8 queued
    assert recorder.record(other, "other", *_invalid("o"))  # room left for the others
    gate.set()
    assert recorder.flush(10)
    with factory() as session:
        projects = set(session.scalars(select(DeadLetter.project_id)))
    assert other in projects


def test_a_failing_write_is_dropped_quietly(database_url: str) -> None:
    class Broken:
        def begin(self) -> Any:
            raise RuntimeError("database on fire")

    recorder = DeadLetterRecorder(Broken())  # type: ignore[arg-type]
    assert recorder.record(1, "p", *_invalid("k"))
    assert recorder.flush()


def test_age_and_total_caps(database_url: str) -> None:
    factory, (project,) = _projects(database_url, 1)
    recorder = DeadLetterRecorder(factory)
    for _ in range(5):
        recorder.record(project, "p", *_invalid("k", events=2))
    assert recorder.flush()
    with factory.begin() as session:
        first = session.scalars(select(DeadLetter.id).order_by(DeadLetter.id)).first()
        session.execute(
            update(DeadLetter)
            .where(DeadLetter.id == first)
            .values(received_at=datetime.now(UTC) - timedelta(days=8))
        )
    with factory.begin() as session:
        prune(session, datetime.now(UTC) - timedelta(days=7), max_total=6)
    with factory() as session:
        left = list(session.scalars(select(DeadLetter.id).order_by(DeadLetter.id)))
    assert len(left) == 6 and first not in left


def test_hostile_values_are_kept_without_breaking_other_rows(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url)
    with pytest.raises(grpc.RpcError) as refused:
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(
                project_key=key,
                user_id="a\x00b",
                events=[Event(id="n", type="t\x00", url="/\x00")],
                context=ingest_pb2.RequestContext(origin="https://x.example\x00"),
            ),
            timeout=5,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (kept,) = dead_letters(server.database_url, wait_for=1)
    assert kept["user_id"] == "ab" and json.loads(kept["event"])["type"] == "t\x00"


def test_dead_letters_are_scrubbed_as_events_are() -> None:
    """Secret query parameters never reach a dead letter either (CONTRACT.md section 4)."""
    from apex_ingest.server.deadletters import scrub_event

    event = {
        "url": "https://shop.example/login?user=a&password=hunter2&plan=pro",
        "referrer": "https://x.example/?token=abc&ref=1",
        "data": "{}",
    }
    scrubbed = scrub_event(event, frozenset({"plan"}))
    assert scrubbed["url"] == (
        "https://shop.example/login?user=a&password=[redacted]&plan=[redacted]"
    )
    assert scrubbed["referrer"] == "https://x.example/?token=[redacted]&ref=1"


def test_record_refused_keeps_every_violation_stores_nothing_and_never_replays(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    """RecordRefused: a request the gateway refused for JSON type errors (their fields empty)."""
    key = make_project(server.database_url)
    request = ingest_pb2.IngestEventsRequest(
        project_key=key,
        events=[
            Event(id="t1", type="click", url="ftp://nope", visitor_id="v1"),
            Event(id="t2", type="", url="/ok"),  # its type was a number: it arrives empty
        ],
        context=ingest_pb2.RequestContext(client_ip="192.0.2.7", request_id="req-7"),
    )
    edge = [
        ingest_pb2.FieldViolation(field="events[0].referrer", description="must be a string"),
        ingest_pb2.FieldViolation(field="events[1].type", description="must be a string"),
    ]
    refused = ingest_pb2.RecordRefusedRequest(request=request, violations=edge)
    with pytest.raises(grpc.RpcError) as answer:
        stub.RecordRefused(refused, timeout=5)
    # The server's own violations only, none about a field the gateway reported.
    assert answer.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert answer.value.details() is not None and "events[0].url" in answer.value.details()
    assert "events[1].type" not in answer.value.details()
    kept = dead_letters(server.database_url, wait_for=2)
    assert [[v["field"] for v in json.loads(row["violations"])] for row in kept] == [
        ["events[0].referrer", "events[0].url"],
        ["events[1].type"],
    ]
    assert {row["reason"] for row in kept} == {"invalid_argument"}
    assert kept[0]["ip"] == "192.0.2.7" and kept[0]["request_id"] == "req-7"
    assert json.loads(kept[0]["event"])["incomplete"] is True
    assert event_from_record(kept[0]["event"]) is None  # never replayed: fields are missing
    assert count_events(server.database_url) == 0

    # Nothing more to say (only type errors), even if the caller asked to store: OK, kept, and
    # still nothing stored. A replay leaves it refused for what it was.
    request.events[0].url = "/fine"
    request.validate_only = False
    stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request, violations=edge))
    kept = dead_letters(server.database_url, wait_for=4)
    assert len(kept) == 4 and count_events(server.database_url) == 0
    project_id = kept[-1]["project_id"]
    engine = create_db_engine(server.database_url)
    try:
        result = replay(create_session_factory(engine), project_id, frozenset())
    finally:
        engine.dispose()
    assert result.replayed == 0 and count_events(server.database_url) == 0
    again = {row["id"]: json.loads(row["violations"]) for row in dead_letters(server.database_url)}
    assert again[kept[-2]["id"]] == [
        {"field": "events[0].referrer", "description": "must be a string"}
    ]

    # An unknown key: nothing kept, the gateway answers its own 401.
    request.project_key = "pk_unknown"
    with pytest.raises(grpc.RpcError) as unknown:
        stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request, violations=edge))
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(0.3)
    assert len(dead_letters(server.database_url)) == 4


def test_record_refused_marks_only_the_emptied_events_and_keeps_origin_refusals_as_such(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key = make_project(server.database_url, allowed_origins=("https://shop.example",))
    request = ingest_pb2.IngestEventsRequest(
        project_key=key,
        partial=True,  # ignored: every violation is answered, every event kept
        events=[Event(id="i0", type="t", url="/"), Event(id="i1", type="t", url="ftp://x")],
        context=ingest_pb2.RequestContext(origin="https://shop.example"),
    )
    edge = [ingest_pb2.FieldViolation(field="events[0].data", description="must be a JSON object")]
    with pytest.raises(grpc.RpcError) as answer:
        stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request, violations=edge))
    assert answer.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # events[1].url
    kept = dead_letters(server.database_url, wait_for=2)
    # Only the event the edge emptied is incomplete; its intact sibling can be replayed.
    assert event_from_record(kept[0]["event"]) is None
    assert event_from_record(kept[1]["event"]) is not None
    assert json.loads(kept[1]["violations"]) == [
        {
            "field": "events[1].url",
            "description": json.loads(kept[1]["violations"])[0]["description"],
        }
    ]

    # A refused origin stays a permission_denied dead letter, with the edge's violations too.
    request.context.origin = "https://evil.example"
    with pytest.raises(grpc.RpcError) as denied:
        stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request, violations=edge))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    kept = dead_letters(server.database_url, wait_for=4)[2:]
    assert {row["reason"] for row in kept} == {"permission_denied"}
    assert [v["field"] for v in json.loads(kept[0]["violations"])] == [
        "events[0].data",
        "context.origin",
    ]

    # No violation at all: nothing refused the request, nothing is kept.
    with pytest.raises(grpc.RpcError) as empty:
        stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.3)
    assert len(dead_letters(server.database_url)) == 4 and count_events(server.database_url) == 0


@pytest.mark.parametrize(
    "field",
    [
        "events[0].data.k{n}",
        # Naming no event of the request: counted as the request's own, bounded as such, and
        # filed on every event, all of them then incomplete.
        "events[{n_beyond}].url",
    ],
)
def test_record_refused_keeps_a_bounded_number_of_the_callers_violations(
    server: RunningServer, stub: ingest_pb2_grpc.IngestServiceStub, field: str
) -> None:
    key = make_project(server.database_url)
    request = ingest_pb2.IngestEventsRequest(
        project_key=key, events=[Event(id="b1", type="t", url="/")]
    )
    flood = [
        ingest_pb2.FieldViolation(
            field=field.format(n=n, n_beyond=1000 + n), description="x" * 5000
        )
        for n in range(100)
    ]
    stub.RecordRefused(ingest_pb2.RecordRefusedRequest(request=request, violations=flood))
    row = dead_letters(server.database_url, wait_for=1)[0]
    kept = json.loads(row["violations"])
    assert len(kept) == 20
    assert all(len(v["description"]) == 512 for v in kept)
    assert event_from_record(row["event"]) is None  # incomplete either way
