"""Cookieless visitors (issue #19, item 7): daily salts in the database, derived visitor ids."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from alembic import command
from grpc_status import rpc_status
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.common.rpc import field_violations
from apex_ingest.ops.migrate import alembic_config, upgrade
from apex_ingest.server.cookieless import (
    VISITOR_PREFIX,
    VisitorSalts,
    assign_cookieless_visitors,
    derive_visitor_id,
)
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.models import Event, VisitorSalt
from apex_ingest.server.projects import ProjectDirectory, create_project, set_cookieless
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer

DAY = date(2026, 12, 2)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


class Clock:
    """A UTC clock the test moves by hand."""

    def __init__(self, day: date) -> None:
        self.now = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def next_day(self) -> date:
        self.now += timedelta(days=1)
        return self.now.date()


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(database_url)
    yield create_session_factory(engine)
    engine.dispose()


def stored_days(sessions: sessionmaker[Session]) -> list[date]:
    with sessions() as session:
        return list(session.scalars(select(VisitorSalt.day).order_by(VisitorSalt.day)))


def test_a_salt_per_day_kept_in_the_database(sessions: sessionmaker[Session]) -> None:
    clock = Clock(DAY)
    salts = VisitorSalts(sessions, clock)
    first = salts.salt(DAY)
    assert len(first) == 32
    assert salts.salt(DAY) == first
    # Another process (its own cache) reads the same salt.
    assert VisitorSalts(sessions, clock).salt(DAY) == first
    assert stored_days(sessions) == [DAY]

    second_day = clock.next_day()
    second = salts.salt(second_day)
    assert second != first
    # Yesterday's salt stays for the events received just before midnight.
    assert stored_days(sessions) == [DAY, second_day]
    assert VisitorSalts(sessions, clock).salt(DAY) == first

    third_day = clock.next_day()
    third = salts.salt(third_day)
    assert len({first, second, third}) == 3
    assert stored_days(sessions) == [second_day, third_day]  # the first day's salt is gone


def test_the_cache_holds_only_recent_days(sessions: sessionmaker[Session]) -> None:
    clock = Clock(DAY)
    salts = VisitorSalts(sessions, clock)
    first = salts.salt(DAY)
    clock.next_day()
    clock.next_day()
    salts.salt(clock.now.date())  # deletes DAY's row and forgets it in this process
    # Asked again (a request from the first day arriving this late), DAY gets a new salt:
    # the deleted one can never come back.
    assert salts.salt(DAY) != first


def race(creators: list[VisitorSalts], day: date) -> list[bytes]:
    """Each creator asks for the day's salt at the same moment, in a thread of its own."""
    barrier = threading.Barrier(len(creators))
    found: list[bytes] = []
    errors: list[BaseException] = []

    def create(salts: VisitorSalts) -> None:
        try:
            barrier.wait()
            found.append(salts.salt(day))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=create, args=(c,)) for c in creators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return found


def test_concurrent_creators_agree_on_one_salt(database_url: str) -> None:
    """Two processes (two engines, two caches) creating the same day's salt at the same moment."""
    engines = [create_db_engine(database_url) for _ in range(2)]
    try:
        for attempt in range(5):
            day = DAY + timedelta(days=attempt)
            clock = Clock(day)
            found = race([VisitorSalts(create_session_factory(e), clock) for e in engines], day)
            assert len(found) == 2 and found[0] == found[1]
            with engines[0].connect() as connection:
                stored = connection.execute(
                    select(VisitorSalt.salt).where(VisitorSalt.day == day)
                ).all()
            assert [bytes.fromhex(row[0]) for row in stored] == [found[0]]
    finally:
        for engine in engines:
            engine.dispose()


def test_derived_ids_same_visitor_same_day() -> None:
    salt, other_salt = b"s" * 32, b"t" * 32
    one = derive_visitor_id(salt, 1, "203.0.113.7", CHROME)
    assert one.startswith(VISITOR_PREFIX) and len(one) == len(VISITOR_PREFIX) + 32
    assert derive_visitor_id(salt, 1, "203.0.113.7", CHROME) == one
    others = {
        derive_visitor_id(other_salt, 1, "203.0.113.7", CHROME),  # the next day
        derive_visitor_id(salt, 2, "203.0.113.7", CHROME),  # another project
        derive_visitor_id(salt, 1, "203.0.113.8", CHROME),  # another network
        derive_visitor_id(salt, 1, "203.0.113.7", CHROME + " Edg/131"),  # another browser
        # No separator can make two different inputs one message.
        derive_visitor_id(salt, 1, "203.0.113.7\n" + CHROME, ""),
    }
    assert one not in others and len(others) == 5


def row(visitor_id: str | None = None) -> dict[str, object]:
    return {"visitor_id": visitor_id, "ip": "203.0.113.0"}


