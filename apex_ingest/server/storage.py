"""Writing events: group commit, insert-or-ignore on (project_id, event_id).

Concurrent requests are written together: a free writer thread (two per process on
PostgreSQL, so one group is formed while another commits) takes everything queued
since (up to `max_group_rows` rows), writes it in one transaction and only then
wakes the callers. Many small requests thus
share one commit (and one fsync) instead of paying for one each. Each request
is still all-or-nothing: a group that fails for a reason other than the
database being unavailable is retried request by request, so one request that
cannot be stored never fails the others.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.types.json import Json
from sqlalchemy import Connection, Engine, exc, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server import identity, metrics
from apex_ingest.server.errors import DeadlinePassed, IngestError, StorageUnavailable
from apex_ingest.server.models import SCHEMA_REVISION, Event

log = logging.getLogger(__name__)

# Errors that mean "the database cannot take this now", not "this request is wrong".
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.TimeoutError,  # no pooled connection within pool_timeout
)

#: How long before a caller's deadline a refusal is sent, so that it arrives while the caller
#: still waits for it (the gateway's call, and its answer, cross a network).
ANSWER_MARGIN_SECONDS = 0.5

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
    # Enrichment (migration 0008; apex_ingest/server/enrichment.py).
    ("client_occurred_at", "timestamptz"),
    ("clock_skew_ms", "bigint"),
    ("browser", "text"),
    ("browser_version", "text"),
    ("os", "text"),
    ("device_class", "text"),
    ("is_bot", "boolean"),
    ("utm_source", "text"),
    ("utm_medium", "text"),
    ("utm_campaign", "text"),
    ("utm_term", "text"),
    ("utm_content", "text"),
    ("gclid", "text"),
    ("fbclid", "text"),
    ("referrer_host", "text"),
    ("referrer_class", "text"),
    ("country", "text"),
)


#: The columns a stored row has (stream mode's loaders fill those a message lacks with None).
COLUMN_NAMES = tuple(name for name, _ in _COLUMNS)


def _pg_insert_sql(rows_json: str) -> str:
    """One statement for any number of rows, which travel as one JSON array of objects
    (`rows_json`: the parameter, cast to json).

    JSON rather than one array parameter per column: orjson writes the whole group in C, where
    psycopg's array dumpers visit every element in Python (8 µs a row, held under the gRPC
    process's GIL, against 3; PostgreSQL spends 2-6 µs a row more reading it: bench/README.md,
    "Session 2026-12-03"). Each row's `data` travels as a JSON string of its original
    text and becomes jsonb only here, so its numbers are never rewritten.

    `events` is partitioned by occurred_at (migration 0002), so (project_id, event_id) cannot
    be a unique index of it: the ids go into `event_ids` first, ON CONFLICT DO NOTHING, and only
    the rows whose ids were new (RETURNING) go into `events`, in their order. One statement, one
    transaction: both or neither. Writers try `_copy_rows` first (COPY cannot skip a row that
    conflicts) and come here only when some id is already stored (`write_rows`).

    The rows must hold each (project_id, event_id) once (`_first_of_each_id`): ON CONFLICT DO
    NOTHING skips a repeat within the statement, but the join would then store the row twice.
    Deduplicating in Python is cheaper than the DISTINCT ON (a sort of the whole group) this
    statement had before (bench/README.md, "Write path").

    `event_ids.occurred_at` is that of the row stored: `db retention` forgets an id exactly when
    it removes its event (apex_ingest/ops/partitions.py).

    The ids are inserted in key order, not request order: two statements holding some of the
    same ids (a client retrying a request still in flight, in another order) then wait for
    each other in one direction only, instead of deadlocking. Byte order (`COLLATE "C"`), the
    order in which `_copy_rows` sorts them in Python, whatever the database's collation: a
    COPY and a statement must not take the same ids in different orders either.
    """
    names = [name for name, _ in _COLUMNS]
    columns = ", ".join(names)
    # A key the JSON lacks (rows built by tools, without the derived columns) reads as NULL.
    definitions = ", ".join(
        f"{name} {'text' if pg_type == 'jsonb' else pg_type}" for name, pg_type in _COLUMNS
    )
    values = ", ".join(
        f"i.{name}::jsonb" if pg_type == "jsonb" else f"i.{name}" for name, pg_type in _COLUMNS
    )
    return (
        f"WITH input AS (SELECT * FROM ROWS FROM (json_to_recordset({rows_json}) "
        f"AS ({definitions})) WITH ORDINALITY AS i({columns}, ord)), "
        "new_ids AS (INSERT INTO event_ids (project_id, event_id, received_at, occurred_at) "
        "SELECT project_id, event_id, received_at, occurred_at FROM input "
        'ORDER BY project_id, event_id COLLATE "C" '
        "ON CONFLICT DO NOTHING RETURNING project_id, event_id) "
        f"INSERT INTO events ({columns}) SELECT {values} "
        "FROM input i JOIN new_ids n ON n.project_id = i.project_id AND n.event_id = i.event_id "
        "ORDER BY i.ord"
    )


def _first_of_each_id(rows: Sequence[Row]) -> Sequence[Row]:
    """`rows` without repeats of a (project_id, event_id): the first of each is kept (a request,
    or a group of requests, may hold the same id twice)."""
    keys = {(row["project_id"], row["event_id"]) for row in rows}
    if len(keys) == len(rows):
        return rows
    seen: set[tuple[Any, Any]] = set()
    first = []
    for row in rows:
        key = (row["project_id"], row["event_id"])
        if key not in seen:
            seen.add(key)
            first.append(row)
    return first


_PG_INSERT = text(_pg_insert_sql("CAST(:rows AS json)"))


# The same statement for the group-commit writer, which talks to psycopg directly on a connection
# of its own in autocommit mode: one statement is one transaction, so a group costs one round
# trip (no pre-ping, no BEGIN, no COMMIT) and none of the ORM's per-call work.
_PG_INSERT_DRIVER = _pg_insert_sql("%b::json")


# Binary COPY sends each value in its column type's wire format; `data` is sent as jsonb's (a
# version byte, then the text: `_copy_rows`), so its numbers are never rewritten.
_BINARY_TYPES = {"bigint": "int8", "boolean": "bool", "jsonb": "bytea"}


class _CopyTable:
    """`COPY table (names) FROM STDIN (FORMAT BINARY)` of some of `_COLUMNS`: the statement, the
    types psycopg dumps them as, and each row's values in order."""

    def __init__(self, table: str, names: Sequence[str]) -> None:
        pg_types = dict(_COLUMNS)
        self.names = tuple(names)
        self.statement = f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
        self.types = [_BINARY_TYPES.get(pg_types[name], pg_types[name]) for name in names]
        self._times = tuple(i for i, name in enumerate(names) if pg_types[name] == "timestamptz")
        self._get = operator.itemgetter(*names)

    def values(self, row: Row) -> list[Any]:
        """The row's values; a missing key (rows built by tools) is NULL, a naive datetime UTC
        (as orjson's OPT_NAIVE_UTC reads it on the statement's path)."""
        try:
            values = list(self._get(row))
        except KeyError:
            values = [row.get(name) for name in self.names]
        for index in self._times:
            value = values[index]
            if value is not None and value.tzinfo is None:
                values[index] = value.replace(tzinfo=UTC)
        return values


