"""Prometheus plumbing shared by the gRPC server and the gateway (prometheus-client).

Several processes serve one port (gRPC processes behind SO_REUSEPORT, granian's gateway
workers), so metrics use prometheus-client's multiprocess mode: the command that starts the
processes points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any of them imports
prometheus_client (`apex_ingest.common.metrics_dir`), every process writes its samples there,
and whoever serves a scrape adds them up (`registry()`). A process started on its own, with
no such directory, uses the ordinary in-process registry.

Each process defines its own metrics (apex_ingest.server.metrics, gateway.observability);
labels never carry unchecked client input, so no caller can mint new time series.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

from apex_ingest.common import metric_values
from apex_ingest.common.settings import Internal, cannot_listen, variable

log = logging.getLogger(__name__)


metric_values.install()  # before any process defines its metrics (they all import this module)


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_enabled() -> bool:
    return bool(Internal.get(Internal.PROMETHEUS_MULTIPROC_DIR))


def registry() -> CollectorRegistry:
    """What a scrape should return: all processes' samples in multiprocess mode, else ours."""
    if not multiprocess_enabled():
        return REGISTRY
    collected = CollectorRegistry()
    _FlushingCollector(collected)  # type: ignore[no-untyped-call]
    return collected


class _FlushingCollector(_multiprocess.MultiProcessCollector):
    """Every process's samples, this one's as of the scrape (the others' are written by their
    flushers: apex_ingest.common.metric_values)."""

    def collect(self) -> Any:
        try:
            metric_values.flush()
        except Exception:  # this process's latest updates wait; the scrape still answers
            log.exception("could not write this process's metrics before a scrape")
        return super().collect()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (in-flight, pool) from the sums."""
    if multiprocess_enabled():
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve_metrics(host: str, port: int | None) -> int | None:
    """Serve /metrics on host:port (APEX_METRICS_PORT) in a daemon thread.

    Returns the port, or None when not configured (None) or when a parent process serves them.
    """
    if Internal.get(Internal.METRICS_SERVED_BY_PARENT) == "1":
        return None
    if port is None:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry())
    except OSError as error:  # taken since the command checked it: one line, not a traceback
        raise cannot_listen(host, port, variable("metrics_port"), error) from None
    bound = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
