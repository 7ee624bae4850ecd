"""The IngestService servicer: a thin shell around `ingest.ingest_events`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from apex_ingest.errors import IngestError, StorageUnavailable
from apex_ingest.ingest import ingest_events
from apex_ingest.projects import ProjectDirectory
from apex_ingest.status import error_status
from apex_ingest.storage import EventStore
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)


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
        try:
            received = ingest_events(request, self._projects, self._store, self._retry_after)
        except StorageUnavailable as error:
            log.warning("storage unavailable: %r", error.__cause__)
            self._on_storage_unavailable()
            return _refuse(context, error_status(error))
        except IngestError as error:
            return _refuse(context, error_status(error))
        except Exception:
            # A bug, not the caller's fault: INTERNAL (never UNKNOWN), details in our log only.
            log.exception("IngestEvents failed")
            return _refuse(context, error_status(IngestError()))
        return ingest_pb2.IngestEventsResponse(received=received)


def _refuse(context: grpc.ServicerContext, status: grpc.Status) -> ingest_pb2.IngestEventsResponse:
    # Setting the status instead of abort_with_status() behaves the same on the wire
    # and keeps the details under grpcio-testing, whose abort() drops trailing metadata.
    context.set_trailing_metadata(status.trailing_metadata)
    context.set_code(status.code)
    context.set_details(status.details)
    return ingest_pb2.IngestEventsResponse()