_COPY_IDS = _CopyTable("event_ids", ("project_id", "event_id", "received_at", "occurred_at"))
_COPY_EVENTS = _CopyTable("events", COLUMN_NAMES)
_JSONB_VERSION = b"\x01"
_DATA = COLUMN_NAMES.index("data")
_id_key = operator.itemgetter("project_id", "event_id")


#: Groups of fewer rows are written by the statement: it is one round trip (and, without identity
#: links, its own transaction), where the COPYs take six; under load each costs a writer about a
#: millisecond of waiting, more than a small group saves (bench/README.md, "Session 2026-12-03,
#: fifth").
COPY_FROM_ROWS = 64


class _CopyChoice:
    """Whether the next group tries COPY. After a group that held a stored id, the next
    STATEMENT_GROUPS don't: a client replaying a backlog (or a stream redelivering one) makes
    most groups hold stored ids, and each such COPY costs its ids' COPY for nothing (with 1 % of
    ids repeated, nearly every 800-row group: 0.87x the statement's rate without this,
    bench/README.md, "Session 2026-12-03, fifth"). Shared by a process's writers; a race
    between them costs one group's choice, never correctness."""

    STATEMENT_GROUPS = 16

    def __init__(self) -> None:
        self._statement_groups_left = 0

    def copy_next(self) -> bool:
        if self._statement_groups_left <= 0:
            return True
        self._statement_groups_left -= 1
        return False

    def stored_id_met(self) -> None:
        self._statement_groups_left = self.STATEMENT_GROUPS