def test_assign_reads_the_full_ip_from_the_context(sessions: sessionmaker[Session]) -> None:
    clock = Clock(DAY)
    salts = VisitorSalts(sessions, clock)
    context = ingest_pb2.RequestContext(client_ip="203.0.113.7", user_agent=CHROME)
    received = clock.now
    rows = [row(), row("v_own"), row()]
    assign_cookieless_visitors(rows, 7, context, received, salts)
    expected = derive_visitor_id(salts.salt(DAY), 7, "203.0.113.7", CHROME)
    assert [r["visitor_id"] for r in rows] == [expected, "v_own", expected]
    # Not the truncated IP the rows may hold.
    assert expected != derive_visitor_id(salts.salt(DAY), 7, "203.0.113.0", CHROME)

    # The next day, the same browser is another visitor.
    later = [row()]
    assign_cookieless_visitors(later, 7, context, received + timedelta(days=1), salts)
    assert later[0]["visitor_id"] not in (None, expected)

    # Nothing to tell visitors apart by: no id rather than one id for everybody.
    bare = [row()]
    assign_cookieless_visitors(bare, 7, ingest_pb2.RequestContext(), received, salts)
    assert bare[0]["visitor_id"] is None


# --- Through the gRPC server ---


@pytest.fixture
def ingest_stub(server: RunningServer) -> Iterator[ingest_pb2_grpc.IngestServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]


def project(database_url: str, cookieless: bool) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, "site", cookieless=cookieless).key
    finally:
        engine.dispose()


def browser_request(
    key: str, ip: str = "198.51.100.4", event_id: str = "e1", visitor_id: str = ""
) -> ingest_pb2.IngestEventsRequest:
    return ingest_pb2.IngestEventsRequest(
        project_key=key,
        events=[ingest_pb2.Event(id=event_id, type="pageview", url="/", visitor_id=visitor_id)],
        context=ingest_pb2.RequestContext(client_ip=ip, user_agent=CHROME),
        derive_visitor_id=True,
    )


def visitors(database_url: str) -> dict[str, str | None]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Event.event_id, Event.visitor_id))
            return {event_id: visitor for event_id, visitor in rows}
    finally:
        engine.dispose()


def test_a_cookieless_project_gets_derived_visitor_ids(
    ingest_stub: ingest_pb2_grpc.IngestServiceStub, server: RunningServer
) -> None:
    key = project(server.database_url, cookieless=True)
    ingest_stub.IngestEvents(browser_request(key, event_id="a"), timeout=10)
    ingest_stub.IngestEvents(browser_request(key, event_id="b"), timeout=10)
    ingest_stub.IngestEvents(browser_request(key, ip="198.51.100.5", event_id="c"), timeout=10)
    ingest_stub.IngestEvents(browser_request(key, event_id="d", visitor_id="v_own"), timeout=10)
    stored = visitors(server.database_url)
    assert str(stored["a"]).startswith(VISITOR_PREFIX)
    assert stored["a"] == stored["b"]  # the same browser on the same network, the same day
    assert stored["c"] not in (None, stored["a"])
    assert stored["d"] == "v_own"  # a visitor id sent is kept
    # IngestMany (the gateway's call) derives the same.
    many = ingest_stub.IngestMany(
        ingest_pb2.IngestManyRequest(requests=[browser_request(key, event_id="e")]), timeout=10
    )
    assert many.results[0].status.code == 0
    assert visitors(server.database_url)["e"] == stored["a"]


def test_other_projects_still_require_a_visitor_id(
    ingest_stub: ingest_pb2_grpc.IngestServiceStub, server: RunningServer
) -> None:
    key = project(server.database_url, cookieless=False)
    with pytest.raises(grpc.RpcError) as refused:
        ingest_stub.IngestEvents(browser_request(key), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(refused.value)
    assert field_violations(status) == [("events[0].visitor_id", "is required")]
    # Without derive_visitor_id (a server-side batch) an event needs no visitor.
    batch = browser_request(key, event_id="batch")
    batch.derive_visitor_id = False
    ingest_stub.IngestEvents(batch, timeout=10)
    assert visitors(server.database_url) == {"batch": None}


def test_cookieless_can_be_turned_on_and_off(server: RunningServer) -> None:
    key = project(server.database_url, cookieless=False)
    engine = create_db_engine(server.database_url)
    try:
        factory = create_session_factory(engine)
        directory = ProjectDirectory(factory, ttl=0)
        info = directory.lookup(key)
        assert info is not None and not info.cookieless
        with factory.begin() as session:
            set_cookieless(session, info.id, True)
        turned = directory.lookup(key)
        assert turned is not None and turned.cookieless
    finally:
        engine.dispose()


def test_migration_0010_keeps_existing_projects_as_they_were(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "0006")
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO projects (key, name, allowed_origins, created_at) "
                    "VALUES ('pk_live_old', 'old', '[]', :t)"
                ),
                {"t": datetime(2026, 11, 1, tzinfo=UTC)},
            )
            connection.execute(
                text(
                    "INSERT INTO project_keys (project_id, kind, key, label, created_at) "
                    "SELECT id, 'public', key, 'default', created_at FROM projects"
                )
            )
        upgrade(database_url)
        info = ProjectDirectory(create_session_factory(engine), ttl=0).lookup("pk_live_old")
        assert info is not None and info.cookieless is False
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM visitor_salts")).scalar() == 0
    finally:
        engine.dispose()
