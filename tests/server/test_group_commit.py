"""Group commit: concurrent requests share a transaction, yet each stays all-or-nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.types.json import Json
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server import metrics, storage
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.errors import IngestError, StorageUnavailable
from apex_ingest.server.projects import create_project
from apex_ingest.server.storage import EventStore, _Pending
from tests.conftest import fresh_postgres_database


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(database_url)
    yield create_session_factory(engine)
    engine.dispose()


def new_project(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as session:
        return create_project(session, "p").id


def rows_for(prefix: str, count: int, project_id: int) -> list[dict[str, object]]:
    now = datetime.now(UTC)
    return [
        {
            "project_id": project_id,
            "event_id": f"{prefix}-{i}",
            "type": "t",
            "visitor_id": None,
            "user_id": None,
            "url": "/",
            "referrer": None,
            "data": "{}",
            "occurred_at": now,
            "received_at": now,
            "ip": None,
            "user_agent": None,
        }
        for i in range(count)
    ]


def rows_with_ids(project_id: int, *ids: str) -> list[dict[str, object]]:
    rows = rows_for("x", len(ids), project_id)
    for row, event_id in zip(rows, ids, strict=True):
        row["event_id"] = event_id
    return rows


def stored_ids(database_url: str) -> list[str]:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        ids = [r[0] for r in connection.execute(text("SELECT event_id FROM events ORDER BY id"))]
    engine.dispose()
    return ids


def test_concurrent_requests_share_commits(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    project_id = new_project(sessions)
    store = EventStore(sessions, 1)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                store.store(project_id, rows_for(f"{n}-{i}", 3, project_id))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = stored_ids(database_url)
    assert len(ids) == len(set(ids)) == 16 * 20 * 3
    assert max(store.group_sizes) > 1, "no two requests were ever committed together"


def test_a_failing_request_does_not_fail_its_group(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    project_id = new_project(sessions)
    store = EventStore(sessions, 1)
    good = _Pending(rows_for("good", 2, project_id))
    bad_rows = rows_for("bad", 2, project_id)
    bad_rows[1]["type"] = None  # NOT NULL on both databases (PostgreSQL has no FK to break)
    bad = _Pending(bad_rows)
    also_good = _Pending(rows_for("also", 1, project_id))
    store._write_group([good, bad, also_good])
    assert all(p.done.is_set() for p in (good, bad, also_good))
    assert good.error is None and also_good.error is None
    assert isinstance(bad.error, IngestError)
    assert sorted(stored_ids(database_url)) == ["also-0", "good-0", "good-1"]


def test_an_id_repeated_within_a_group_is_stored_once_the_first_wins(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    """Repeats within one request and across the requests of one group commit: one row each,
    the first one sent (the statement has no DISTINCT ON: storage.py deduplicates first)."""
    project_id = new_project(sessions)
    store = EventStore(sessions, 1)
    first = rows_for("a", 3, project_id)
    first[2]["event_id"] = "a-0"  # a repeat inside the request
    second = rows_for("a", 2, project_id)  # a-0 and a-1 again, in the same group
    for row in (first[2], *second):
        row["type"] = "repeat"
        row["occurred_at"] = datetime(2026, 1, 1, tzinfo=UTC)
    errors = store.store_many([(project_id, first), (project_id, second)])
    assert errors == [None, None]
    assert store.group_sizes[-1] == 2, "both requests were meant to share one statement"
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(
                text("SELECT event_id, type FROM events ORDER BY event_id")
            ).all()
            assert [tuple(row) for row in stored] == [("a-0", "t"), ("a-1", "t")]
            if engine.dialect.name == "postgresql":
                ids = connection.execute(
                    text("SELECT count(*) FROM event_ids WHERE occurred_at = :t"),
                    {"t": first[0]["occurred_at"]},
                ).scalar_one()
                assert ids == 2  # event_ids holds the stored (first) row's occurred_at
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_same_ids_in_another_order_wait_instead_of_deadlocking(postgres_url: str) -> None:
    """Two statements sharing ids in opposite orders: the second waits, nobody is cancelled.

    Inserted in request order, `second` would hold "b" while waiting for "a", and `first`
    would then wait for "b": PostgreSQL cancels one of them as a deadlock.
    """
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))

    def parameters(*ids: str) -> list[Json]:
        return storage._parameters(rows_with_ids(project_id, *ids))

    first, second = (engine.raw_connection() for _ in range(2))
    first_driver, second_driver = first.driver_connection, second.driver_connection
    assert first_driver is not None and second_driver is not None
    for driver in (first_driver, second_driver):
        driver.execute("SET lock_timeout = '10s'")
    failures: list[BaseException] = []

    def insert_then_commit() -> None:
        try:
            second_driver.execute(storage._PG_INSERT_DRIVER, parameters("b", "a"))
            second_driver.commit()
        except BaseException as error:
            failures.append(error)
            second_driver.rollback()

    try:
        first_driver.execute(storage._PG_INSERT_DRIVER, parameters("a"))
        waiting = threading.Thread(target=insert_then_commit)
        waiting.start()
        time.sleep(0.5)  # `second` is now waiting for "a"
        first_driver.execute(storage._PG_INSERT_DRIVER, parameters("b"))
        first_driver.commit()
        waiting.join(timeout=15)
        assert failures == []
        assert sorted(stored_ids(postgres_url)) == ["a", "b"]
    finally:
        for proxy in (first, second):
            proxy.close()
        engine.dispose()


@pytest.mark.postgres
def test_a_writer_whose_connection_was_killed_stores_on_a_new_one(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    sessions = create_session_factory(engine)
    project_id = new_project(sessions)
    store = EventStore(sessions, 1, writers=1)
    try:
        store.store(project_id, rows_for("before", 1, project_id))
        with engine.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        assert killed >= 1
        store.store(project_id, rows_for("after", 2, project_id))
        assert sorted(stored_ids(postgres_url)) == ["after-0", "after-1", "before-0"]
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(sqlite_url)
    yield create_session_factory(engine)
    engine.dispose()


def test_a_bug_while_writing_answers_the_callers_and_the_writer_lives_on(
    sqlite_url: str, sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    project_id = new_project(sqlite_sessions)
    store = EventStore(sqlite_sessions, 1, commit_timeout=10)
    broken = iter([RuntimeError("a bug")])

    def observe_once(_value: float) -> None:
        for error in broken:
            raise error

    monkeypatch.setattr(metrics.GROUP_REQUESTS, "observe", observe_once)
    with pytest.raises(IngestError):
        store.store(project_id, rows_for("first", 1, project_id))
    store.store(project_id, rows_for("second", 1, project_id))
    assert stored_ids(sqlite_url) == ["second-0"]


def test_a_database_that_stops_answering_is_unavailable_within_the_commit_timeout(
    sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    project_id = new_project(sqlite_sessions)
    store = EventStore(sqlite_sessions, 1, commit_timeout=0.5)
    answer = threading.Event()
    monkeypatch.setattr(store, "_commit", lambda rows: answer.wait(10))
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as refused:
        store.store(project_id, rows_for("stuck", 1, project_id))
    answer.set()
    assert time.monotonic() - started < 5
    assert refused.value.maybe_stored and "same event ids" in str(refused.value)


def test_a_database_that_stops_answering_is_unavailable_before_the_callers_deadline(
    sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal (503 with Retry-After at the gateway) must come before the deadline (a 504),
    even when the deadline is shorter than the commit timeout."""
    project_id = new_project(sqlite_sessions)
    store = EventStore(sqlite_sessions, 1, commit_timeout=10)
    answer = threading.Event()
    monkeypatch.setattr(store, "_commit", lambda rows: answer.wait(10))
    deadline = time.monotonic() + 1.5
    with pytest.raises(StorageUnavailable) as refused:
        store.store(project_id, rows_for("stuck", 1, project_id), deadline)
    answered = time.monotonic()
    answer.set()
    assert answered < deadline
    assert refused.value.maybe_stored and refused.value.for_deadline