_copy_choice = _CopyChoice()


def write_rows(connection: psycopg.Connection[Any], rows: Sequence[Row]) -> None:
    """Store the rows whose (project_id, event_id) is new, and the identity links they show, in
    one transaction (within `connection`'s if it is in one).

    Most groups hold only new ids, so a group of COPY_FROM_ROWS rows or more is COPied
    (`_copy_rows`): PostgreSQL spends about 12 µs a row less than on the statement that skips
    stored ids, which reads the rows from JSON and joins them with the ids it inserted
    (bench/README.md, "Session 2026-12-03, fifth"). A group holding an id already stored (a
    client's retry, a redelivered stream message) fails its COPY on `event_ids`' key, is rolled
    back (to a savepoint, inside a transaction) and is written by that statement instead, as
    are the next groups for a while (`_CopyChoice`).
    """
    rows = _first_of_each_id(rows)
    links = identity.link_columns(identity.links_of(rows))
    if len(rows) >= COPY_FROM_ROWS and _copy_choice.copy_next():
        try:
            with _atomic(connection):
                _copy_rows(connection, rows)
                if links[0]:
                    connection.execute(identity.PG_LINKS_DRIVER, links)
            return
        except psycopg.errors.UniqueViolation:
            metrics.GROUPS_WITH_STORED_IDS.inc()
            _copy_choice.stored_id_met()
    # On an autocommit connection the statement alone is a transaction: only groups whose events
    # show identity links pay for a BEGIN and COMMIT, so that both commit together.
    with _atomic(connection) if connection.autocommit and links[0] else nullcontext():
        connection.execute(_PG_INSERT_DRIVER, _parameters(rows))
        if links[0]:
            connection.execute(identity.PG_LINKS_DRIVER, links)


@contextmanager
def _atomic(connection: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction of its own on an autocommit connection; otherwise a savepoint of the
    caller's transaction. (psycopg's `transaction()` would BEGIN and COMMIT one of its own on a
    connection whose caller's transaction has not run a statement yet, as SQLAlchemy's
    `engine.begin()` leaves it: the SAVEPOINT statement makes psycopg begin the caller's.)"""
    if connection.autocommit:
        with connection.transaction():
            yield
        return
    connection.execute("SAVEPOINT apex_write_rows")
    try:
        yield
    except BaseException:
        if not (connection.closed or connection.broken):  # else the original error is the news
            connection.execute("ROLLBACK TO SAVEPOINT apex_write_rows")
        raise
    connection.execute("RELEASE SAVEPOINT apex_write_rows")


def _copy_rows(connection: psycopg.Connection[Any], rows: Sequence[Row]) -> None:
    """COPY the rows into `event_ids` (in key order, as the statement inserts them, so that
    concurrent writers wait for each other instead of deadlocking) and into `events`; raises
    UniqueViolation if an id is stored already (or by a transaction that commits meanwhile)."""
    cursor = connection.cursor()
    with cursor.copy(_COPY_IDS.statement) as copy:
        copy.set_types(_COPY_IDS.types)
        for row in sorted(rows, key=_id_key):
            copy.write_row(_COPY_IDS.values(row))
    with cursor.copy(_COPY_EVENTS.statement) as copy:
        copy.set_types(_COPY_EVENTS.types)
        for row in rows:
            values = _COPY_EVENTS.values(row)
            data = values[_DATA]
            if data is not None:
                values[_DATA] = _JSONB_VERSION + data.encode()
            copy.write_row(values)


def insert_events(connection: Connection | Session, rows: Sequence[Row]) -> None:
    """Insert rows; a row whose (project_id, event_id) is already stored is skipped.

    The identity links the rows show are recorded in the same transaction (identity.py), from
    the first row of each id as the events themselves (and `write_rows`): a later row repeating
    an id is not stored, and shows no link either.
    """
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    rows = _first_of_each_id(rows)
    links = identity.links_of(rows)
    if bind.dialect.name == "postgresql":
        connection.execute(_PG_INSERT, {"rows": _rows_json(rows).decode()})
    else:
        statement = sqlite.insert(Event).on_conflict_do_nothing(
            index_elements=["project_id", "event_id"]
        )
        connection.execute(statement, list(identity.event_columns_only(rows)))
    identity.upsert_links(connection, links)


def insert_events_fast(connection: Connection, rows: Sequence[Row]) -> None:
    """`insert_events` (the events and the identity links they show) in the connection's
    transaction, on PostgreSQL by the group commit's own path (`write_rows`); the loaders'
    insert. SQLite: `insert_events`."""
    if connection.dialect.name != "postgresql":
        insert_events(connection, rows)
        return
    driver: Any = connection.connection.driver_connection
    try:
        write_rows(driver, rows)
    except psycopg.Error as error:  # classified as the SQLAlchemy path's errors are
        raise _as_sqlalchemy_error(error) from error


def _rows_json(rows: Sequence[Row]) -> bytes:
    """The rows as the statement reads them; each (project_id, event_id) must be there once
    (both callers, `write_rows` and `insert_events`, pass `_first_of_each_id`'s). Keys that are
    not columns (an alias's previous id) are ignored by json_to_recordset; a naive datetime
    is UTC."""
    return orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC)


