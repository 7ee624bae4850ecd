"""The IngestService servicer: a thin shell around `ingest.ingest_events`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from apex_ingest import metrics
from apex_ingest.errors import (
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
)
from apex_ingest.ingest import ingest_events
from apex_ingest.logs import (
    REQUEST_ID_METADATA,
    access_log_enabled,
    clean_request_id,
    request_id_var,
)
from apex_ingest.projects import ProjectDirectory
from apex_ingest.status import error_status
from apex_ingest.storage import EventStore
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)
access_log = logging.getLogger("apex_ingest.access")


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(
        self,
        projects: ProjectDirectory,
        store: EventStore,
        retry_after_seconds: int = 1,
        on_storage_unavailable: Callable[[], None] = lambda: None,
    ) -> None:
        self._projects = projects
        self._store = store
        self._retry_after = retry_after_seconds
        self._on_storage_unavailable = on_storage_unavailable

    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        token = request_id_var.set(_request_id(context))
        started = time.perf_counter()
        metrics.RPC_IN_FLIGHT.labels("IngestEvents").inc()
        code, project = grpc.StatusCode.OK, metrics.UNKNOWN_PROJECT
        try:
            try:
                remaining = context.time_remaining()
                received = ingest_events(
                    request,
                    self._projects,
                    self._store,
                    self._retry_after,
                    None if remaining is None else time.monotonic() + remaining,
                )
            except StorageUnavailable as error:
                log.warning("storage unavailable: %r", error.__cause__)
                self._on_storage_unavailable()
                code, project = _rejected(request, error)
                return _refuse(context, error_status(error))
            except IngestError as error:
                code, project = _rejected(request, error)
                return _refuse(context, error_status(error))
            except Exception:
                # A bug, not the caller's fault: INTERNAL (never UNKNOWN), details in our log only.
                log.exception("IngestEvents failed")
                code, project = _rejected(request, IngestError())
                return _refuse(context, error_status(IngestError()))
            project = request.project_key  # authenticated by now
            if not request.validate_only:
                metrics.EVENTS_ACCEPTED.labels(project).inc(received)
            return ingest_pb2.IngestEventsResponse(received=received)
        finally:
            elapsed = time.perf_counter() - started
            metrics.RPC_IN_FLIGHT.labels("IngestEvents").dec()
            metrics.RPC_DURATION.labels("IngestEvents", code.name).observe(elapsed)
            if access_log_enabled():
                access_log.info(
                    "IngestEvents %s",
                    code.name,
                    extra={
                        "rpc": "IngestEvents",
                        "code": code.name,
                        "events": len(request.events),
                        "project": project,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            request_id_var.reset(token)


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            return clean_request_id(value)
    return clean_request_id(None)


def _rejected(
    request: ingest_pb2.IngestEventsRequest, error: IngestError
) -> tuple[grpc.StatusCode, str]:
    """Count a refused call; return its status code and the project label used."""
    code = error_status(error).code
    # Only errors raised after authentication name a real project; anything else could be
    # any string a caller made up, and must not become a label.
    authenticated = isinstance(error, OriginNotAllowed) or (
        isinstance(error, InvalidRequest)
        and not any(v.field == "project_key" for v in error.violations)
    )
    project = request.project_key if authenticated else metrics.UNKNOWN_PROJECT
    if not request.validate_only:  # a check, not an attempt: the caller counts its refusal
        metrics.EVENTS_REJECTED.labels(project, code.name.lower()).inc(max(1, len(request.events)))
    return code, project


def _refuse(context: grpc.ServicerContext, status: grpc.Status) -> ingest_pb2.IngestEventsResponse:
    # Setting the status instead of abort_with_status() behaves the same on the wire
    # and keeps the details under grpcio-testing, whose abort() drops trailing metadata.
    context.set_trailing_metadata(status.trailing_metadata)
    context.set_code(status.code)
    context.set_details(status.details)
    return ingest_pb2.IngestEventsResponse()
