"""Writing events: one transaction per request, insert-or-ignore on (project_id, event_id)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, exc, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.errors import StorageUnavailable
from apex_ingest.models import Event

# Errors that mean "the database cannot take this now", not "this request is wrong".
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,  # no pooled connection within pool_timeout
)


def insert_events(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows; a row whose (project_id, event_id) is already stored is skipped."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(Event).on_conflict_do_nothing(index_elements=["project_id", "event_id"])
    session.execute(statement, rows)


class EventStore:
    def __init__(self, session_factory: sessionmaker[Session], retry_after_seconds: int) -> None:
        self._session_factory = session_factory
        self._retry_after = retry_after_seconds

    def store(self, project_id: int, rows: list[dict[str, Any]]) -> None:
        """Commit all rows or none; StorageUnavailable when the database cannot take them."""
        for row in rows:
            row["project_id"] = project_id
        try:
            with self._session_factory.begin() as session:
                insert_events(session, rows)
        except UNAVAILABLE_ERRORS as error:
            raise StorageUnavailable(self._retry_after) from error


def storage_reachable(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except UNAVAILABLE_ERRORS:
        return False
    except exc.DBAPIError:
        return False