def test_a_short_deadline_and_a_slow_commit_is_no_refusal(
    sqlite_url: str, sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a second left: the caller's choice, not a sign of a database in trouble; the
    commit is waited for (a review found 0.3 s commits answered "maybe stored" at 0.25 s)."""
    project_id = new_project(sqlite_sessions)
    store = EventStore(sqlite_sessions, 1, commit_timeout=10)
    real_commit = store._commit

    def slow(rows: list[dict[str, object]]) -> None:
        time.sleep(0.3)
        real_commit(rows)

    monkeypatch.setattr(store, "_commit", slow)
    store.store(project_id, rows_for("slow", 1, project_id), time.monotonic() + 0.5)
    assert stored_ids(sqlite_url) == ["slow-0"]


@pytest.mark.postgres
def test_a_connection_lost_during_the_commit_with_no_new_one_is_maybe_stored(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing can tell whether the statement committed: the answer must not say it did not."""
    from sqlalchemy import exc

    engine = create_db_engine(postgres_url)
    sessions = create_session_factory(engine)
    project_id = new_project(sessions)
    store = EventStore(sessions, 1, writers=1)
    store.store(project_id, rows_for("warm", 1, project_id))
    real_execute = store._pg_execute
    calls = []

    def commit_then_lose_the_connection(rows: list[dict[str, object]]) -> None:
        calls.append(rows)
        if len(calls) == 1:
            real_execute(rows)  # committed ...
            store._local.connection.driver_connection.close()  # ... but the answer is lost
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        raise exc.OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(store, "_pg_execute", commit_then_lose_the_connection)
    with pytest.raises(StorageUnavailable) as refused:
        store.store(project_id, rows_for("lost", 2, project_id))
    assert refused.value.maybe_stored
    assert len(calls) == 2  # tried again on a new connection before answering
    monkeypatch.undo()
    store.store(project_id, rows_for("lost", 2, project_id))  # a retry
    assert sorted(stored_ids(postgres_url)) == ["lost-0", "lost-1", "warm-0"]
    engine.dispose()


def test_a_request_still_queued_at_the_commit_timeout_is_withdrawn(
    sqlite_url: str, sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a writer that hangs, a queued request is answered "not stored", and never is."""
    project_id = new_project(sqlite_sessions)
    store = EventStore(sqlite_sessions, 1, commit_timeout=0.5)
    answer = threading.Event()
    real_commit = store._commit

    def hang_once(rows: list[dict[str, object]]) -> None:
        if rows[0]["event_id"] == "stuck-0":
            answer.wait(10)
        real_commit(rows)

    monkeypatch.setattr(store, "_commit", hang_once)
    outcomes: dict[str, StorageUnavailable] = {}

    def send(prefix: str) -> None:
        try:
            store.store(project_id, rows_for(prefix, 1, project_id))
        except StorageUnavailable as error:
            outcomes[prefix] = error

    first = threading.Thread(target=send, args=("stuck",))
    first.start()
    time.sleep(0.1)  # the writer has taken "stuck" and hangs
    send("queued")
    first.join()
    answer.set()
    time.sleep(0.3)
    assert outcomes["stuck"].maybe_stored
    assert not outcomes["queued"].maybe_stored
    assert stored_ids(sqlite_url) == ["stuck-0"]  # written once the hang ended; "queued" never


@pytest.fixture(autouse=True)
def _fresh_copy_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with COPY tried first, whatever groups earlier tests wrote."""
    monkeypatch.setattr(storage, "_copy_choice", storage._CopyChoice())


@contextmanager
def _driver(engine: Engine, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection of `engine`'s pool, as the group-commit writers use theirs."""
    proxy = engine.raw_connection()
    try:
        driver: Any = proxy.driver_connection
        driver.autocommit = autocommit
        yield driver
    finally:
        proxy.invalidate()


def _stored_groups_with_stored_ids() -> float:
    return REGISTRY.get_sample_value("apex_group_commit_stored_id_groups_total") or 0


def _full_rows(prefix: str, project_id: int) -> list[dict[str, object]]:
    """Rows with every column set, the hard values included: exact decimals and big numbers,
    nesting, non-ASCII, a naive datetime (UTC), a negative skew, a boolean, NULLs."""
    rows = rows_for(prefix, 3, project_id)
    received = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    rows[0].update(
        data='{"price": 49.90, "n": 123456789012345678901234567890, "e": 1.5e-7, '
        '"nested": {"a": [1, 2.50, {"b": null}]}, "name": "Zoë ✓ \\"q\\" \\\\ \\n"}',
        occurred_at=datetime(2026, 3, 1, 11, 59, 0),  # naive: UTC
        client_occurred_at=datetime(2026, 3, 1, 11, 59, 2, tzinfo=UTC),
        clock_skew_ms=-2000,
        received_at=received,
        visitor_id="v1",
        user_id="u1",
        url="https://shop.example/p?x=1\t2",
        referrer="https://www.google.com/",
        ip="2001:db8::1",
        user_agent="Mozilla/5.0 (X11; Linux x86_64)",
        browser="Chrome",
        browser_version="131.0.0",
        os="Linux",
        device_class="desktop",
        is_bot=False,
        utm_source="news",
        referrer_host="www.google.com",
        referrer_class="search",
        country="DE",
    )
    rows[1].update(is_bot=True, data='{"tags": ["a", "b"], "ok": true}')
    return rows


@pytest.mark.postgres
def test_copied_rows_are_stored_exactly_as_the_statement_stores_them(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COPY path and the statement that skips stored ids store the same values."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)  # these groups are small
    engine = create_db_engine(postgres_url)
    sessions = create_session_factory(engine)
    copied_project, statement_project = new_project(sessions), new_project(sessions)
    before = _stored_groups_with_stored_ids()
    rows = _full_rows("x", copied_project)
    same_rows = [{**row, "project_id": statement_project} for row in rows]
    copied: list[int] = []
    real_copy_rows = storage._copy_rows

    def copy_rows(connection: psycopg.Connection[Any], rows: list[dict[str, object]]) -> None:
        copied.append(len(rows))
        real_copy_rows(connection, rows)

    monkeypatch.setattr(storage, "_copy_rows", copy_rows)
    with _driver(engine) as connection:
        storage.write_rows(connection, rows)
        assert copied == [3]
        connection.execute(storage._PG_INSERT_DRIVER, storage._parameters(same_rows))
        columns = ", ".join(
            f"{name}::text" for name in storage.COLUMN_NAMES if name != "project_id"
        )
        stored = {
            project: connection.execute(
                f"SELECT {columns} FROM events WHERE project_id = %s ORDER BY event_id",
                [project],
            ).fetchall()
            for project in (copied_project, statement_project)
        }
        links = connection.execute("SELECT project_id FROM identity_links").fetchall()
        ids = {
            project: connection.execute(
                "SELECT event_id, received_at, occurred_at FROM event_ids "
                "WHERE project_id = %s ORDER BY event_id",
                [project],
            ).fetchall()
            for project in (copied_project, statement_project)
        }
    assert _stored_groups_with_stored_ids() == before  # no stored id met
    assert len(ids[copied_project]) == 3 and ids[copied_project] == ids[statement_project]
    assert len(stored[copied_project]) == 3
    assert stored[copied_project] == stored[statement_project]
    first = stored[copied_project][0]
    data = first[storage.COLUMN_NAMES.index("data") - 1]
    assert "49.90" in data and "123456789012345678901234567890" in data
    assert first[storage.COLUMN_NAMES.index("occurred_at") - 1].startswith("2026-03-01 11:59:00")
    assert (copied_project,) in links  # the identity link committed with the rows
    engine.dispose()


@pytest.mark.postgres
def test_a_group_holding_a_stored_id_skips_it_and_stores_the_rest(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)  # these groups are small
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))
    with _driver(engine) as connection:
        storage.write_rows(connection, rows_for("a", 1, project_id))
        before = _stored_groups_with_stored_ids()
        retry = rows_for("a", 3, project_id)  # a-0 is stored already
        retry[0]["type"] = "resent"
        storage.write_rows(connection, retry)
        stored = connection.execute(
            "SELECT event_id, type FROM events ORDER BY event_id"
        ).fetchall()
    assert stored == [("a-0", "t"), ("a-1", "t"), ("a-2", "t")]
    assert _stored_groups_with_stored_ids() == before + 1
    engine.dispose()


@pytest.mark.postgres
def test_copies_sharing_ids_wait_for_each_other_and_store_each_once(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COPY meeting an id another transaction holds waits for it; once that one commits, the
    waiting group is written by the statement, which skips the id: nobody deadlocks or fails."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)  # these groups are small
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))

    def rows(*ids: str) -> list[dict[str, object]]:
        return rows_with_ids(project_id, *ids)

    failures: list[BaseException] = []
    with (
        _driver(engine, autocommit=False) as first,
        _driver(engine) as second,
    ):
        for connection in (first, second):
            connection.execute("SET lock_timeout = '10s'")
        first.commit()

        def write_second() -> None:
            try:
                storage.write_rows(second, rows("b", "a"))
            except BaseException as error:
                failures.append(error)

        storage.write_rows(first, rows("a"))  # in `first`'s transaction, not committed
        waiting = threading.Thread(target=write_second)
        waiting.start()
        time.sleep(0.5)  # `second` now waits for "a", before it takes "b" (key order)
        storage.write_rows(first, rows("b"))
        first.commit()
        waiting.join(timeout=15)
    assert failures == []
    assert sorted(stored_ids(postgres_url)) == ["a", "b"]
    engine.dispose()


@pytest.mark.postgres
def test_a_small_group_is_written_by_the_statement_a_large_one_by_copy(postgres_url: str) -> None:
    """Below COPY_FROM_ROWS rows a group is one statement (it never tries COPY, so a stored id
    does not count); from it on, COPY first."""
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))
    size = storage.COPY_FROM_ROWS
    with _driver(engine) as connection:
        storage.write_rows(connection, rows_for("a", 1, project_id))
        before = _stored_groups_with_stored_ids()
        storage.write_rows(connection, rows_for("a", size - 1, project_id))
        assert _stored_groups_with_stored_ids() == before
        storage.write_rows(connection, rows_for("a", size, project_id))
        assert _stored_groups_with_stored_ids() == before + 1
        count = connection.execute("SELECT count(DISTINCT event_id), count(*) FROM events")
        assert count.fetchone() == (size, size)
    engine.dispose()


