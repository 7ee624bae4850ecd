"""Stream mode on the local NATS node (127.0.0.1:4222): publish, load once, refuse before
publishing, UNAVAILABLE without the stream, health and keys through a database outage.

Every test makes a stream of its own (unique name and subjects) and deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import nats
import pytest
from click.testing import CliRunner
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from nats.aio.client import Client
from sqlalchemy import Connection, Engine, create_engine, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from apex_ingest.common.settings import ConfigError, ServerSettings, load
from apex_ingest.ops import loader as loader_module
from apex_ingest.ops.cli import main
from apex_ingest.ops.loader import Loader, RowFilter, loader_engine, setup_stream
from apex_ingest.server import storage, stream
from apex_ingest.server.projects import ProjectDirectory, ProjectInfo
from apex_ingest.server.storage import Row
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import make_project, start_server
from tests.tcp_proxy import TcpProxy

NATS_URL = os.environ.get("APEX_TEST_NATS_URL", "nats://127.0.0.1:4222")
Event = ingest_pb2.Event


def stream_settings(database_url: str, **extra: Any) -> ServerSettings:
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "database_url": database_url,
        "stream_url": NATS_URL,
        "stream_name": f"APEX_TEST_{tag}",
        "stream_subject": f"apextest.{tag}",
        "stream_consumer": f"loaders-{tag}",
        "stream_ack_wait": 1.0,
        "project_cache_ttl": 0.0,
        "health_interval": 0.2,
        **extra,
    }
    return ServerSettings(**values)


async def _delete_stream(settings: ServerSettings) -> None:
    client = await nats.connect(settings.stream_servers)
    try:
        await client.jetstream().delete_stream(settings.stream_name)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await client.close()


@pytest.fixture
def settings(database_url: str) -> Iterator[ServerSettings]:
    """Stream settings with a stream and consumer of this test's own, set up and deleted."""
    configured = stream_settings(database_url)
    asyncio.run(setup_stream(configured))
    yield configured
    asyncio.run(_delete_stream(configured))


async def _stream_state(settings: ServerSettings) -> tuple[int, int]:
    """(messages in the stream, consumer's pending + unacknowledged)."""
    client = await nats.connect(settings.stream_servers)
    try:
        js = client.jetstream()
        info = await js.stream_info(settings.stream_name)
        consumer = await js.consumer_info(settings.stream_name, settings.stream_consumer)
        return info.state.messages, consumer.num_pending + consumer.num_ack_pending
    finally:
        await client.close()


def stream_state(settings: ServerSettings) -> tuple[int, int]:
    return asyncio.run(_stream_state(settings))


@contextlib.asynccontextmanager
async def consumer(settings: ServerSettings) -> AsyncIterator[tuple[Client, Any]]:
    """A connection to the stream, and a pull subscription on the loaders' durable consumer."""
    client = await nats.connect(settings.stream_servers)
    try:
        subscription = await client.jetstream().pull_subscribe_bind(
            durable=settings.stream_consumer, stream=settings.stream_name
        )
        yield client, subscription
    finally:
        await client.close()


def load_all(
    settings: ServerSettings,
    filters: Sequence[RowFilter] = (),
    engine: Engine | None = None,
    wait: float = 0.5,
) -> int:
    """Run one loader until the stream has nothing for it within `wait`; messages loaded."""

    async def go() -> int:
        own = engine or loader_engine(settings)
        try:
            async with consumer(settings) as (client, subscription):
                loader = Loader(settings, own, list(filters))
                total = 0
                while loaded := await loader.load_batch(subscription, wait):
                    total += loaded
                await client.flush()  # the acks
                return total
        finally:
            if engine is None:
                own.dispose()

    return asyncio.run(go())


