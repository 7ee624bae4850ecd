"""IngestEvents and IngestMany as plain functions: check, authorize, validate, store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from apex_ingest.common.limits import MAX_VIOLATIONS_PER_EVENT
from apex_ingest.server import metrics
from apex_ingest.server.cookieless import assign_cookieless_visitors
from apex_ingest.server.deadletters import event_index
from apex_ingest.server.errors import (
    FieldViolation,
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
    UnknownProject,
)
from apex_ingest.server.people import SuppressionDirectory
from apex_ingest.server.projects import ProjectDirectory, ProjectInfo
from apex_ingest.server.storage import UNAVAILABLE_ERRORS, EventSink
from apex_ingest.server.validation import Row, build_rows, check_request_shape
from apex_ingest.v1 import ingest_pb2


@dataclass(frozen=True, slots=True)
class Outcome:
    """An accepted request: how many events were received, and for a partial request the
    events that were not (index, violations), with the project they were refused for."""

    received: int
    rejected: list[tuple[int, list[FieldViolation]]] = field(default_factory=list)
    project_id: int | None = None
    #: Events of suppressed ids dropped on purpose (counted in `received`: CONTRACT section 1).
    suppressed: int = 0
    #: The project as looked up for the request (its rate limit goes back to the gateway).
    project: ProjectInfo | None = None


def ingest_events(
    request: ingest_pb2.IngestEventsRequest,
    projects: ProjectDirectory,
    store: EventSink,
    retry_after_seconds: int = 1,
    deadline: float | None = None,
    retention: timedelta | None = None,
    suppressions: SuppressionDirectory | None = None,
) -> Outcome:
    """Store the request's events atomically and say how many were accepted (and, for a
    partial request, which were not).

    `deadline` (time.monotonic()): past it, nothing is stored (see EventStore.store).
    """
    accepted = prepare(
        request, projects, datetime.now(UTC), retry_after_seconds, retention, suppressions
    )
    if not request.validate_only and accepted.rows:
        store.store(accepted.project_id, accepted.rows, deadline)
    return accepted.outcome()


def ingest_many(
    requests: Sequence[ingest_pb2.IngestEventsRequest],
    projects: ProjectDirectory,
    store: EventSink,
    retry_after_seconds: int = 1,
    deadline: float | None = None,
    retention: timedelta | None = None,
    suppressions: SuppressionDirectory | None = None,
) -> list[Outcome | IngestError]:
    """Each request's outcome, as ingest_events would give it alone: the number of events
    accepted, or why it was refused. The accepted requests are committed together (one group
    commit), each all-or-nothing; one request's failure never changes another's outcome."""
    received_at = datetime.now(UTC)
    outcomes: list[Outcome | IngestError] = []
    to_store: list[tuple[int, Accepted]] = []
    for index, request in enumerate(requests):
        try:
            accepted = prepare(
                request, projects, received_at, retry_after_seconds, retention, suppressions
            )
        except IngestError as error:
            outcomes.append(error)
            continue
        outcomes.append(accepted.outcome())
        if not request.validate_only and accepted.rows:
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
    #: For a partial request: the events left out, with their violations.
    rejected: list[tuple[int, list[FieldViolation]]] = field(default_factory=list)
    #: Valid events of suppressed ids, dropped: accepted, never stored.
    suppressed: int = 0
    project: ProjectInfo | None = None
    #: Events of a bot dropped as the project asks (drop_bots): accepted, never stored.
    bots: int = 0

    def outcome(self) -> Outcome:
        return Outcome(
            len(self.rows) + self.suppressed + self.bots,
            self.rejected,
            self.project_id,
            self.suppressed,
            self.project,
        )


def prepare(
    request: ingest_pb2.IngestEventsRequest,
    projects: ProjectDirectory,
    received_at: datetime,
    retry_after_seconds: int = 1,
    retention: timedelta | None = None,
    suppressions: SuppressionDirectory | None = None,
) -> Accepted:
    """Check, authorize and validate a request; raise the IngestError that refuses it."""
    violations = check_request_shape(request)
    if any(v.field == "project_key" for v in violations):
        # Without a usable key there is no project to authorize; report everything at once.
        build_rows(
            request,
            received_at,
            violations,
            retention,
            enrich=False,
            visitor_required=request.derive_visitor_id,
        )
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
    cookieless = request.derive_visitor_id and project.cookieless
    rows = build_rows(
        request,
        received_at,
        violations,
        retention,
        project.redact_params,
        project.ip_mode,
        visitor_required=request.derive_visitor_id and not project.cookieless,
    )
    rejected: list[tuple[int, list[FieldViolation]]] = []
    if violations and request.partial:
        rejected_events = _rejected_events(violations)
        if rejected_events is not None:
            rejected, violations = rejected_events, []
    if violations:
        refused = InvalidRequest(violations)
        refused.project_id = project.id
        raise refused
    if cookieless and rows and not request.validate_only:
        # From the request's full IP (the rows' may be truncated already, as ip_mode says), and
        # before suppressions: a derived visitor id can be suppressed like any other.
        try:
            assign_cookieless_visitors(
                rows, project.id, request.context, received_at, projects.visitor_salts
            )
        except UNAVAILABLE_ERRORS as error:
            raise StorageUnavailable(retry_after_seconds) from error
    rows, bots = _without_bots(request, project, rows)
    suppressed = 0
    if suppressions is not None:
        # After validation: a suppressed person's invalid request is refused as anyone's.
        try:
            rows, suppressed = suppressions.drop_suppressed(project.id, rows)
        except UNAVAILABLE_ERRORS as error:
            raise StorageUnavailable(retry_after_seconds) from error
    return Accepted(project.id, rows, rejected, suppressed, project, bots)


def _without_bots(
    request: ingest_pb2.IngestEventsRequest, project: ProjectInfo, rows: list[Row]
) -> tuple[list[Row], int]:
    """`rows`, and how many were dropped: all of them if they are a bot's and the project
    drops bots.

    Every event of a request shares its User-Agent, so the whole request is a bot's or none of
    it. The dropped events still count as accepted (the client is told 200, as for repeated
    ids: a bot learns nothing) and are counted in apex_grpc_events_dropped{reason="bot"}.
    """
    if not (project.drop_bots and rows and rows[0]["is_bot"]):
        return rows, 0
    if not request.validate_only:
        metrics.EVENTS_DROPPED.labels(request.project_key, "bot").inc(len(rows))
    return [], len(rows)


def _rejected_events(
    violations: list[FieldViolation],
) -> list[tuple[int, list[FieldViolation]]] | None:
    """Each invalid event's violations, by index; None if the request itself breaks a rule
    (then it is refused as a whole, partial or not)."""
    by_event: dict[int, list[FieldViolation]] = {}
    for violation in violations:
        index = event_index(violation.field)
        if index is None:
            return None
        own = by_event.setdefault(index, [])
        if len(own) < MAX_VIOLATIONS_PER_EVENT:
            own.append(violation)
    return sorted(by_event.items())
