"""The gRPC server over a real port, on SQLite and on PostgreSQL: one test per contract rule."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import revoke_project
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer, make_project, start_server
from tests.tcp_proxy import TcpProxy

Event = ingest_pb2.Event


@pytest.fixture
def key(server: RunningServer) -> str:
    return make_project(server.database_url)


def rows(database_url: str, where: str = "1=1") -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    data_sql = "data::text" if engine.dialect.name == "postgresql" else "data"
    try:
        with engine.connect() as connection:
            result = connection.execute(
                text(
                    "SELECT event_id, type, visitor_id, user_id, url, referrer,"
                    f" {data_sql} AS data,"
                    f" occurred_at, received_at, ip, user_agent FROM events WHERE {where}"
                    " ORDER BY id"
                )
            )
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def ingest(
    stub: ingest_pb2_grpc.IngestServiceStub, key: str, *events: ingest_pb2.Event, **extra: Any
) -> int:
    request = ingest_pb2.IngestEventsRequest(project_key=key, events=list(events), **extra)
    return int(stub.IngestEvents(request, timeout=10).received)


def rejection(call: Any) -> tuple[grpc.StatusCode, dict[str, str], grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    status = rpc_status.from_call(error)
    fields: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                fields.update({v.field: v.description for v in bad_request.field_violations})
    return error.code(), fields, error


def as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite hands back text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_ingest_stores_every_column(stub: Any, key: str, server: RunningServer) -> None:
    when = datetime(2026, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(when)
    context = ingest_pb2.RequestContext(client_ip="203.0.113.7", user_agent="curl/8", origin="")
    received = ingest(
        stub,
        key,
        Event(
            id="evt-1",
            type="signup",
            visitor_id="v1",
            url="https://shop.example/join",
            referrer="https://search.example/",
            data='{"plan":"pro"}',
            timestamp=stamp,
        ),
        user_id="user-9",
        context=context,
    )
    assert received == 1
    [row] = rows(server.database_url)
    assert row["event_id"] == "evt-1"
    assert (row["type"], row["visitor_id"], row["user_id"]) == ("signup", "v1", "user-9")
    assert row["url"] == "https://shop.example/join"
    assert row["referrer"] == "https://search.example/"
    assert as_utc(row["occurred_at"]) == when
    assert abs(as_utc(row["received_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert (row["ip"], row["user_agent"]) == ("203.0.113.7", "curl/8")


def test_occurred_at_defaults_to_receipt(stub: Any, key: str, server: RunningServer) -> None:
    ingest(stub, key, Event(type="t", url="/"))
    [row] = rows(server.database_url)
    assert row["occurred_at"] == row["received_at"]
    assert row["event_id"]  # server-generated


EXACT = (
    '{"int":3,"float":1.0,"big":9007199254740993,"huge":123456789012345678901234567890,'
    '"pi":3.14159265358979323846264,"neg":-0.5,"text":"héllo ✓ 🎉","nested":{"a":[1,2,{"b":null}]},'
    '"t":true}'
)


def test_data_round_trips_exactly(stub: Any, key: str, server: RunningServer) -> None:
    import json
    from decimal import Decimal

    ingest(stub, key, Event(type="t", url="/", data=EXACT))
    stored = rows(server.database_url)[0]["data"]
    exact = {"parse_float": Decimal, "parse_int": int}
    assert json.loads(stored, **exact) == json.loads(EXACT, **exact)
    for literal in (
        "9007199254740993",
        "123456789012345678901234567890",
        "3.14159265358979323846264",
    ):
        assert literal in stored
    assert '"int": 3,' in stored or '"int":3,' in stored  # 3 stays 3, not 3.0


def test_batch_is_atomic(stub: Any, key: str, server: RunningServer) -> None:
    code, fields, _ = rejection(
        lambda: ingest(
            stub,
            key,
            Event(type="a", url="/"),
            Event(type="b", url="nope"),
            Event(type="c", url="/"),
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {"events[1].url"}
    assert rows(server.database_url) == []


def test_repeated_client_id_is_stored_once(stub: Any, key: str, server: RunningServer) -> None:
    assert (
        ingest(stub, key, Event(id="dup", type="a", url="/"), Event(id="dup", type="a", url="/"))
        == 2
    )
    assert (
        ingest(stub, key, Event(id="dup", type="a", url="/"), Event(id="new", type="b", url="/"))
        == 2
    )
    assert [r["event_id"] for r in rows(server.database_url)] == ["dup", "new"]


def test_same_id_in_two_projects_is_two_events(stub: Any, key: str, server: RunningServer) -> None:
    other = make_project(server.database_url, "other")
    ingest(stub, key, Event(id="same", type="a", url="/"))
    ingest(stub, other, Event(id="same", type="a", url="/"))
    assert len(rows(server.database_url)) == 2


@pytest.mark.parametrize("data", ['{"a":"x\\u0000y"}', '{"k\\u0000":1}', '{"a":[{"b":"\\u0000"}]}'])
def test_nul_is_rejected_naming_the_field(
    stub: Any, key: str, server: RunningServer, data: str
) -> None:
    code, fields, _ = rejection(
        lambda: ingest(stub, key, Event(type="a", url="/"), Event(type="a", url="/", data=data))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].data" in fields
    assert rows(server.database_url) == []


def test_unknown_key_is_unauthenticated(stub: Any, server: RunningServer) -> None:
    code, _, _ = rejection(lambda: ingest(stub, "pk_live_unknown", Event(type="a", url="/")))
    assert code is grpc.StatusCode.UNAUTHENTICATED


def test_revoked_key_is_unauthenticated(stub: Any, key: str, server: RunningServer) -> None:
    assert ingest(stub, key, Event(type="a", url="/")) == 1
    engine = create_db_engine(server.database_url)
    with create_session_factory(engine).begin() as session:
        assert revoke_project(session, key)
    engine.dispose()
    code, _, _ = rejection(lambda: ingest(stub, key, Event(type="a", url="/")))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert len(rows(server.database_url)) == 1


def test_origin_allowlist(stub: Any, server: RunningServer) -> None:
    key = make_project(server.database_url, "shop", allowed_origins=("https://shop.example",))

    def from_origin(origin: str) -> int:
        context = ingest_pb2.RequestContext(origin=origin)
        return ingest(stub, key, Event(type="a", url="/"), context=context)

    code, _, _ = rejection(lambda: from_origin("https://evil.example"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _, _ = rejection(lambda: from_origin("null"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert from_origin("https://SHOP.example:443") == 1
    assert from_origin("") == 1  # server-side callers send no Origin
    assert len(rows(server.database_url)) == 2


def test_all_violations_reported_together(stub: Any, key: str) -> None:
    code, fields, _ = rejection(
        lambda: ingest(
            stub,
            key,
            Event(type="", url="/"),
            Event(type="a", url="/", data="[]"),
            Event(type="a", url="/", id="x" * 65),
            user_id="u" * 200,
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {"user_id", "events[0].type", "events[1].data", "events[2].id"}


def test_too_many_events(stub: Any, key: str, server: RunningServer) -> None:
    code, fields, _ = rejection(lambda: ingest(stub, key, *[Event(type="a", url="/")] * 501))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in fields
    assert ingest(stub, key, *[Event(type="a", url="/")] * 500) == 500


def test_oversized_message_is_refused(stub: Any, key: str, server: RunningServer) -> None:
    big = Event(type="a", url="/", data='{"a":"' + "x" * 30_000 + '"}')
    code, _, _ = rejection(lambda: ingest(stub, key, *[big] * 100))  # ~3 MB
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rows(server.database_url) == []


def test_future_timestamp_rejected(stub: Any, key: str) -> None:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(days=2))
    code, fields, _ = rejection(
        lambda: ingest(stub, key, Event(type="a", url="/", timestamp=stamp))
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].timestamp" in fields


def test_concurrent_requests_all_stored(stub: Any, key: str, server: RunningServer) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                batch = [Event(id=f"{n}-{i}-{j}", type="a", url="/") for j in range(5)]
                ingest(stub, key, *batch)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stored = rows(server.database_url)
    assert len(stored) == len({r["event_id"] for r in stored}) == 8 * 10 * 5


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "apex_ingest.v1.IngestService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [answer] = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert {"apex_ingest.v1.IngestService", "grpc.health.v1.Health"} <= names


@pytest.mark.postgres
def test_storage_down_then_back(postgres_url: str) -> None:
    """UNAVAILABLE with RetryInfo quickly, NOT_SERVING, then recovery without a restart."""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    key = make_project(postgres_url)
    running = start_server(proxied)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            health = health_pb2_grpc.HealthStub(channel)
            assert ingest(stub, key, Event(type="a", url="/")) == 1

            proxy.cut()
            started = time.monotonic()
            code, _, error = rejection(lambda: ingest(stub, key, Event(type="b", url="/")))
            assert code is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 5
            status = rpc_status.from_call(error)
            retry = error_details_pb2.RetryInfo()
            assert status is not None and status.details[0].Unpack(retry)
            assert retry.retry_delay.seconds >= 1
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING

            proxy.restore()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert ingest(stub, key, Event(type="c", url="/")) == 1
                    break
                except grpc.RpcError as retry_error:
                    assert retry_error.code() is grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "no recovery within 10 s"
                    time.sleep(0.2)
            time.sleep(0.5)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert [r["type"] for r in rows(postgres_url)] == ["a", "c"]
    finally:
        running.server.stop(0)
        proxy.close()


def test_revocation_applies_within_cache_ttl(database_url: str) -> None:
    running = start_server(database_url, project_cache_ttl=0.5)
    key = make_project(database_url)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            assert ingest(stub, key, Event(type="a", url="/")) == 1
            engine = create_db_engine(database_url)
            with create_session_factory(engine).begin() as session:
                revoke_project(session, key)
            engine.dispose()
            time.sleep(0.6)
            code, _, _ = rejection(lambda: ingest(stub, key, Event(type="a", url="/")))
            assert code is grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.server.stop(0)


def test_calls_past_the_concurrency_limit_are_refused_with_retry_info(sqlite_url: str) -> None:
    """gRPC's own maximum_concurrent_rpcs would refuse them with no RetryInfo. The refusal must
    not wait behind the calls queued for the server's only thread."""
    import sqlite3

    running = start_server(
        sqlite_url, grpc_max_concurrent_rpcs=2, grpc_threads=1, db_statement_timeout_ms=20_000
    )
    key = make_project(sqlite_url)
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            ingest(stub, key, Event(type="warm", url="/"))  # the key is cached from here on
            holder.execute("BEGIN EXCLUSIVE")  # the next commits wait for the lock
            request = ingest_pb2.IngestEventsRequest(
                project_key=key, events=[Event(type="held", url="/")]
            )
            held = [stub.IngestEvents.future(request, timeout=30) for _ in range(2)]
            time.sleep(0.5)
            started = time.monotonic()
            code, _, error = rejection(lambda: ingest(stub, key, Event(type="refused", url="/")))
            assert time.monotonic() - started < 2
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(error)
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(retry) and retry.retry_delay.seconds == 1
            # RecordRefused too: any client causes one with a type error in its body.
            refused = ingest_pb2.RecordRefusedRequest(
                request=request,
                violations=[ingest_pb2.FieldViolation(field="events[0].data", description="x")],
            )
            code, _, _ = rejection(lambda: stub.RecordRefused(refused, timeout=5))
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            # An overloaded server is still alive to its load balancer.
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            holder.rollback()
            assert [call.result().received for call in held] == [1, 1]
            assert ingest(stub, key, Event(type="after", url="/")) == 1  # capacity is back
    finally:
        holder.close()
        running.server.stop(0)
    assert [row["type"] for row in rows(sqlite_url)] == ["warm", "held", "held", "after"]


