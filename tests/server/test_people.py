"""A person's data on request (issue #18): deletion while ingestion runs, suppression, lifting,
export, the audit record, and PeopleService's credentials; SQLite and partitioned PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc, people_pb2, people_pb2_grpc
from tests.conftest import RunningServer
from tests.server.test_dead_letters import dead_letters
from tests.server.test_identity import query, send
from tests.server.test_project_service import bearer, new_project

Event = ingest_pb2.Event


def people(channel: grpc.Channel) -> people_pb2_grpc.PeopleServiceStub:
    return people_pb2_grpc.PeopleServiceStub(channel)  # type: ignore[no-untyped-call]


def count(database_url: str, sql: str, **params: Any) -> int:
    return int(query(database_url, sql, **params)[0][0])


def seed_person(stub: ingest_pb2_grpc.IngestServiceStub, key: str) -> None:
    """alice: browser v-alice (anonymous, then identified), a backend event; bob elsewhere.
    v-shared is bob's first, then identified as alice too (a conflict): its anonymous
    events stay bob's."""
    send(
        stub,
        key,
        [Event(id=f"anon{n}", type="pageview", visitor_id="v-alice", url="/") for n in range(5)],
    )
    send(stub, key, [Event(id="idf", type="identify", visitor_id="v-alice", user_id="alice")])
    send(stub, key, [Event(id="srv", type="purchase", url="/buy")], user_id="alice")
    send(stub, key, [Event(id="bob1", type="pageview", visitor_id="v-bob", url="/")], user_id="bob")
    send(stub, key, [Event(id="sh0", type="pageview", visitor_id="v-shared", url="/")])
    send(stub, key, [Event(id="sh1", type="identify", visitor_id="v-shared", user_id="bob")])
    send(stub, key, [Event(id="sh2", type="identify", visitor_id="v-shared", user_id="alice")])


def event_ids(database_url: str) -> set[str]:
    return {row[0] for row in query(database_url, "SELECT event_id FROM events")}


