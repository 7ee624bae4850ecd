"""Group commit: concurrent requests share a transaction, yet each stays all-or-nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

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
