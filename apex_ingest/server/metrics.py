"""Prometheus metrics of the gRPC server.

Labels never carry unchecked client input: `project` is a project key the server has
authenticated, else "unknown", so no caller can mint new time series.
"""

from __future__ import annotations

import weakref

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Engine, event
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from apex_ingest.common.metrics import LATENCY_BUCKETS

UNKNOWN_PROJECT = "unknown"

RPC_DURATION = Histogram(
    "apex_grpc_request_duration_seconds",
    "Time to handle an RPC, by method and status code.",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "apex_grpc_requests_in_flight",
    "RPCs being handled.",
    ["method"],
    multiprocess_mode="livesum",
)
EVENTS_ACCEPTED = Counter(
    "apex_grpc_events_accepted",
    "Events of accepted IngestEvents calls (repeats of a stored id included).",
    ["project"],
)
EVENTS_REJECTED = Counter(
    "apex_grpc_events_rejected",
    "Events of refused IngestEvents calls, by reason (the gRPC status code, lower case).",
    ["project", "reason"],
)
EVENTS_SUPPRESSED = Counter(
    "apex_grpc_events_suppressed",
    "Events of suppressed user or visitor ids (apex-ingest people delete --suppress) dropped "
    "at ingest; answered as accepted and counted in apex_grpc_events_accepted too. The same "
    'count as apex_grpc_events_dropped{reason="suppressed"} (kept for existing dashboards).',
    ["project"],
)
EVENTS_DROPPED = Counter(
    "apex_grpc_events_dropped",
    "Events answered as accepted but not stored on purpose, by reason (bot: the project "
    "drops events flagged as bots; suppressed: a suppressed person's). Also counted in "
    "apex_grpc_events_accepted.",
    ["project", "reason"],
)
DEAD_LETTERS_RECORDED = Counter(
    "apex_dead_letters_recorded",
    "Events of refused requests (known keys) written as dead letters.",
    ["project"],
)
DEAD_LETTERS_DROPPED = Counter(
    "apex_dead_letters_dropped",
    "Events of refused requests not written as dead letters: unknown_key (never recorded), "
    "queue_full (the writer was behind), write_failed, suppressed (a suppressed person's).",
    ["reason"],
)
GROUP_REQUESTS = Histogram(
    "apex_group_commit_requests",
    "Requests written together in one group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
GROUP_ROWS = Histogram(
    "apex_group_commit_rows",
    "Rows written in one group-commit transaction.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
GROUPS_WITH_STORED_IDS = Counter(
    "apex_group_commit_stored_id_groups",
    "Group-commit transactions (or loader commits) whose COPY met an event id already stored "
    "(a client's retry, a redelivered stream message): written by the statement that skips "
    "stored ids instead. Usually near 0; a steady rate means clients resend.",
)
DB_POOL_IN_USE = Gauge(
    "apex_db_pool_connections_in_use",
    "Database connections checked out of the pool for a call (key lookups, health probes, "
    "SQLite commits); 0 on an idle server. The group-commit writers' own connections are "
    "apex_db_writer_connections.",
    multiprocess_mode="livesum",
)
DB_WRITER_CONNECTIONS = Gauge(
    "apex_db_writer_connections",
    "Pooled connections each group-commit writer keeps for itself (PostgreSQL: up to 2 per "
    "gRPC process, from its first write on, idle or not).",
    multiprocess_mode="livesum",
)

#: Marks, in a pooled connection's `info`, a connection a group-commit writer keeps.
_WRITER = "apex_group_commit_writer"
_instrumented: weakref.WeakSet[Engine] = weakref.WeakSet()


def instrument_pool(engine: Engine) -> None:
    """Track checked-out connections of `engine`: DB_POOL_IN_USE, and DB_WRITER_CONNECTIONS
    for those a writer keeps (`hold_for_writer`)."""
    event.listen(engine, "checkout", lambda *_: DB_POOL_IN_USE.inc())
    event.listen(engine, "checkin", _checkin)
    _instrumented.add(engine)


def hold_for_writer(engine: Engine, connection: PoolProxiedConnection) -> None:
    """`connection` stays checked out for a group-commit writer: count it as the writer's.

    Before, the two writers of every gRPC process counted as "in use" for ever once they
    had written: an idle server with two processes read 4.
    """
    if engine in _instrumented and not connection.info.get(_WRITER):
        connection.info[_WRITER] = True
        DB_POOL_IN_USE.dec()
        DB_WRITER_CONNECTIONS.inc()


def _checkin(_dbapi_connection: object, record: ConnectionPoolEntry | None) -> None:
    if record is not None and record.info.pop(_WRITER, False):
        DB_WRITER_CONNECTIONS.dec()
    else:
        DB_POOL_IN_USE.dec()


# --- stream mode (apex_ingest/server/stream.py, apex_ingest/ops/loader.py) ---------------------

STREAM_PUBLISHED = Counter(
    "apex_stream_published",
    "Requests published to the stream, by outcome: ok (acknowledged by JetStream), "
    "unavailable (no acknowledgement: answered UNAVAILABLE), failed (a bug: INTERNAL).",
    ["outcome"],
)
STREAM_PUBLISH_SECONDS = Histogram(
    "apex_stream_publish_seconds",
    "Time from handing a call's requests to the stream to JetStream's acknowledgements.",
    buckets=LATENCY_BUCKETS,
)
LOADER_LAG = Gauge(
    "apex_loader_lag_messages",
    "Messages in the stream not yet loaded (each holds one or more requests of a project): "
    "the consumer's pending plus "
    "delivered-but-unacknowledged messages, as last read by this loader.",
    multiprocess_mode="max",
)
LOADER_MESSAGES = Counter(
    "apex_loader_messages",
    "Stream messages handled by loaders, by outcome: loaded (committed, then acked), "
    "deferred (the database failed: negatively acked, redelivered later), "
    "unreadable (unknown format: left in the stream, redelivered later).",
    ["outcome"],
)
LOADER_ROWS = Counter(
    "apex_loader_rows",
    "Event rows loaders committed (rows already stored are skipped by the insert, not counted "
    "apart).",
)
LOADER_ROWS_DROPPED = Counter(
    "apex_loader_rows_dropped",
    "Event rows loaders did not insert because their person was deleted after the event was "
    "received or is suppressed now, by reason (deleted, suppressed). A batch whose commit failed "
    "is counted again when it is retried.",
    ["reason"],
)
LOADER_DELAY = Histogram(
    "apex_loader_delay_seconds",
    "From a message's acknowledgement by the stream (its publication) to the commit of its "
    "rows by a loader (one observation per message, which holds one or more requests).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
