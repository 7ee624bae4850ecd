"""Every feature keeps its promise in stream mode (issue #20, item 7), on the local NATS node:
deletions and suppressions made after publication honoured by the loaders, suppressions and
salts served from the process's last values through a database outage, the live feed catching
up, identity links once-only across redeliveries, and rows as direct mode stores them.

Each test makes a stream of its own and deletes it (tests/server/test_stream.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Connection, create_engine, exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from apex_ingest.common.settings import ServerSettings
from apex_ingest.ops.loader import ROW_FILTERS, setup_stream
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.people import (
    Person,
    SuppressionDirectory,
    _Suppressed,
    add_suppressions,
    delete_person,
)
from apex_ingest.server.privacy_filter import honour_privacy
from apex_ingest.server.projects import SECRET, add_key, create_project
from apex_ingest.server.storage import Row
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc, project_pb2, project_pb2_grpc
from tests.conftest import start_server
from tests.server.test_stream import (
    _delete_stream,
    _stream_fields,
    commit_without_ack,
    ingest,
    load_all,
    stream_settings,
)
from tests.service import wait_for
from tests.tcp_proxy import TcpProxy

Event = ingest_pb2.Event
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


@pytest.fixture
def settings(database_url: str) -> Iterator[ServerSettings]:
    configured = stream_settings(database_url)
    asyncio.run(setup_stream(configured))
    yield configured
    asyncio.run(_delete_stream(configured))


def new_project(
    database_url: str, name: str = "p", cookieless: bool = False
) -> tuple[int, str, str]:
    """(id, public key, secret key) of a new project."""
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            project = create_project(session, name, cookieless=cookieless)
            return project.id, project.key, add_key(session, project.id, SECRET)
    finally:
        engine.dispose()


def query(database_url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


def event_ids(database_url: str, project_id: int) -> set[str]:
    found = query(database_url, "SELECT event_id FROM events WHERE project_id = :p", p=project_id)
    return {row[0] for row in found}


def people_factory(database_url: str) -> tuple[Any, sessionmaker[Any]]:
    engine = create_db_engine(database_url)
    return engine, create_session_factory(engine)


def test_suppressions_are_served_from_last_known_values_for_the_grace_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream mode's suppression cache through a database outage: the last list, for at most
    APEX_PROJECT_CACHE_TTL + APEX_STREAM_KEY_GRACE after it was read; direct mode: none."""
    directory = SuppressionDirectory(sessionmaker(), ttl=0.0, stale_for=0.5)
    mallory = _Suppressed(frozenset({"mallory"}), frozenset())
    answers = [mallory]
    asked: list[int] = []

    def fetch(project_id: int) -> _Suppressed:
        asked.append(project_id)
        if answers:
            return answers.pop()
        raise exc.OperationalError("SELECT", {}, Exception("database down"))

    monkeypatch.setattr(directory, "_fetch", fetch)
    rows: list[dict[str, Any]] = [
        {"user_id": "mallory", "visitor_id": "v1"},
        {"user_id": "ann", "visitor_id": "v2"},
    ]
    assert directory.drop_suppressed(1, rows) == ([rows[1]], 1)  # read
    assert directory.drop_suppressed(1, rows) == ([rows[1]], 1)  # down: the last list
    assert directory.drop_suppressed(1, rows) == ([rows[1]], 1)  # not asked again at once
    assert asked == [1, 1]
    with pytest.raises(exc.OperationalError):
        directory.drop_suppressed(2, rows)  # never read: refused (UNAVAILABLE)
    time.sleep(0.6)
    with pytest.raises(exc.OperationalError):  # past the grace
        directory.drop_suppressed(1, rows)
    direct = SuppressionDirectory(sessionmaker(), ttl=0.0)
    answers.append(mallory)
    monkeypatch.setattr(direct, "_fetch", fetch)
    assert direct.drop_suppressed(1, rows)[1] == 1
    with pytest.raises(exc.OperationalError):
        direct.drop_suppressed(1, rows)