def test_a_call_whose_deadline_passed_while_it_waited_is_not_stored(sqlite_url: str) -> None:
    """The caller was told DEADLINE_EXCEEDED: storing its events later would make a retry
    without ids a duplicate. (gRPC itself drops calls that expire before a thread takes them;
    this one expires while queued for the database writer.)"""
    import sqlite3

    running = start_server(sqlite_url, db_statement_timeout_ms=20_000)
    key = make_project(sqlite_url)
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            ingest(stub, key, Event(type="warm", url="/"))
            holder.execute("BEGIN EXCLUSIVE")

            def call(kind: str, timeout: float) -> Any:
                request = ingest_pb2.IngestEventsRequest(
                    project_key=key, events=[Event(type=kind, url="/")]
                )
                return stub.IngestEvents.future(request, timeout=timeout)

            first = call("first", 30)  # SQLite's one writer waits for the lock with it
            time.sleep(0.3)
            late = call("late", 0.5)  # queued behind it past its deadline
            with pytest.raises(grpc.RpcError) as info:
                late.result()
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            holder.rollback()
            assert first.result().received == 1
            time.sleep(0.5)  # the writer has taken the late call by now, and dropped it
    finally:
        holder.close()
        running.server.stop(0)
    assert [row["type"] for row in rows(sqlite_url)] == ["warm", "first"]


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_lists_and_calls_through_reflection(
    server: RunningServer, key: str, protocol: str
) -> None:
    """Reflection answers both protocols (grpcio-reflection ships only v1alpha; buf, grpcurl and
    Postman ask for v1 first)."""
    import json
    import subprocess
    from pathlib import Path

    buf = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "run `npm ci` (make test does) to install buf"
    base = [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    base += ["--reflect-protocol", protocol]
    listed = subprocess.run(
        [*base, "--list-methods", f"http://{server.target}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert "apex_ingest.v1.IngestService/IngestEvents" in listed
    assert "apex_ingest.v1.IngestService/IngestMany" in listed
    body = {"project_key": key, "events": [{"type": "pageview", "url": "/", "id": protocol}]}
    answer = subprocess.run(
        [
            *base,
            "-d",
            json.dumps(body),
            f"http://{server.target}/apex_ingest.v1.IngestService/IngestEvents",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(answer) == {"received": 1}
