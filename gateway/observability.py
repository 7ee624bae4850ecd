"""Request ids, the access log and Prometheus metrics of the gateway (GET /metrics).

Every request gets a request id: the client's `X-Request-ID` if it is a sane token (see
apex_ingest.common.logs.clean_request_id), else a new one. It is returned in the `X-Request-ID`
response header, sent to the gRPC server as `x-request-id` metadata (gateway.grpc_client),
and carried by every log record written while handling the request.

granian runs several worker processes; `apex-ingest gateway`/`serve` point
PROMETHEUS_MULTIPROC_DIR at one directory for all of them, and /metrics adds their samples
up. Labels never carry unchecked client input: `endpoint` is the matched URL rule, `method` a
known method, and `project` a key the ingest server has accepted in this process (else
"unverified"), so no client can create new time series at will.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from apex_ingest.common import metrics as server_metrics
from apex_ingest.common.logs import (
    REQUEST_ID_HEADER,
    access_log_enabled,
    clean_request_id,
    request_id_var,
)
from gateway.client_ip import logged_ip
from gateway.config import get_settings
from gateway.errors import error_code
from gateway.request_state import ParsedBody

log = logging.getLogger("gateway.access")

UNVERIFIED_PROJECT = "unverified"
#: Project keys remembered as accepted by the server; beyond this, new ones are "unverified".
MAX_PROJECT_LABELS = 10_000
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "apex_gateway_http_requests",
    "HTTP requests answered, by endpoint (URL rule), method and status.",
    ["endpoint", "method", "status"],
)
DURATION = Histogram(
    "apex_gateway_http_request_duration_seconds",
    "Time to answer an HTTP request, by endpoint (URL rule) and method.",
    ["endpoint", "method"],
    buckets=server_metrics.LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "apex_gateway_http_requests_in_flight",
    "HTTP requests being handled.",
    multiprocess_mode="livesum",
)
EVENTS_ACCEPTED = Counter(
    "apex_gateway_events_accepted",
    "Events of POST /api/events requests answered 200.",
    ["project"],
)
EVENTS_REJECTED = Counter(
    "apex_gateway_events_rejected",
    "Events of refused POST /api/events requests (a body that could not be parsed counts as "
    "one), by reason (the error code of the answer).",
    ["project", "reason"],
)

COALESCED_REQUESTS = Histogram(
    "apex_gateway_coalesced_requests",
    "HTTP requests carried by each IngestMany call of the gateway (gateway/coalescer.py).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

_verified_projects: set[str] = set()
_verified_lock = threading.Lock()

bp = Blueprint("observability", __name__)


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    return Response(generate_latest(server_metrics.registry()), content_type=CONTENT_TYPE_LATEST)


def install(app: Flask) -> None:
    """Register the hooks; call first in create_app so they run before the rate limiter's."""
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_teardown)
    app.register_blueprint(bp)


def _begin() -> None:
    g.apex_started = time.perf_counter()
    request_id = clean_request_id(request.headers.get(REQUEST_ID_HEADER))
    g.apex_request_id = request_id
    g.apex_request_id_token = request_id_var.set(request_id)
    IN_FLIGHT.inc()
    g.apex_in_flight = True


def _finish(response: Response) -> Response:
    request_id = g.get("apex_request_id") or clean_request_id(None)
    response.headers[REQUEST_ID_HEADER] = request_id
    started: float | None = g.get("apex_started")
    elapsed = time.perf_counter() - started if started is not None else 0.0
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in _METHODS else "OTHER"
    status = response.status_code
    _child(REQUESTS, endpoint, method, str(status)).inc()
    _child(DURATION, endpoint, method).observe(elapsed)

    project, events = "", 0
    if request.endpoint == "api.ingest_events" and method == "POST":
        project, events = _count_events(status)
    # The record's fields cost a few µs to gather: only when it will be written.
    if access_log_enabled() and log.isEnabledFor(logging.INFO):
        log.info(
            "%s %s %d",
            method,
            request.path[:512],
            status,
            extra={
                "request_id": request_id,
                "method": method,
                "path": request.path[:512],
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "client_ip": logged_ip(request.remote_addr, get_settings().log_client_ip),
                "user_agent": request.headers.get("User-Agent", "")[:512],
                "project": project,
                "events": events,
            },
        )
    return response


# prometheus_client's labels() takes a lock and builds the label tuple on every call; the
# children are kept here instead (their number is bounded: URL rules x methods x statuses, and
# projects up to MAX_PROJECT_LABELS x error codes).
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def _count_events(status: int) -> tuple[str, int]:
    parsed: ParsedBody | None = g.get("apex_parsed_body")
    key = parsed.project_key if parsed is not None else ""
    events = len(parsed.payload.request.events) if parsed and parsed.payload else 1
    if status == 200 and key:
        with _verified_lock:
            if len(_verified_projects) < MAX_PROJECT_LABELS:
                _verified_projects.add(key)
    project = key if key in _verified_projects else UNVERIFIED_PROJECT
    if status == 200:
        _child(EVENTS_ACCEPTED, project).inc(events)
    else:
        _child(EVENTS_REJECTED, project, error_code(status)).inc(events)
    return project, events


def _teardown(_error: BaseException | None) -> None:
    if g.pop("apex_in_flight", False):
        IN_FLIGHT.dec()
    token = g.pop("apex_request_id_token", None)
    if token is not None:
        with contextlib.suppress(ValueError):  # set in another context: nothing to undo here
            request_id_var.reset(token)