@pytest.mark.postgres
def test_after_a_group_with_a_stored_id_the_next_groups_skip_copy_for_a_while(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog being replayed: a COPY that fails on a stored id is not tried again for the
    next STATEMENT_GROUPS groups, then it is."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)
    monkeypatch.setattr(storage._CopyChoice, "STATEMENT_GROUPS", 2)
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))
    with _driver(engine) as connection:
        storage.write_rows(connection, rows_for("a", 1, project_id))
        before = _stored_groups_with_stored_ids()
        for attempt in range(4):  # a-0 is stored: tried, skipped twice, tried again
            storage.write_rows(connection, rows_for("a", 2 + attempt, project_id))
        assert _stored_groups_with_stored_ids() == before + 2
        stored = connection.execute("SELECT count(DISTINCT event_id), count(*) FROM events")
        assert stored.fetchone() == (5, 5)
    engine.dispose()


@pytest.mark.postgres
def test_a_copy_whose_events_fail_leaves_no_id_behind(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids' COPY and the events' COPY commit together or not at all: an id left without
    its event would make every retry skip the event."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))
    rows = rows_for("a", 3, project_id)
    rows[2]["clock_skew_ms"] = 2**63  # beyond bigint: fails in the events' COPY
    with _driver(engine) as connection:
        with pytest.raises(OverflowError):
            storage.write_rows(connection, rows)
        assert connection.execute("SELECT count(*) FROM event_ids").fetchone() == (0,)
        rows[2]["clock_skew_ms"] = 0
        storage.write_rows(connection, rows)
    assert sorted(stored_ids(postgres_url)) == ["a-0", "a-1", "a-2"]
    engine.dispose()


@pytest.mark.postgres
def test_a_copy_and_a_statement_take_shared_ids_in_one_order_whatever_the_collation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python sorts the COPY's ids by code point; the statement sorts in SQL. In a database
    whose collation puts "a" before "B" (ICU en-US) they must still agree, or a COPY and a
    statement sharing ids deadlock: here the COPY takes "B" and waits for "M"; a statement
    sorting "a" first would take "a" and wait for "B"; the COPY would then wait for "a"."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)
    options = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    with fresh_postgres_database(options=options) as url:
        engine = create_db_engine(url)
        project_id = new_project(create_session_factory(engine))

        def rows(*ids: str) -> list[dict[str, object]]:
            return rows_with_ids(project_id, *ids)

        failures: list[BaseException] = []

        def statement(connection: psycopg.Connection[Any]) -> None:
            try:
                connection.execute(storage._PG_INSERT_DRIVER, storage._parameters(rows("a", "B")))
            except BaseException as error:
                failures.append(error)

        def copy(connection: psycopg.Connection[Any]) -> None:
            try:
                storage.write_rows(connection, rows("a", "M", "B"))
            except BaseException as error:
                failures.append(error)

        with (
            _driver(engine, autocommit=False) as holder,
            _driver(engine) as first,
            _driver(engine) as second,
        ):
            for connection in (holder, first, second):
                connection.execute("SET lock_timeout = '10s'")
            holder.commit()
            holder.execute(storage._PG_INSERT_DRIVER, storage._parameters(rows("M")))
            threads = [
                threading.Thread(target=copy, args=(second,)),  # takes "B", waits for "M"
                threading.Thread(target=statement, args=(first,)),  # waits for "B"
            ]
            for thread in threads:
                thread.start()
                time.sleep(0.5)
            holder.rollback()
            for thread in threads:
                thread.join(timeout=15)
        assert failures == []
        assert sorted(stored_ids(url)) == ["B", "M", "a"]
        engine.dispose()


@pytest.mark.postgres
def test_the_loaders_insert_stays_in_the_callers_transaction(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`insert_events_fast` as the first statement of a SQLAlchemy transaction that is then
    rolled back: nothing stays (psycopg's transaction() would have committed a COPY itself)."""
    monkeypatch.setattr(storage, "COPY_FROM_ROWS", 1)
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))
    for size in (1, 3):  # the statement's path, then COPY's
        with pytest.raises(RuntimeError), engine.begin() as connection:
            monkeypatch.setattr(storage, "COPY_FROM_ROWS", size)
            storage.insert_events_fast(connection, rows_for("a", 3, project_id))
            raise RuntimeError("the caller gives up")
    assert stored_ids(postgres_url) == []
    with engine.begin() as connection:
        storage.insert_events_fast(connection, rows_for("a", 3, project_id))
    assert sorted(stored_ids(postgres_url)) == ["a-0", "a-1", "a-2"]
    engine.dispose()