def test_delete_a_user_with_its_visitors_links_and_dead_letters(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    seed_person(stub, key)
    # A dead letter of alice's (an invalid event of a request naming her).
    with pytest.raises(grpc.RpcError):
        send(stub, key, [Event(id="bad", type="click", url="nope")], user_id="alice")
    assert len(dead_letters(server.database_url, wait_for=1)) == 1

    answer = people(channel).DeletePerson(
        people_pb2.DeletePersonRequest(user_ids=["alice"], actor="dpo@example.com"),
        metadata=bearer(secret),
        timeout=30,
    )
    # alice's 5 anonymous events, the identify, the backend event and her identify on v-shared.
    assert answer.events == 8
    assert answer.identity_links == 2  # (v-alice, alice) and the conflicting (v-shared, alice)
    assert answer.dead_letters == 1
    assert answer.suppressed == 0
    assert event_ids(server.database_url) == {"bob1", "sh0", "sh1"}
    assert count(server.database_url, "SELECT count(*) FROM dead_letters") == 0
    remaining = query(server.database_url, "SELECT visitor_id, user_id FROM identity_links")
    assert sorted(tuple(row) for row in remaining) == [("v-bob", "bob"), ("v-shared", "bob")]
    if server.database_url.startswith("postgresql"):
        # The once-only records went with the events: a retry is judged afresh.
        assert count(server.database_url, "SELECT count(*) FROM event_ids") == 3

    audit = query(
        server.database_url,
        "SELECT id, action, actor, via, ids, counts, finished_at FROM privacy_audit",
    )
    assert len(audit) == 1
    audit_id, action, actor, via, ids, counts, finished = audit[0]
    assert (audit_id, action, actor, via) == (answer.audit_id, "delete", "dpo@example.com", "grpc")
    # The linked visitors too (the loaders of stream mode read them), hashed as well.
    assert json.loads(ids) == {
        "user": [hashlib.sha256(b"alice").hexdigest()],
        "visitor": [],
        "linked": [hashlib.sha256(b"v-alice").hexdigest()],
    }
    assert "alice" not in ids
    assert json.loads(counts)["events"] == 8
    assert finished is not None


def test_delete_by_visitor_id(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    seed_person(stub, key)
    answer = people(channel).DeletePerson(
        people_pb2.DeletePersonRequest(visitor_ids=["v-shared"]),
        metadata=bearer(secret),
        timeout=30,
    )
    assert answer.events == 3
    assert answer.identity_links == 2
    assert not event_ids(server.database_url) & {"sh0", "sh1", "sh2"}
    assert "bob1" in event_ids(server.database_url)


def test_suppression_drops_later_events_with_ok_until_lifted(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    seed_person(stub, key)
    service = people(channel)
    answer = service.DeletePerson(
        people_pb2.DeletePersonRequest(user_ids=["alice"], suppress=True),
        metadata=bearer(secret),
        timeout=30,
    )
    assert answer.suppressed == 2  # alice, and her visitor v-alice

    def suppressed() -> float:
        return REGISTRY.get_sample_value("apex_grpc_events_suppressed_total", {"project": key}) or 0

    def dropped() -> float:
        labels = {"project": key, "reason": "suppressed"}
        return REGISTRY.get_sample_value("apex_grpc_events_dropped_total", labels) or 0

    before, dropped_before = suppressed(), dropped()
    # Suppressed by user id, by visitor id; a mixed request keeps its other events.
    assert send(stub, key, [Event(id="s1", type="click", url="/")], user_id="alice") == 1
    assert send(stub, key, [Event(id="s2", type="pageview", visitor_id="v-alice", url="/")]) == 1
    mixed = [
        Event(id="s3", type="click", url="/", user_id="alice"),
        Event(id="kept", type="click", url="/", user_id="carol"),
    ]
    assert send(stub, key, mixed) == 2
    assert suppressed() - before == 3
    assert dropped() - dropped_before == 3
    stored = event_ids(server.database_url)
    assert "kept" in stored and not stored & {"s1", "s2", "s3"}
    # A suppressed person's refused events are not kept as dead letters either.
    with pytest.raises(grpc.RpcError):
        send(stub, key, [Event(id="bad", type="click", url="nope")], user_id="alice")
    with pytest.raises(grpc.RpcError):
        send(stub, key, [Event(id="bad2", type="click", url="nope")], user_id="carol")
    assert [json.loads(d["event"])["id"] for d in dead_letters(server.database_url, 1)] == ["bad2"]

    listed = service.ListSuppressions(
        people_pb2.ListSuppressionsRequest(), metadata=bearer(secret), timeout=5
    )
    assert sorted((s.kind, s.value) for s in listed.suppressions) == [
        ("user", "alice"),
        ("visitor", "v-alice"),
    ]
    lifted = service.LiftSuppression(
        people_pb2.LiftSuppressionRequest(user_ids=["alice"], visitor_ids=["v-alice"]),
        metadata=bearer(secret),
        timeout=5,
    )
    assert lifted.lifted == 2
    # The server's cache time is 0 in tests: the next request sees it.
    assert send(stub, key, [Event(id="s4", type="click", url="/")], user_id="alice") == 1
    assert "s4" in event_ids(server.database_url)
    actions = [
        row[0] for row in query(server.database_url, "SELECT action FROM privacy_audit ORDER BY id")
    ]
    assert actions == ["delete", "unsuppress"]


def test_export_a_person(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    seed_person(stub, key)
    records = [
        json.loads(item.json)
        for item in people(channel).ExportPerson(
            people_pb2.ExportPersonRequest(user_ids=["alice"]), metadata=bearer(secret), timeout=30
        )
    ]
    events = [r for r in records if r["record"] == "event"]
    links = [r for r in records if r["record"] == "identity_link"]
    assert sorted(e["event_id"] for e in events) == sorted(
        ["anon0", "anon1", "anon2", "anon3", "anon4", "idf", "srv", "sh2"]
    )
    assert records.index(links[0]) > records.index(events[-1])  # events first
    assert sorted((link["visitor_id"], link["conflict"]) for link in links) == [
        ("v-alice", False),
        ("v-shared", True),
    ]
    audit = query(server.database_url, "SELECT action, counts FROM privacy_audit")
    assert [(a, json.loads(c)) for a, c in audit] == [
        ("export", {"events": 8, "identity_links": 2})
    ]
    # Nothing was deleted.
    assert len(event_ids(server.database_url)) == 11


#: Numbers a float would change: trailing zeros, more digits than a double holds.
EXACT_DATA = '{"amount": 49.90, "big": 12345678901234567890.123456789, "n": 1e2}'


def test_export_keeps_every_column_and_the_numbers_as_stored(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    stub.IngestEvents(
        ingest_pb2.IngestEventsRequest(
            project_key=key,
            user_id="carol",
            events=[Event(id="buy", type="purchase", url="/buy?utm_source=news", data=EXACT_DATA)],
            context=ingest_pb2.RequestContext(
                client_ip="203.0.113.9",
                user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                "Gecko) Chrome/124.0.0.0 Safari/537.36",
            ),
        ),
        timeout=5,
    )
    [line] = [
        item.json
        for item in people(channel).ExportPerson(
            people_pb2.ExportPersonRequest(user_ids=["carol"]), metadata=bearer(secret), timeout=30
        )
    ]
    for number in ("49.90", "12345678901234567890.123456789"):
        assert number in line  # not 49.9 nor 1.2345678901234567e+19
    record = json.loads(line)
    columns = query(server.database_url, "SELECT * FROM events WHERE event_id = 'buy'")[0]
    assert set(record) == {"record", *columns._fields} - {"id"}
    assert record["utm_source"] == "news" and record["ip"] == "203.0.113.9"
    assert record["browser"] is not None and record["client_occurred_at"] is None


def test_people_service_needs_the_projects_secret_key(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    key, secret = new_project(server.database_url)
    send(stub, key, [Event(id="keep", type="click", url="/")], user_id="alice")
    service = people(channel)
    calls: dict[str, Callable[[Sequence[tuple[str, str]]], object]] = {
        "delete": lambda md: service.DeletePerson(
            people_pb2.DeletePersonRequest(user_ids=["alice"]), metadata=md, timeout=5
        ),
        "lift": lambda md: service.LiftSuppression(
            people_pb2.LiftSuppressionRequest(user_ids=["alice"]), metadata=md, timeout=5
        ),
        "list": lambda md: service.ListSuppressions(
            people_pb2.ListSuppressionsRequest(), metadata=md, timeout=5
        ),
        "export": lambda md: list(
            service.ExportPerson(
                people_pb2.ExportPersonRequest(user_ids=["alice"]), metadata=md, timeout=5
            )
        ),
    }
    for name, call in calls.items():
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer sk_live_wrong"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("x-apex-secret-key", key),), grpc.StatusCode.PERMISSION_DENIED),
            (bearer(key), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(metadata)
            assert caught.value.code() == code, (name, metadata)
    assert event_ids(server.database_url) == {"keep"}
    assert count(server.database_url, "SELECT count(*) FROM privacy_audit") == 0
    with pytest.raises(grpc.RpcError) as caught:
        service.DeletePerson(people_pb2.DeletePersonRequest(), metadata=bearer(secret), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deletion_while_ingestion_runs(
    server: RunningServer, channel: grpc.Channel, stub: ingest_pb2_grpc.IngestServiceStub
) -> None:
    """Thousands of the person's rows deleted in batches while another thread ingests through
    the gRPC server: no ingest call fails, the others' events all stay. On PostgreSQL the
    person's events lie in several monthly partitions of `events`."""
    key, secret = new_project(server.database_url)
    if server.database_url.startswith("postgresql"):
        assert query(server.database_url, "SELECT relkind FROM pg_class WHERE relname = 'events'")[
            0
        ][0] in ("p", b"p")
    now = datetime.now(UTC)
    for batch in range(6):
        when = Timestamp()
        when.FromDatetime(now - timedelta(days=40 * batch))  # six months: several partitions
        send(
            stub,
            key,
            [
                Event(id=f"d{batch}-{n}", type="click", url="/", visitor_id="v-del", timestamp=when)
                for n in range(500)
            ],
            user_id="deleted-user",
        )
    if server.database_url.startswith("postgresql"):
        partitions = query(
            server.database_url,
            "SELECT count(DISTINCT tableoid) FROM events WHERE user_id = 'deleted-user'",
        )[0][0]
        assert partitions >= 2
    failures: list[BaseException] = []
    sent: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        n = 0
        while not stop.is_set() or n < 20:
            try:
                events = [
                    Event(id=f"live{n}-{i}", type="pageview", url="/", visitor_id=f"w{n}")
                    for i in range(5)
                ]
                send(stub, key, events, user_id="someone")
                sent.extend(e.id for e in events)
            except BaseException as error:  # every failure is the finding
                failures.append(error)
            n += 1

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        answer = people(channel).DeletePerson(
            people_pb2.DeletePersonRequest(user_ids=["deleted-user"]),
            metadata=bearer(secret),
            timeout=120,
        )
    finally:
        stop.set()
        worker.join(60)
    assert not failures, failures[:3]
    assert answer.events == 3000
    stored = event_ids(server.database_url)
    assert not any(e.startswith("d") for e in stored)
    assert set(sent) <= stored
    assert len(sent) >= 100
