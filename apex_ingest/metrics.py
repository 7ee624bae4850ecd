"""Prometheus metrics of the gRPC server (prometheus-client), and the multiprocess plumbing.

Several processes serve one port (gRPC processes behind SO_REUSEPORT, granian's gateway
workers), so metrics use prometheus-client's multiprocess mode: the command that starts the
processes points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any of them imports
prometheus_client (`apex_ingest.metrics_dir`), every process writes its samples there,
and whoever serves a scrape adds them up (`registry()`). A process started on its own, with
no such directory, uses the ordinary in-process registry.

Labels never carry unchecked client input: `project` is a project key the server has
authenticated, else "unknown", so no caller can mint new time series.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess
from sqlalchemy import Engine, event

from apex_ingest.config import env_int
from apex_ingest.metrics_dir import MULTIPROC_ENV, SERVED_BY_PARENT_ENV

log = logging.getLogger(__name__)


UNKNOWN_PROJECT = "unknown"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

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


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def registry() -> CollectorRegistry:
    """What a scrape should return: all processes' samples in multiprocess mode, else ours."""
    if not multiprocess_enabled():
        return REGISTRY
    collected = CollectorRegistry()
    _multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
    return collected


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (in-flight, pool) from the sums."""
    if multiprocess_enabled():
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def metrics_port() -> int | None:
    """APEX_METRICS_PORT: where the gRPC server serves /metrics; unset or empty: nowhere."""
    if not os.environ.get("APEX_METRICS_PORT", "").strip():
        return None
    return env_int("APEX_METRICS_PORT", 0, high=65535)


def serve_metrics(host: str, port: int | None = None) -> int | None:
    """Serve /metrics on host:port (APEX_METRICS_PORT if None) in a daemon thread.

    Returns the port, or None when not configured or when a parent process serves them.
    """
    if os.environ.get(SERVED_BY_PARENT_ENV) == "1":
        return None
    port = metrics_port() if port is None else port
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry())
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