def _parameters(rows: Sequence[Row]) -> list[Json]:
    # Json with a dumps that returns bytes: psycopg sends them as they are, without a copy.
    return [Json(rows, dumps=_rows_json)]


class EventSink(Protocol):
    """Where accepted requests go: the database (`EventStore`), or in stream mode the stream
    (`stream.StreamSink`). Either answers only once the rows are durable there."""

    def store(self, project_id: int, rows: list[Row], deadline: float | None = None) -> None:
        """Return once the rows are durable; raise the IngestError that says why not."""

    def store_many(
        self, requests: Sequence[tuple[int, list[Row]]], deadline: float | None = None
    ) -> list[IngestError | None]:
        """Each request's error (None: durable), each request all-or-nothing."""


class _OutcomeUnknown(Exception):
    """The connection broke during a commit and the database cannot be asked whether it happened."""


@dataclass(eq=False)
class _Pending:
    rows: list[Row]
    #: time.monotonic() past which the caller has given up (None: no deadline).
    deadline: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: IngestError | None = None


class EventStore:
    """Stores each request's rows atomically, committing concurrent requests together."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        retry_after_seconds: int,
        max_group_rows: int = 5000,
        writers: int = 2,
        commit_timeout: float | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._retry_after = retry_after_seconds
        # A database that stops answering without closing the connection (frozen, or behind a
        # middlebox that still acknowledges) would hold callers until their deadlines: past
        # this many seconds they are answered UNAVAILABLE instead: "maybe stored" if a writer
        # has their rows, plainly not stored if they were still queued (they are withdrawn).
        self._commit_timeout = commit_timeout
        self._max_group_rows = max_group_rows
        self._queue: deque[_Pending] = deque()
        self._wakeup = threading.Condition()
        bind = session_factory.kw.get("bind")
        # PostgreSQL: each writer keeps one pooled connection for itself (see _commit).
        self._pg_engine = (
            bind if isinstance(bind, Engine) and bind.dialect.name == "postgresql" else None
        )
        # SQLite has one writer at a time anyway.
        self._writer_count = max(1, writers) if self._pg_engine is not None else 1
        self._writers: list[threading.Thread] = []
        self._local = threading.local()  # .connection: a writer's pooled connection proxy
        self.group_sizes: list[int] = []  # last groups' request counts, for tests and metrics

    def store(self, project_id: int, rows: list[Row], deadline: float | None = None) -> None:
        """Return once the rows are committed; raise StorageUnavailable if they cannot be.

        `deadline` (time.monotonic()): if it passes while the rows wait for a writer, they are
        not written (DeadlinePassed): the caller was already told DEADLINE_EXCEEDED, and one
        that retries without event ids would otherwise store them twice.
        """
        error = self.store_many([(project_id, rows)], deadline)[0]
        if error is not None:
            raise error

    def store_many(
        self, requests: Sequence[tuple[int, list[Row]]], deadline: float | None = None
    ) -> list[IngestError | None]:
        """Store each request's rows atomically, all queued at once so that they share a group
        commit; return each request's error (None: committed), as `store` would raise it."""
        pendings = []
        for project_id, rows in requests:
            for row in rows:
                row["project_id"] = project_id
            pendings.append(_Pending(rows, deadline))
        if not pendings:
            return []
        with self._wakeup:
            if len(self._writers) < self._writer_count or not self._writers[0].is_alive():
                # Started on first use, so a forked child gets its own writers.
                self._writers = [
                    threading.Thread(target=self._write_forever, name="group-commit", daemon=True)
                    for _ in range(self._writer_count)
                ]
                for writer in self._writers:
                    writer.start()
            self._queue.extend(pendings)
            self._wakeup.notify(len(pendings))
        give_up, for_deadline = self._give_up_at(time.monotonic(), deadline)
        return [self._outcome(pending, give_up, for_deadline) for pending in pendings]

    def _give_up_at(self, now: float, deadline: float | None) -> tuple[float | None, bool]:
        """When a caller stops waiting for a writer, and whether its deadline decided it: at
        the commit timeout, or, for a caller that gave itself time enough, early enough before
        its deadline for the refusal (UNAVAILABLE with RetryInfo: a 503 with Retry-After) to
        reach it rather than the deadline passing first (a bare 504). A shorter deadline is
        the caller's choice: it gets DEADLINE_EXCEEDED as before, a slow commit no refusal."""
        at = None if self._commit_timeout is None else now + self._commit_timeout
        if deadline is not None and deadline - now >= 2 * ANSWER_MARGIN_SECONDS:
            early = deadline - ANSWER_MARGIN_SECONDS
            if at is None or early < at:
                return early, True
        return at, False

    def _outcome(
        self, pending: _Pending, give_up: float | None, for_deadline: bool
    ) -> IngestError | None:
        """Wait for a writer to answer `pending`, at most until `give_up` (time.monotonic())."""
        timeout = None if give_up is None else max(0.0, give_up - time.monotonic())
        if not pending.done.wait(timeout):
            with self._wakeup:
                try:
                    self._queue.remove(pending)  # still waiting for a writer: never written
                except ValueError:
                    pass
                else:
                    return StorageUnavailable(self._retry_after, for_deadline=for_deadline)
            if not pending.done.is_set():
                log.warning("no answer from the database in time; the caller is told to retry")
                return StorageUnavailable(
                    self._retry_after, maybe_stored=True, for_deadline=for_deadline
                )
        return pending.error

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
            now = time.monotonic()
            expired = [p for p in group if p.deadline is not None and p.deadline <= now]
            if expired:
                self._finish(expired, DeadlinePassed())
                group = [p for p in group if p not in expired]
                if not group:
                    continue
            try:
                self._write_group(group)
            except Exception:  # a bug: the callers must still be answered, the writer live on
                log.exception("group commit failed")
                # Requests already answered (committed one by one) keep their answer.
                unanswered = [pending for pending in group if not pending.done.is_set()]
                self._finish(unanswered, IngestError("could not store the events"))

    def _write_group(self, group: list[_Pending]) -> None:
        self.group_sizes = [*self.group_sizes[-99:], len(group)]
        metrics.GROUP_REQUESTS.observe(len(group))
        metrics.GROUP_ROWS.observe(sum(len(pending.rows) for pending in group))
        try:
            self._commit([row for pending in group for row in pending.rows])
        except _OutcomeUnknown as error:
            log.warning("storage unavailable during a commit: %s", error.__cause__)
            self._finish(group, StorageUnavailable(self._retry_after, maybe_stored=True))
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

    def _commit(self, rows: Sequence[Row]) -> None:
        if self._pg_engine is None:
            with self._session_factory.begin() as session:
                insert_events(session, rows)
            return
        try:
            self._pg_execute(rows)
        except psycopg.Error as error:
            # A statement timeout or a constraint error leaves the connection usable (autocommit:
            # nothing to roll back); only a lost connection is replaced.
            if not self._drop_pg_connection_if_lost():
                raise _as_sqlalchemy_error(error) from error
            # The connection broke (server restarted, idle timeout, network): the statement may
            # or may not have committed. Running it again on a fresh connection settles it:
            # every row has an event id and the insert skips ids already stored.
            try:
                self._pg_execute(rows)
            except psycopg.Error as again:
                # Whatever stopped the second try (even a lock the first one's session still
                # holds), nothing tells whether the first committed.
                self._drop_pg_connection_if_lost()
                raise _OutcomeUnknown() from again
            except UNAVAILABLE_ERRORS as again:  # no new connection
                raise _OutcomeUnknown() from again

    def _pg_execute(self, rows: Sequence[Row]) -> None:
        proxy: Any = getattr(self._local, "connection", None)
        if proxy is None:
            assert self._pg_engine is not None
            proxy = self._pg_engine.raw_connection()  # pre-pinged once, here
            metrics.hold_for_writer(self._pg_engine, proxy)
            proxy.driver_connection.autocommit = True
            self._local.connection = proxy
        try:
            write_rows(proxy.driver_connection, rows)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            # A deadlock with some other session (ours insert ids and links in key order and
            # cannot deadlock each other): the transaction was rolled back, so running it
            # again is safe.
            write_rows(proxy.driver_connection, rows)

    def _drop_pg_connection_if_lost(self) -> bool:
        """Forget this writer's connection if it is closed or broken; True if it was."""
        proxy: Any = getattr(self._local, "connection", None)
        if proxy is not None and not (
            proxy.driver_connection.closed or proxy.driver_connection.broken
        ):
            return False
        self._drop_pg_connection()
        return True

    def _drop_pg_connection(self) -> None:
        proxy, self._local.connection = getattr(self._local, "connection", None), None
        if proxy is not None:
            try:
                proxy.invalidate()  # closes it; the pool opens a new one when asked
            except Exception:  # it is being thrown away anyway
                log.debug("could not close a failed connection", exc_info=True)

    @staticmethod
    def _finish(group: list[_Pending], error: IngestError | None) -> None:
        for pending in group:
            pending.error = error
            pending.done.set()


