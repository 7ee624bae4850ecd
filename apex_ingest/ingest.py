"""IngestEvents as a plain function: check, authorize, validate, store."""

from __future__ import annotations

from datetime import UTC, datetime

from apex_ingest.errors import InvalidRequest, OriginNotAllowed, StorageUnavailable, UnknownProject
from apex_ingest.projects import ProjectDirectory
from apex_ingest.storage import UNAVAILABLE_ERRORS, EventStore
from apex_ingest.v1 import ingest_pb2
from apex_ingest.validation import build_rows, check_request_shape


def ingest_events(
    request: ingest_pb2.IngestEventsRequest,
    projects: ProjectDirectory,
    store: EventStore,
    retry_after_seconds: int = 1,
    deadline: float | None = None,
) -> int:
    """Store the request's events atomically and return how many were accepted.

    `deadline` (time.monotonic()): past it, nothing is stored (see EventStore.store).
    """
    received_at = datetime.now(UTC)
    violations = check_request_shape(request)
    if any(v.field == "project_key" for v in violations):
        # Without a usable key there is no project to authorize; report everything at once.
        build_rows(request, received_at, violations)
        raise InvalidRequest(violations)
    # Authenticate before reporting event problems: unknown callers learn nothing more.
    try:
        project = projects.lookup(request.project_key)
    except UNAVAILABLE_ERRORS as error:
        raise StorageUnavailable(retry_after_seconds) from error
    if project is None:
        raise UnknownProject()
    if not project.allows_origin(request.context.origin):
        raise OriginNotAllowed(request.context.origin)
    rows = build_rows(request, received_at, violations)
    if violations:
        raise InvalidRequest(violations)
    if not request.validate_only:
        store.store(project.id, rows, deadline)
    return len(rows)
