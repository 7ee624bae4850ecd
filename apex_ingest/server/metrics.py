"""Prometheus metrics of the gRPC server.

Labels never carry unchecked client input: `project` is a project key the server has
authenticated, else "unknown", so no caller can mint new time series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Engine, event

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
DEAD_LETTERS_RECORDED = Counter(
    "apex_dead_letters_recorded",
    "Events of refused requests (known keys) written as dead letters.",
    ["project"],
)
DEAD_LETTERS_DROPPED = Counter(
    "apex_dead_letters_dropped",
    "Events of refused requests not written as dead letters: unknown_key (never recorded), "
    "queue_full (the writer was behind), write_failed.",
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
DB_POOL_IN_USE = Gauge(
    "apex_db_pool_connections_in_use",
    "Database connections checked out of the pool.",
    multiprocess_mode="livesum",
)


def instrument_pool(engine: Engine) -> None:
    """Track checked-out connections of `engine` in DB_POOL_IN_USE."""
    event.listen(engine, "checkout", lambda *_: DB_POOL_IN_USE.inc())
    event.listen(engine, "checkin", lambda *_: DB_POOL_IN_USE.dec())