def test_a_person_deleted_or_suppressed_while_in_the_stream_stays_so(
    settings: ServerSettings,
) -> None:
    url = settings.database_url
    project_id, key, _ = new_project(url)
    running = start_server(url, **_stream_fields(settings))
    engine, factory = people_factory(url)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            # Loaded before: alice identified on v-alice (her linked visitor).
            ingest(
                stub,
                key,
                Event(id="identify", type="identify", url="/", visitor_id="v-alice"),
                user_id="alice",
            )
            assert load_all(settings, ROW_FILTERS) == 1
            # Published, not yet loaded, when alice and the visitor v-gone are deleted.
            ingest(stub, key, Event(id="alice-anon", type="t", url="/", visitor_id="v-alice"))
            ingest(
                stub, key, Event(id="alice-1", type="t", url="/", visitor_id="v-x"), user_id="alice"
            )
            ingest(stub, key, Event(id="gone-1", type="t", url="/", visitor_id="v-gone"))
            ingest(
                stub,
                key,
                Event(
                    id="alias-gone", type="alias", url="/", visitor_id="v-bob", previous_id="v-gone"
                ),
                user_id="bob",
            )
            ingest(
                stub, key, Event(id="bob-1", type="t", url="/", visitor_id="v-bob"), user_id="bob"
            )
            # ... and carol, suppressed (not deleted) after her events were published.
            ingest(stub, key, Event(id="carol-1", type="t", url="/"), user_id="carol")
            ingest(stub, key, Event(id="carol-anon", type="t", url="/", visitor_id="v-carol"))
            report = delete_person(
                factory, project_id, Person.of(["alice"], ["v-gone"]), actor="t", via="cli"
            )
            assert report.events == 1 and report.linked_visitors == 1  # the identify
            add_suppressions(factory, project_id, ["carol"], ["v-carol"], "t")
            # Received after the deletion: new data, kept (it is not a suppression).
            ingest(stub, key, Event(id="alice-after", type="t", url="/"), user_id="alice")
        assert load_all(settings, ROW_FILTERS) == 8
        assert event_ids(url, project_id) == {"bob-1", "alice-after"}
        links = query(url, "SELECT visitor_id, user_id FROM identity_links")
        assert links == [("v-bob", "bob")]  # not (v-gone, bob): that alias went with v-gone
    finally:
        running.server.stop(0)
        engine.dispose()


@pytest.mark.postgres
def test_the_people_lock_orders_a_deletion_after_a_loading_batch(postgres_url: str) -> None:
    """A deletion recorded while a loader's batch is between its read of the deletions and its
    commit waits for that commit, then deletes what it committed: nothing slips between."""
    settings = stream_settings(postgres_url)
    asyncio.run(setup_stream(settings))
    project_id, key, _ = new_project(postgres_url)
    running = start_server(postgres_url, **_stream_fields(settings))
    engine, factory = people_factory(postgres_url)
    read = threading.Event()
    go_on = threading.Event()

    def slow_privacy(connection: Connection, rows: list[Row]) -> list[Row]:
        kept = honour_privacy(connection, rows)  # nothing deleted yet: all kept
        read.set()
        go_on.wait(20)
        return kept

    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            ingest(stub, key, Event(id="alice-1", type="t", url="/"), user_id="alice")
            ingest(stub, key, Event(id="bob-1", type="t", url="/"), user_id="bob")
        loaded: list[int] = []
        loader = threading.Thread(
            target=lambda: loaded.append(load_all(settings, [slow_privacy], wait=1.0))
        )
        loader.start()
        assert read.wait(20)
        deleter = threading.Thread(
            target=delete_person,
            args=(factory, project_id, Person.of(["alice"], [])),
            kwargs={"actor": "t", "via": "cli"},
        )
        deleter.start()
        waiting = (  # the deletion, waiting for the people lock of this database's project
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND objsubid = 2 AND classid = 1095779672 AND CAST(objid AS bigint) = :p "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert (
            wait_for(lambda: query(postgres_url, waiting, p=project_id)[0][0] == 1, 20) is not None
        )
        assert query(postgres_url, "SELECT count(*) FROM privacy_audit")[0][0] == 0
        go_on.set()
        loader.join(30)
        deleter.join(30)
        assert loaded == [2]
        assert event_ids(postgres_url, project_id) == {"bob-1"}
    finally:
        go_on.set()
        running.server.stop(0)
        engine.dispose()
        asyncio.run(_delete_stream(settings))


