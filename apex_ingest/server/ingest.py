"""IngestEvents and IngestMany as plain functions: check, authorize, validate, store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from apex_ingest.server.errors import (
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
    UnknownProject,
)
from apex_ingest.server.projects import ProjectDirectory
from apex_ingest.server.storage import UNAVAILABLE_ERRORS, EventStore
from apex_ingest.server.validation import Row, build_rows, check_request_shape
from apex_ingest.v1 import ingest_pb2


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
    accepted = prepare(request, projects, datetime.now(UTC), retry_after_seconds)
    if not request.validate_only:
        store.store(accepted.project_id, accepted.rows, deadline)
    return len(accepted.rows)


def ingest_many(
    requests: Sequence[ingest_pb2.IngestEventsRequest],
    projects: ProjectDirectory,
    store: EventStore,
    retry_after_seconds: int = 1,
    deadline: float | None = None,
) -> list[int | IngestError]:
    """Each request's outcome, as ingest_events would give it alone: the number of events
    accepted, or why it was refused. The accepted requests are committed together (one group
    commit), each all-or-nothing; one request's failure never changes another's outcome."""
    received_at = datetime.now(UTC)
    outcomes: list[int | IngestError] = []
    to_store: list[tuple[int, Accepted]] = []
    for index, request in enumerate(requests):
        try:
            accepted = prepare(request, projects, received_at, retry_after_seconds)
        except IngestError as error:
            outcomes.append(error)
            continue
        outcomes.append(len(accepted.rows))
        if not request.validate_only:
            to_store.append((index, accepted))
    errors = store.store_many(
        [(accepted.project_id, accepted.rows) for _, accepted in to_store], deadline
    )
    for (index, _), failure in zip(to_store, errors, strict=True):
        if failure is not None:
            outcomes[index] = failure
    return outcomes


@dataclass(frozen=True, slots=True)
class Accepted:
    """A request that passed every check: its project and the rows to store."""

    project_id: int
    rows: list[Row]


def prepare(
    request: ingest_pb2.IngestEventsRequest,
    projects: ProjectDirectory,
    received_at: datetime,
    retry_after_seconds: int = 1,
) -> Accepted:
    """Check, authorize and validate a request; raise the IngestError that refuses it."""
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
        refused: IngestError = OriginNotAllowed(request.context.origin)
        refused.project_id = project.id
        raise refused
    rows = build_rows(request, received_at, violations)
    if violations:
        refused = InvalidRequest(violations)
        refused.project_id = project.id
        raise refused
    return Accepted(project.id, rows)