#: What a writer's error names as its statement: `write_rows` runs one of several (a log line
#: that showed the INSERT for a failed COPY sent readers to the wrong one).
_GROUP_WRITE = "storage.write_rows (a COPY, the insert statement or the identity links)"


def _as_sqlalchemy_error(error: psycopg.Error) -> exc.StatementError:
    """The SQLAlchemy wrapper for a driver error, so callers classify it as they always do."""
    return exc.DBAPIError.instance(_GROUP_WRITE, None, error, psycopg.Error)


def storage_reachable(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except exc.DBAPIError:
        return False
    except exc.TimeoutError:
        return False


_SCHEMA_VERSION = text("SELECT version_num FROM alembic_version")


def storage_problem(engine: Engine) -> str | None:
    """Why the database cannot take events now, or None: unreachable, or reachable without this
    code's schema (never migrated, or behind it: every write would fail)."""
    try:
        with engine.connect() as connection:
            try:
                revision = connection.execute(_SCHEMA_VERSION).scalar()
            except exc.DBAPIError as error:
                if not _no_such_table(error):
                    raise
                revision = None
    except (exc.DBAPIError, exc.TimeoutError):
        return "the database is unreachable"
    if revision is None or (revision.isdigit() and int(revision) < int(SCHEMA_REVISION)):
        return (
            f"the database's schema is at revision {revision or 'none'}, this server needs "
            f"{SCHEMA_REVISION}: run `apex-ingest db upgrade`"
        )
    return None


def _no_such_table(error: exc.DBAPIError) -> bool:
    return isinstance(error.orig, psycopg.errors.UndefinedTable) or (
        "no such table" in str(error.orig)  # SQLite's OperationalError
    )