@pytest.mark.postgres
def test_suppressions_salts_and_the_live_feed_through_a_database_outage(
    postgres_url: str,
) -> None:
    """The database cut: a project with a suppression and a cookieless project keep answering
    OK from the process's last values (suppressed events still dropped, the day's salt as
    before); the live feed shows the events once the loaders caught up."""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    configured = stream_settings(proxied, db_connect_timeout=1.0)
    asyncio.run(setup_stream(configured))
    plain_id, plain, secret = new_project(postgres_url, "plain")
    cookie_id, cookie, _ = new_project(postgres_url, "cookieless", cookieless=True)
    engine, factory = people_factory(postgres_url)
    add_suppressions(factory, plain_id, ["mallory"], [], "t")
    engine.dispose()
    running = start_server(proxied, **_stream_fields(configured), db_connect_timeout=1.0)
    seen: list[str] = []

    def browser(event_id: str) -> ingest_pb2.IngestEventsRequest:
        return ingest_pb2.IngestEventsRequest(
            project_key=cookie,
            events=[Event(id=event_id, type="pageview", url="/")],
            context=ingest_pb2.RequestContext(client_ip="198.51.100.4", user_agent=CHROME),
            derive_visitor_id=True,
        )

    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
            admin = project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]
            tail = admin.TailEvents(
                # A backlog: "before" is seen whether it lands before the tail starts or after.
                project_pb2.TailEventsRequest(backlog=10),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=25,
            )

            def follow() -> None:
                try:
                    for item in tail:
                        seen.append(item.event.event_id)
                        if item.event.event_id == "during":
                            return
                except grpc.RpcError:
                    pass

            reader = threading.Thread(target=follow)
            reader.start()
            # Read once while the database is there: keys, suppressions, the day's salt.
            assert ingest(stub, plain, Event(id="before", type="t", url="/"), user_id="ann") == 1
            assert (
                ingest(stub, plain, Event(id="m-before", type="t", url="/"), user_id="mallory") == 1
            )
            assert stub.IngestEvents(browser("c-before"), timeout=10).received == 1
            assert load_all(configured, ROW_FILTERS) == 2
            assert wait_for(lambda: "before" in seen, 15) is not None
            proxy.cut()
            assert ingest(stub, plain, Event(id="during", type="t", url="/"), user_id="ann") == 1
            assert (
                ingest(stub, plain, Event(id="m-during", type="t", url="/"), user_id="mallory") == 1
            )  # dropped, from the last known list
            assert stub.IngestEvents(browser("c-during"), timeout=10).received == 1
            assert load_all(configured, ROW_FILTERS, wait=0.3) == 0  # deferred
            proxy.restore()
            time.sleep(1.5)  # the deferred messages' redelivery delay
            assert load_all(configured, ROW_FILTERS, wait=1.0) == 2
            reader.join(20)
            tail.cancel()
        assert seen == ["before", "during"]  # the feed caught up with the loaders
        assert event_ids(postgres_url, plain_id) == {"before", "during"}
        visitors = dict(
            query(
                postgres_url,
                "SELECT event_id, visitor_id FROM events WHERE project_id = :p",
                p=cookie_id,
            )
        )
        assert str(visitors["c-before"]).startswith("cl_")
        assert visitors["c-during"] == visitors["c-before"]  # the same day's salt
    finally:
        running.server.stop(0)
        proxy.close()
        asyncio.run(_delete_stream(configured))


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _stored_rows(database_url: str, project_id: int) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT * FROM events WHERE project_id = :p ORDER BY event_id"),
                {"p": project_id},
            )
            return [
                {
                    name: value
                    for name, value in row._mapping.items()
                    if name not in ("id", "project_id", "received_at")
                }
                for row in rows
            ]
    finally:
        engine.dispose()


def _links(database_url: str, project_id: int) -> list[tuple[Any, ...]]:
    return query(
        database_url,
        "SELECT visitor_id, user_id, source, first_seen, last_seen, conflict FROM identity_links "
        "WHERE project_id = :p ORDER BY visitor_id",
        p=project_id,
    )


def test_rows_and_links_survive_the_stream_once_across_redeliveries(
    settings: ServerSettings,
) -> None:
    """An alias and an enriched event: stored through the stream (delivered three times, the
    first two committed and never acknowledged) exactly as direct mode stores them, and one
    identity link each."""
    url = settings.database_url
    direct_id, direct_key, _ = new_project(url, "direct")
    streamed_id, streamed_key, _ = new_project(url, "streamed")
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)

    def request(key: str) -> ingest_pb2.IngestEventsRequest:
        return ingest_pb2.IngestEventsRequest(
            project_key=key,
            user_id="u1",
            events=[
                Event(
                    id="alias",
                    type="alias",
                    url="/",
                    visitor_id="v1",
                    previous_id="anon-1",
                    timestamp=_timestamp(at),
                ),
                Event(
                    id="page",
                    type="pageview",
                    url="https://shop.example/p?utm_source=news&utm_campaign=winter&gclid=g1",
                    referrer="https://www.google.com/search?q=x",
                    visitor_id="v1",
                    data='{"n": 9007199254740993, "s": "ü"}',
                    timestamp=_timestamp(at),
                ),
            ],
            context=ingest_pb2.RequestContext(client_ip="198.51.100.4", user_agent=CHROME),
        )

    direct = start_server(url)
    streaming = start_server(url, **_stream_fields(settings))
    try:
        for running, key in ((direct, direct_key), (streaming, streamed_key)):
            with grpc.insecure_channel(running.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
                assert stub.IngestEvents(request(key), timeout=10).received == 2
    finally:
        direct.server.stop(0)
        streaming.server.stop(0)

    assert commit_without_ack(settings, 1, timeout=5, filters=ROW_FILTERS) == 1
    time.sleep(settings.stream_ack_wait + 1.0)
    # Redelivered, committed again, no ack.
    assert commit_without_ack(settings, 1, timeout=5, filters=ROW_FILTERS) == 1
    time.sleep(settings.stream_ack_wait + 1.0)
    assert load_all(settings, ROW_FILTERS, wait=1.0) == 1  # the third delivery, acked
    assert load_all(settings, ROW_FILTERS, wait=0.3) == 0
    streamed = _stored_rows(url, streamed_id)
    assert [row["event_id"] for row in streamed] == ["alias", "page"]
    assert streamed == _stored_rows(url, direct_id)
    assert streamed[1]["utm_source"] == "news"  # enriched indeed
    links = _links(url, streamed_id)
    assert [link[:3] for link in links] == [("anon-1", "u1", "alias"), ("v1", "u1", "event")]
    assert links == _links(url, direct_id)