def commit_without_ack(
    settings: ServerSettings, count: int, timeout: float, filters: Sequence[RowFilter] = ()
) -> int:
    """Fetch up to `count` messages and commit their rows as a loader with `filters` does,
    then stop as a loader killed before its acks would: messages committed."""

    async def go() -> int:
        engine = loader_engine(settings)
        try:
            async with consumer(settings) as (_, subscription):
                messages = await subscription.fetch(count, timeout=timeout)
                loader = Loader(settings, engine, list(filters))
                rows = [
                    row
                    for message in messages
                    for row in stream.rows_of(stream.decode(message.data))
                ]
                await asyncio.to_thread(loader._commit, rows)
                return len(messages)  # ... and the loader dies here: no ack
        finally:
            engine.dispose()

    return asyncio.run(go())


def stored(database_url: str) -> list[tuple[str, str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [
                (row[0], row[1])
                for row in connection.execute(
                    text("SELECT event_id, type FROM events ORDER BY event_id")
                )
            ]
    finally:
        engine.dispose()


def ingest(stub: Any, key: str, *events: Any, **fields: Any) -> int:
    request = ingest_pb2.IngestEventsRequest(project_key=key, events=list(events), **fields)
    return int(stub.IngestEvents(request, timeout=10).received)


def test_a_calls_requests_travel_as_one_message_per_project_under_the_size_limit() -> None:
    def request(project_id: int, name: str, events: int = 1) -> tuple[int, list[Row]]:
        rows: list[Row] = [
            {"event_id": f"{name}{i}", "type": "t", "url": "/", "data": "x" * 100}
            for i in range(events)
        ]
        return project_id, rows

    requests = [request(1, "a"), request(2, "b"), request(1, "c", 3), request(2, "d")]
    messages = stream.pack(requests, 1.0, 1_000_000)
    assert [(m.project_id, m.requests) for m in messages] == [(1, [0, 2]), (2, [1, 3])]
    first = stream.rows_of(stream.decode(messages[0].payload))
    assert [row["event_id"] for row in first] == ["a0", "c0", "c1", "c2"]
    assert messages[0].id == stream.message_id(1, requests[0][1] + requests[2][1])
    # Over the limit: halved until each message fits or holds one request (a request is never
    # split: it stays all-or-nothing).
    one = len(stream.pack([request(1, "a")], 1.0, 1_000_000)[0].payload)
    many = [request(1, f"r{n}-") for n in range(8)]
    split = stream.pack(many, 1.0, 3 * one)
    assert [m.requests for m in split] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(len(m.payload) <= 3 * one for m in split)
    alone = stream.pack([request(1, "big", 50), request(1, "small")], 1.0, one)
    assert [m.requests for m in alone] == [[0], [1]]


def test_codec_round_trip_and_message_id() -> None:
    now = datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC)
    rows: list[Row] = [
        {
            "event_id": "e1",
            "type": "pageview",
            "visitor_id": "v",
            "user_id": None,
            "url": "/ü?x=1",
            "referrer": None,
            "data": '{"n": 9007199254740993}',
            "occurred_at": now,
            "received_at": now,
            "ip": "192.0.2.1",
            "user_agent": None,
        }
    ]
    decoded = stream.decode(stream.encode(7, rows, published_at=1.5))
    assert decoded.project_id == 7 and decoded.published_at == 1.5
    # The columns the store has beyond these rows' (the derived ones) come back as None.
    missing = dict.fromkeys(name for name in storage.COLUMN_NAMES if name not in rows[0])
    assert stream.rows_of(decoded) == [{**rows[0], **missing, "project_id": 7}]
    # A column a later feature adds to rows travels as it is; one the message lacks (an older
    # server published it) is None.
    enriched = [{**rows[0], "country": "FR"}]
    assert stream.rows_of(stream.decode(stream.encode(7, enriched))) == [
        {**missing, **enriched[0], "project_id": 7}
    ]
    older = [{name: value for name, value in rows[0].items() if name != "user_agent"}]
    assert stream.rows_of(stream.decode(stream.encode(7, older)))[0]["user_agent"] is None
    # The message id is the same whatever the order of the events, and differs by project.
    swapped = [{**rows[0], "event_id": "e2"}, rows[0]]
    assert stream.message_id(7, swapped) == stream.message_id(7, list(reversed(swapped)))
    assert stream.message_id(7, rows) != stream.message_id(8, rows)
    with pytest.raises(stream.UnknownFormat):
        stream.decode(b"\x95\x02\x07\xcb" + b"\0" * 8 + b"\x90\x90")  # version 2
    with pytest.raises(stream.UnknownFormat):
        stream.decode(b"not ours")


def test_stream_url_setting_is_checked() -> None:
    assert load(ServerSettings, stream_url=" nats://a:4222, nats://b:4223 ").stream_servers == [
        "nats://a:4222",
        "nats://b:4223",
    ]
    with pytest.raises(ConfigError, match="APEX_STREAM_URL"):
        load(ServerSettings, stream_url="http://a:4222")
    with pytest.raises(ConfigError, match="APEX_STREAM_NAME"):
        load(ServerSettings, stream_name="a.b")


def test_keys_are_served_from_last_known_values_for_the_grace_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream mode's key cache through a database outage: the last answer, for at most
    APEX_PROJECT_CACHE_TTL + APEX_STREAM_KEY_GRACE after it was read (the revocation lag)."""
    directory = ProjectDirectory(sessionmaker(), ttl=0.0, stale_for=0.5)
    answers = [ProjectInfo(1, frozenset())]
    asked: list[str] = []

    def fetch(kind: str, stored: str) -> ProjectInfo | None:
        asked.append(stored)
        if answers:
            return answers.pop()
        raise exc.OperationalError("SELECT", {}, Exception("database down"))

    monkeypatch.setattr(directory, "_fetch", fetch)
    assert directory.lookup("pk_a") == ProjectInfo(1, frozenset())  # read
    assert directory.lookup("pk_a") == ProjectInfo(1, frozenset())  # down: last known
    assert directory.lookup("pk_a") == ProjectInfo(1, frozenset())  # not asked again at once
    assert len(asked) == 2
    with pytest.raises(exc.OperationalError):
        directory.lookup("pk_never_seen")
    time.sleep(0.6)
    with pytest.raises(exc.OperationalError):  # past the grace: refused (503)
        directory.lookup("pk_a")
    direct = ProjectDirectory(sessionmaker(), ttl=0.0)  # direct mode: no grace at all
    answers.append(ProjectInfo(1, frozenset()))
    monkeypatch.setattr(direct, "_fetch", fetch)
    assert direct.lookup("pk_a") is not None
    with pytest.raises(exc.OperationalError):
        direct.lookup("pk_a")


def test_one_request_rereads_a_key_while_the_others_keep_its_last_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream mode: a database that hangs delays the one request re-reading a key, not every
    request carrying it."""
    directory = ProjectDirectory(sessionmaker(), ttl=0.0, stale_for=60.0)
    info = ProjectInfo(1, frozenset())
    calls: list[str] = []
    meanwhile: list[ProjectInfo | None] = []

    def fetch(kind: str, stored: str) -> ProjectInfo | None:
        calls.append(stored)
        if len(calls) == 2:  # the re-read is in flight: another request for the same key
            meanwhile.append(directory.lookup("pk_a"))
        return info

    monkeypatch.setattr(directory, "_fetch", fetch)
    assert directory.lookup("pk_a") == info
    assert directory.lookup("pk_a") == info
    assert meanwhile == [info]
    assert len(calls) == 2


def test_accepted_requests_are_published_then_loaded_once(settings: ServerSettings) -> None:
    key = make_project(settings.database_url)
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            assert ingest(stub, key, Event(id="a1", type="t", url="/a?token=s3cret")) == 1
            many = ingest_pb2.IngestManyRequest(
                requests=[
                    ingest_pb2.IngestEventsRequest(
                        project_key=key,
                        events=[Event(id=f"b{i}", type="t", url="/b") for i in range(3)],
                    ),
                    ingest_pb2.IngestEventsRequest(
                        project_key=key, events=[Event(id="c1", type="t", url="/c")]
                    ),
                ]
            )
            answer = stub.IngestMany(many, timeout=10)
            assert [r.received for r in answer.results] == [3, 1]
            # A retry of the first request: the same message id, stored in the stream once.
            assert ingest(stub, key, Event(id="a1", type="t", url="/a?token=s3cret")) == 1
        # Acknowledged, not yet in the database: the loaders write it. The IngestMany call's
        # two requests (one project) travel as one message.
        assert stored(settings.database_url) == []
        assert stream_state(settings) == (2, 2)
        assert load_all(settings) == 2
        assert [event_id for event_id, _ in stored(settings.database_url)] == [
            "a1",
            "b0",
            "b1",
            "b2",
            "c1",
        ]
        engine = create_engine(settings.database_url)
        with engine.connect() as connection:
            url = connection.execute(text("SELECT url FROM events WHERE event_id='a1'")).scalar()
        engine.dispose()
        assert url == "/a?token=[redacted]"  # redacted before publishing
        assert stream_state(settings) == (0, 0)  # a work queue: loaded messages are gone
    finally:
        running.server.stop(0)


def test_refused_requests_are_never_published(settings: ServerSettings) -> None:
    key = make_project(settings.database_url, allowed_origins=("https://shop.example",))
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            refusals: dict[str, Callable[[], int]] = {
                "invalid": lambda: ingest(stub, key, Event(type="t", url="not a url")),
                "unknown key": lambda: ingest(stub, "pk_nope", Event(type="t", url="/")),
                "origin": lambda: ingest(
                    stub,
                    key,
                    Event(type="t", url="/"),
                    context=ingest_pb2.RequestContext(origin="https://evil.example"),
                ),
            }
            codes = {}
            for name, call in refusals.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                codes[name] = caught.value.code()
            assert codes == {
                "invalid": grpc.StatusCode.INVALID_ARGUMENT,
                "unknown key": grpc.StatusCode.UNAUTHENTICATED,
                "origin": grpc.StatusCode.PERMISSION_DENIED,
            }
            # validate_only checks, and publishes nothing either.
            checked = ingest_pb2.IngestEventsRequest(
                project_key=key, events=[Event(type="t", url="/")], validate_only=True
            )
            assert stub.IngestEvents(checked, timeout=10).received == 1
        assert stream_state(settings) == (0, 0)
    finally:
        running.server.stop(0)


def test_a_loader_killed_before_its_ack_loses_and_duplicates_nothing(
    settings: ServerSettings,
) -> None:
    """Committed but never acknowledged (killed between the two): JetStream redelivers after
    APEX_STREAM_ACK_WAIT, another loader loads it again, the insert keeps each event once."""
    key = make_project(settings.database_url)
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            for batch in range(4):
                events = [Event(id=f"k{batch}-{i}", type="t", url="/") for i in range(5)]
                assert ingest(stub, key, *events) == 5
    finally:
        running.server.stop(0)

    assert commit_without_ack(settings, 3, timeout=2) == 3
    assert len(stored(settings.database_url)) == 15
    time.sleep(settings.stream_ack_wait + 1.0)
    assert load_all(settings, wait=1.0) == 4  # the 3 redelivered and the one never fetched
    rows = stored(settings.database_url)
    assert len(rows) == 20 and len(set(rows)) == 20
    assert stream_state(settings) == (0, 0)


def test_row_filters_see_the_loading_transaction(settings: ServerSettings) -> None:
    """The hook for per-row work at load time (e.g. a person deleted after publication)."""
    key = make_project(settings.database_url)
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            ingest(stub, key, Event(id="keep", type="t", url="/"), user_id="alice")
            ingest(stub, key, Event(id="drop", type="t", url="/"), user_id="bob")
    finally:
        running.server.stop(0)
    seen: list[bool] = []

    def forget_bob(connection: Connection, rows: list[Row]) -> list[Row]:
        seen.append(connection.in_transaction())
        return [row for row in rows if row["user_id"] != "bob"]

    assert load_all(settings, [forget_bob]) == 2
    assert stored(settings.database_url) == [("keep", "t")]
    assert seen and all(seen)
    assert stream_state(settings) == (0, 0)


def test_a_commit_longer_than_the_ack_wait_is_not_redelivered(settings: ServerSettings) -> None:
    """A slow commit keeps its messages (in progress), instead of JetStream handing them to
    another loader after APEX_STREAM_ACK_WAIT (1 s here) and the work being done twice."""
    key = make_project(settings.database_url)
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            ingest(stub, key, Event(id="slow", type="t", url="/"))
    finally:
        running.server.stop(0)
    calls: list[list[str]] = []
    other_loader_got: list[int] = []

    async def fetch_as_another_loader() -> int:
        async with consumer(settings) as (_, subscription):
            try:
                return len(await subscription.fetch(10, timeout=settings.stream_ack_wait))
            except TimeoutError:
                return 0

    def slow(connection: Connection, rows: list[Row]) -> list[Row]:
        calls.append([row["event_id"] for row in rows])
        time.sleep(settings.stream_ack_wait * 1.5)  # past the ack wait...
        other_loader_got.append(asyncio.run(fetch_as_another_loader()))  # ...is it offered?
        return rows

    assert load_all(settings, [slow], wait=1.5) == 1
    assert calls == [["slow"]]
    assert other_loader_got == [0]
    assert stored(settings.database_url) == [("slow", "t")]


def _publish_three(settings: ServerSettings, tag: str) -> None:
    key = make_project(settings.database_url)
    running = start_server(settings.database_url, **_stream_fields(settings))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            for index in range(3):
                ingest(stub, key, Event(id=f"{tag}{index}", type="t", url="/"))
    finally:
        running.server.stop(0)


@pytest.mark.timeout(60)
def test_a_commit_that_raises_timeout_error_ends_and_is_retried(
    settings: ServerSettings,
) -> None:
    """A commit failing with the builtin TimeoutError (a filter's, a driver's) is a failure
    like any other: the loader goes on (it once took it for "still running" and kept the
    messages in progress for ever)."""
    _publish_three(settings, "te")
    calls: list[int] = []

    def times_out_once(connection: Connection, rows: list[Row]) -> list[Row]:
        calls.append(len(rows))
        if len(calls) == 1:
            raise TimeoutError("from inside the commit")
        return rows

    assert load_all(settings, [times_out_once]) == 3
    assert calls[0] == 3 and sum(calls[1:]) == 3  # the batch, then each message on its own
    assert len(stored(settings.database_url)) == 3
    assert stream_state(settings) == (0, 0)


@pytest.mark.timeout(60)
def test_a_batch_tried_message_by_message_waits_together_when_the_database_goes(
    settings: ServerSettings,
) -> None:
    """A batch that failed is tried message by message; when the database becomes unavailable
    meanwhile, the messages left wait for it together (one RETRY_DELAY, not one each)."""
    _publish_three(settings, "dd")
    calls: list[int] = []

    def breaks_then_database_goes(connection: Connection, rows: list[Row]) -> list[Row]:
        calls.append(len(rows))
        if len(calls) == 1:
            raise ValueError("something in one message")
        raise exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    started = time.monotonic()
    assert load_all(settings, [breaks_then_database_goes], wait=0.2) == 0
    assert calls == [3, 1]  # the batch, its first message; the other two were not tried
    assert time.monotonic() - started < 2 * loader_module.RETRY_DELAY + 0.5  # one wait, not 3
    time.sleep(loader_module.RETRY_DELAY + 0.5)  # the NAK's delay
    assert load_all(settings, wait=1.0) == 3
    assert len(stored(settings.database_url)) == 3


@pytest.mark.timeout(60)
def test_a_fetched_batch_commits_in_transactions_of_bounded_rows(
    settings: ServerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages may hold many requests: a fetched batch is committed in runs of whole messages
    of at most MAX_COMMIT_ROWS rows; when the database goes during the second run, it and the
    third wait together."""
    _publish_three(settings, "cr")
    monkeypatch.setattr(loader_module, "MAX_COMMIT_ROWS", 2)
    seen: list[list[str]] = []

    def record(connection: Connection, rows: list[Row]) -> list[Row]:
        seen.append(sorted(row["event_id"] for row in rows))
        return rows

    assert load_all(settings, [record]) == 3
    assert seen == [["cr0", "cr1"], ["cr2"]]  # a third row would make 3 > 2
    assert len(stored(settings.database_url)) == 3

    _publish_three(settings, "cu")
    monkeypatch.setattr(loader_module, "MAX_COMMIT_ROWS", 1)
    calls: list[int] = []

    def database_goes_after_the_first(connection: Connection, rows: list[Row]) -> list[Row]:
        calls.append(len(rows))
        if len(calls) > 1:
            raise exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
        return rows

    async def one_batch() -> int:
        engine = loader_engine(settings)
        try:
            async with consumer(settings) as (client, subscription):
                messages = await subscription.fetch(3, timeout=5)
                assert len(messages) == 3
                loader = Loader(settings, engine, [database_goes_after_the_first])
                loaded = await loader.load(messages)
                await client.flush()
                return loaded
        finally:
            engine.dispose()

    started = time.monotonic()
    assert asyncio.run(one_batch()) == 1
    assert calls == [1, 1]  # the third run was not tried: it waits with the second
    assert time.monotonic() - started < 2 * loader_module.RETRY_DELAY + 1.5  # one wait, not 2
    time.sleep(loader_module.RETRY_DELAY + 0.5)
    assert load_all(settings, wait=1.0) == 2
    assert len(stored(settings.database_url)) == 6
    assert stream_state(settings) == (0, 0)


def test_loader_chunks_are_whole_messages_of_bounded_rows() -> None:
    def item(rows: int) -> Any:
        return (object(), 0.0, [{}] * rows)

    batch = [item(3), item(1), item(1), item(5), item(2)]
    sizes = [[len(rows) for _, _, rows in chunk] for chunk in loader_module._chunks(batch, 4)]
    assert sizes == [[3, 1], [1], [5], [2]]
    assert loader_module._chunks([], 4) == []


def test_unreadable_messages_stay_in_the_stream(settings: ServerSettings) -> None:
    async def publish_junk() -> None:
        client = await nats.connect(settings.stream_servers)
        await client.jetstream().publish(f"{settings.stream_subject}.3", b"\x01 not ours")
        await client.close()

    asyncio.run(publish_junk())
    assert load_all(settings) == 0
    assert stream_state(settings)[0] == 1  # not acknowledged: kept for a loader that can read it


def test_no_stream_means_unavailable_with_retry_info(sqlite_url: str) -> None:
    """A stream that does not answer (here: none at all) refuses like a database that is down:
    UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After), and health NOT_SERVING."""
    configured = stream_settings(sqlite_url, stream_ack_timeout=0.5)  # never set up
    key = make_project(sqlite_url)
    running = start_server(sqlite_url, **_stream_fields(configured))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as caught:
                ingest(stub, key, Event(type="t", url="/"))
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(caught.value)
            retry = error_details_pb2.RetryInfo()
            assert status is not None and status.details[0].Unpack(retry)
            assert retry.retry_delay.seconds >= 1
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.server.stop(0)


@pytest.mark.postgres
def test_database_down_ingestion_goes_on_then_loads(postgres_url: str) -> None:
    """The database unreachable: health follows the stream (SERVING), a known key is served
    from its last known value, an unknown one is UNAVAILABLE; loaders defer and catch up."""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    configured = stream_settings(proxied, db_connect_timeout=1.0)
    asyncio.run(setup_stream(configured))
    key = make_project(postgres_url)
    other = make_project(postgres_url, name="other")
    running = start_server(proxied, **_stream_fields(configured), db_connect_timeout=1.0)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            health = health_pb2_grpc.HealthStub(channel)
            assert ingest(stub, key, Event(id="before", type="t", url="/")) == 1
            proxy.cut()
            assert ingest(stub, key, Event(id="during", type="t", url="/")) == 1
            with pytest.raises(grpc.RpcError) as refused:  # a dead letter, kept for later
                ingest(stub, key, Event(id="bad", type="t", url="no url"))
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as caught:
                ingest(stub, other, Event(id="x", type="t", url="/"))  # never looked up
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            time.sleep(0.5)  # a few health probes
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert load_all(configured, wait=0.3) == 0  # deferred: the database is away
            assert stream_state(configured)[0] == 2
            proxy.restore()
            time.sleep(1.5)  # the deferred messages' redelivery delay
            assert load_all(configured, wait=1.0) == 2
            assert running.server._dead_letters is not None
            assert running.server._dead_letters.flush(timeout=10)
        assert stored(postgres_url) == [("before", "t"), ("during", "t")]
        engine = create_engine(postgres_url)
        with engine.connect() as connection:
            letters = connection.execute(text("SELECT count(*) FROM dead_letters")).scalar()
        engine.dispose()
        assert letters == 1  # written once the database was back
    finally:
        running.server.stop(0)
        proxy.close()
        asyncio.run(_delete_stream(configured))


def test_stream_setup_command_creates_then_checks(sqlite_url: str) -> None:
    configured = stream_settings(sqlite_url)
    env = {
        "APEX_DATABASE_URL": sqlite_url,
        "APEX_STREAM_URL": NATS_URL,
        "APEX_STREAM_NAME": configured.stream_name,
        "APEX_STREAM_SUBJECT": configured.stream_subject,
        "APEX_STREAM_CONSUMER": configured.stream_consumer,
    }
    runner = CliRunner()
    try:
        first = runner.invoke(main, ["stream", "setup"], env=env)
        assert first.exit_code == 0, first.output
        assert f"created stream {configured.stream_name}" in first.output
        assert f"created consumer {configured.stream_consumer}" in first.output
        again = runner.invoke(main, ["stream", "setup"], env=env)
        assert again.exit_code == 0, again.output
        assert "is as configured" in again.output
        assert "created" not in again.output
    finally:
        asyncio.run(_delete_stream(configured))
    unset = runner.invoke(main, ["stream", "setup"], env={**env, "APEX_STREAM_URL": ""})
    assert unset.exit_code == 2 and "APEX_STREAM_URL" in unset.output


def _stream_fields(settings: ServerSettings) -> dict[str, Any]:
    return {
        name: getattr(settings, name)
        for name in (
            "stream_url",
            "stream_name",
            "stream_subject",
            "stream_consumer",
            "stream_ack_wait",
            "stream_ack_timeout",
        )
    }


def test_a_failed_message_is_logged_once_for_all_its_requests(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coalesced call's requests of one project travel as one message: when it fails, each
    request gets its own error, and the log one line (it had one per request)."""
    sink = stream.StreamSink([NATS_URL], "apex_none", "apex.none", retry_after_seconds=1)
    shared = TimeoutError("no ack")
    other = RuntimeError("broken")

    def run(coroutine: Any, timeout: float) -> list[BaseException | None]:
        coroutine.close()
        return [shared, shared, None, shared, other]

    monkeypatch.setattr(sink, "_run", run)
    rows: list[Row] = []
    with caplog.at_level("WARNING", logger=stream.__name__):
        errors = sink.store_many([(1, rows)] * 5)
    assert [type(error).__name__ for error in errors] == [
        "StorageUnavailable",
        "StorageUnavailable",
        "NoneType",
        "StorageUnavailable",
        "IngestError",
    ]
    assert errors[0] is not errors[1]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "no ack" in messages[0] and "could not publish" in messages[1]
