"""Group commit: concurrent requests share a transaction, yet each stays all-or-nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest import storage
from apex_ingest.database import create_db_engine, create_session_factory
from apex_ingest.errors import IngestError
from apex_ingest.projects import create_project
from apex_ingest.storage import EventStore, _Pending


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
                store.store(project_id, rows_for(f"{n}-{i}", 3, project_id))  # type: ignore[arg-type]
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
    good = _Pending(rows_for("good", 2, project_id))  # type: ignore[arg-type]
    bad = _Pending(rows_for("bad", 2, project_id=987654))  # type: ignore[arg-type]  # no such project
    also_good = _Pending(rows_for("also", 1, project_id))  # type: ignore[arg-type]
    store._write_group([good, bad, also_good])
    assert all(p.done.is_set() for p in (good, bad, also_good))
    assert good.error is None and also_good.error is None
    assert isinstance(bad.error, IngestError)
    assert sorted(stored_ids(database_url)) == ["also-0", "good-0", "good-1"]


@pytest.mark.postgres
def test_the_same_ids_in_another_order_wait_instead_of_deadlocking(postgres_url: str) -> None:
    """Two statements sharing ids in opposite orders: the second waits, nobody is cancelled.

    Inserted in request order, `second` would hold "b" while waiting for "a", and `first`
    would then wait for "b": PostgreSQL cancels one of them as a deadlock.
    """
    engine = create_db_engine(postgres_url)
    project_id = new_project(create_session_factory(engine))

    def columns(*ids: str) -> list[list[object]]:
        rows = rows_for("x", len(ids), project_id)
        for row, event_id in zip(rows, ids, strict=True):
            row["event_id"] = event_id
        return [[row[name] for row in rows] for name, _ in storage._COLUMNS]

    first, second = (engine.raw_connection() for _ in range(2))
    for proxy in (first, second):
        proxy.driver_connection.execute("SET lock_timeout = '10s'")
    failures: list[BaseException] = []

    def insert_then_commit() -> None:
        try:
            second.driver_connection.execute(storage._PG_INSERT_DRIVER, columns("b", "a"))
            second.driver_connection.commit()
        except BaseException as error:
            failures.append(error)
            second.driver_connection.rollback()

    try:
        first.driver_connection.execute(storage._PG_INSERT_DRIVER, columns("a"))
        waiting = threading.Thread(target=insert_then_commit)
        waiting.start()
        time.sleep(0.5)  # `second` is now waiting for "a"
        first.driver_connection.execute(storage._PG_INSERT_DRIVER, columns("b"))
        first.driver_connection.commit()
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
        store.store(project_id, rows_for("before", 1, project_id))  # type: ignore[arg-type]
        with engine.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        assert killed >= 1
        store.store(project_id, rows_for("after", 2, project_id))  # type: ignore[arg-type]
        assert sorted(stored_ids(postgres_url)) == ["after-0", "after-1", "before-0"]
    finally:
        engine.dispose()
