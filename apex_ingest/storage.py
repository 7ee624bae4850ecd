"""Writing events: group commit, insert-or-ignore on (project_id, event_id).

Concurrent requests are written together: one writer thread per process takes
everything queued since its last commit (up to `max_group_rows` rows), writes it
in one transaction and only then wakes the callers. Many small requests thus
share one commit (and one fsync) instead of paying for one each. Each request
is still all-or-nothing: a group that fails for a reason other than the
database being unavailable is retried request by request, so one request that
cannot be stored never fails the others.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, exc, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.errors import IngestError, StorageUnavailable
from apex_ingest.models import Event

log = logging.getLogger(__name__)

# Errors that mean "the database cannot take this now", not "this request is wrong".
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,  # no pooled connection within pool_timeout
)

Row = dict[str, Any]

_COLUMNS = (
    ("project_id", "bigint"),
    ("event_id", "text"),
    ("type", "text"),
    ("visitor_id", "text"),
    ("user_id", "text"),
    ("url", "text"),
    ("referrer", "text"),
    ("data", "jsonb"),
    ("occurred_at", "timestamptz"),
    ("received_at", "timestamptz"),
    ("ip", "text"),
    ("user_agent", "text"),
)
# One statement for any number of rows: each column travels as one array parameter.
# (COPY is not an option: it cannot skip rows that conflict.)
_PG_INSERT = text(
    f"INSERT INTO events ({', '.join(name for name, _ in _COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(f"CAST(:{name} AS {pg_type}[])" for name, pg_type in _COLUMNS)
    + ") ON CONFLICT (project_id, event_id) DO NOTHING"
)


def insert_events(connection: Connection | Session, rows: Sequence[Row]) -> None:
    """Insert rows; a row whose (project_id, event_id) is already stored is skipped."""
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    if bind.dialect.name == "postgresql":
        columns = {name: [row[name] for row in rows] for name, _ in _COLUMNS}
        connection.execute(_PG_INSERT, columns)
    else:
        statement = sqlite.insert(Event).on_conflict_do_nothing(
            index_elements=["project_id", "event_id"]
        )
        connection.execute(statement, list(rows))


@dataclass(eq=False)
class _Pending:
    rows: list[Row]
    done: threading.Event = field(default_factory=threading.Event)
    error: IngestError | None = None


class EventStore:
    """Stores each request's rows atomically, committing concurrent requests together."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        retry_after_seconds: int,
        max_group_rows: int = 5000,
    ) -> None:
        self._session_factory = session_factory
        self._retry_after = retry_after_seconds
        self._max_group_rows = max_group_rows
        self._queue: deque[_Pending] = deque()
        self._wakeup = threading.Condition()
        self._writer: threading.Thread | None = None
        self.group_sizes: list[int] = []  # last groups' request counts, for tests and metrics

    def store(self, project_id: int, rows: list[Row]) -> None:
        """Return once the rows are committed; raise StorageUnavailable if they cannot be."""
        for row in rows:
            row["project_id"] = project_id
        pending = _Pending(rows)
        with self._wakeup:
            if self._writer is None or not self._writer.is_alive():
                # Started on first use, so a forked child gets its own writer.
                self._writer = threading.Thread(target=self._write_forever, daemon=True)
                self._writer.start()
            self._queue.append(pending)
            self._wakeup.notify()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def _write_forever(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue:
                    self._wakeup.wait()
                group = [self._queue.popleft()]
                total = len(group[0].rows)
                while self._queue and total + len(self._queue[0].rows) <= self._max_group_rows:
                    total += len(self._queue[0].rows)
                    group.append(self._queue.popleft())
            self._write_group(group)

    def _write_group(self, group: list[_Pending]) -> None:
        self.group_sizes = [*self.group_sizes[-99:], len(group)]
        try:
            self._commit([row for pending in group for row in pending.rows])
        except UNAVAILABLE_ERRORS as error:
            log.warning("storage unavailable: %s", error.__class__.__name__)
            self._finish(group, StorageUnavailable(self._retry_after))
        except Exception:
            if len(group) == 1:
                log.exception("could not store a request")
                self._finish(group, IngestError("could not store the events"))
            else:
                # Something in one request broke the group: store each on its own.
                for pending in group:
                    self._write_group([pending])
        else:
            self._finish(group, None)

    def _commit(self, rows: list[Row]) -> None:
        with self._session_factory.begin() as session:
            insert_events(session, rows)

    @staticmethod
    def _finish(group: list[_Pending], error: IngestError | None) -> None:
        for pending in group:
            pending.error = error
            pending.done.set()


def storage_reachable(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except exc.DBAPIError:
        return False
    except exc.TimeoutError:
        return False
