"""The IngestService servicer: a thin shell around `ingest.ingest_events`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import grpc

from apex_ingest.common import key_projects
from apex_ingest.common.limits import MAX_VIOLATIONS_PER_EVENT
from apex_ingest.common.logs import (
    REQUEST_ID_METADATA,
    access_log_enabled,
    clean_request_id,
    request_id_var,
)
from apex_ingest.common.rpc import within
from apex_ingest.server import metrics
from apex_ingest.server.deadletters import DeadLetterRecorder, event_index
from apex_ingest.server.errors import (
    FieldViolation,
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
    UnknownProject,
)
from apex_ingest.server.ingest import Outcome, ingest_events, ingest_many
from apex_ingest.server.people import SuppressionDirectory
from apex_ingest.server.projects import ProjectDirectory
from apex_ingest.server.status import error_status, rich_status
from apex_ingest.server.storage import EventSink
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)
#: Requests in one IngestMany call (the gateway sends far fewer; see the proto).
MAX_REQUESTS_PER_CALL = 1000
access_log = logging.getLogger("apex_ingest.access")


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(
        self,
        projects: ProjectDirectory,
        store: EventSink,
        retry_after_seconds: int = 1,
        on_storage_unavailable: Callable[[], None] = lambda: None,
        retention: timedelta | None = None,
        dead_letters: DeadLetterRecorder | None = None,
        suppressions: SuppressionDirectory | None = None,
    ) -> None:
        self._projects = projects
        #: Suppressed ids (apex-ingest people delete --suppress): their events are dropped.
        self._suppressions = suppressions
        #: APEX_RETENTION_DAYS: events older than this are refused (see validation.build_rows).
        self._retention = retention
        self._store = store
        self._dead_letters = dead_letters
        self._retry_after = retry_after_seconds
        self._on_storage_unavailable = on_storage_unavailable

    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        project = metrics.UNKNOWN_PROJECT

        def fields() -> dict[str, object]:
            return {"events": len(request.events), "project": project}

        with _Rpc("IngestEvents", context, fields) as rpc:
            try:
                remaining = context.time_remaining()
                outcome = ingest_events(
                    request,
                    self._projects,
                    self._store,
                    self._retry_after,
                    None if remaining is None else time.monotonic() + remaining,
                    self._retention,
                    self._suppressions,
                )
            except StorageUnavailable as error:
                _log_unavailable(error, request)
                self._mark_unavailable(error)
                rpc.code, project = _rejected(request, error)
                return _refuse(context, error_status(error))
            except IngestError as error:
                rpc.code, project = _rejected(request, error)
                self._keep(request, error)
                return _refuse(context, error_status(error))
            except Exception:
                # A bug, not the caller's fault: INTERNAL (never UNKNOWN), details in our log only.
                log.exception("IngestEvents failed")
                rpc.code, project = _rejected(request, IngestError())
                return _refuse(context, error_status(IngestError()))
            project = request.project_key  # authenticated by now
            if not request.validate_only:
                _count_accepted(project, outcome)
            self._keep_rejected(request, outcome)
            context.set_trailing_metadata(
                ((key_projects.PROJECTS_METADATA, _projects_of([outcome])),)
            )
            return ingest_pb2.IngestEventsResponse(
                received=outcome.received, rejected=_rejected_messages(outcome)
            )

    def IngestMany(
        self, request: ingest_pb2.IngestManyRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestManyResponse:
        results: list[ingest_pb2.IngestResult] = []

        def fields() -> dict[str, object]:
            return {
                "requests": len(request.requests),
                "refused": sum(1 for r in results if r.status.code),
                "events": sum(len(sub.events) for sub in request.requests),
            }

        with _Rpc("IngestMany", context, fields) as rpc:
            if len(request.requests) > MAX_REQUESTS_PER_CALL:
                rpc.code = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(rpc.code, f"at most {MAX_REQUESTS_PER_CALL} requests per call")
            remaining = context.time_remaining()
            try:
                outcomes = ingest_many(
                    request.requests,
                    self._projects,
                    self._store,
                    self._retry_after,
                    None if remaining is None else time.monotonic() + remaining,
                    self._retention,
                    self._suppressions,
                )
            except Exception:
                log.exception("IngestMany failed")  # a bug: every request gets INTERNAL
                outcomes = [IngestError() for _ in request.requests]
            for sub, outcome in zip(request.requests, outcomes, strict=True):
                results.append(self._result(sub, outcome))
            context.set_trailing_metadata(
                (
                    (
                        key_projects.PROJECTS_METADATA,
                        _projects_of(outcomes),
                    ),
                )
            )
            return ingest_pb2.IngestManyResponse(results=results)

    def RecordRefused(
        self, request: ingest_pb2.RecordRefusedRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.RecordRefusedResponse:
        """Keep the events of a request the gateway refused (JSON type errors) as dead letters;
        answer the server's own violations, as validate_only would (see the proto)."""
        checked = ingest_pb2.IngestEventsRequest()
        checked.CopyFrom(request.request)
        checked.validate_only = True  # whatever the caller set: nothing is ever stored
        checked.partial = False  # every violation is answered, every event kept

        def fields() -> dict[str, object]:
            return {"events": len(checked.events), "violations": len(request.violations)}

        with _Rpc("RecordRefused", context, fields) as rpc:
            if not request.violations:  # nothing refused it: keeping its events would be wrong
                error: IngestError | None = InvalidRequest(
                    [FieldViolation("violations", "must name at least one violation")]
                )
            else:
                error = self._check_refused(
                    checked, _bounded(request.violations, len(checked.events))
                )
            if error is None:
                return ingest_pb2.RecordRefusedResponse()
            status = error_status(error)
            rpc.code = status.code
            _refuse(context, status)
            return ingest_pb2.RecordRefusedResponse()

    def _check_refused(
        self, checked: ingest_pb2.IngestEventsRequest, edge: list[FieldViolation]
    ) -> IngestError | None:
        """RecordRefused's work: check `checked` (validate_only), keep its events as dead letters
        with `edge` and the server's own violations; the error to answer (None: OK)."""
        found: IngestError | None = None
        project_id: int | None = None
        try:
            project_id = ingest_events(
                checked,
                self._projects,
                self._store,
                self._retry_after,
                None,
                self._retention,
                self._suppressions,
            ).project_id
        except StorageUnavailable as error:
            self._mark_unavailable(error)
            return error
        except IngestError as error:
            found, project_id = error, error.project_id
        except Exception:
            log.exception("RecordRefused failed")
            return IngestError()
        # A field the edge reported arrived empty: the server's "is required" for it is no news.
        own = (
            [v for v in found.violations if not any(within(v.field, e.field) for e in edge)]
            if isinstance(found, InvalidRequest)
            else []
        )
        if isinstance(found, UnknownProject) or (
            isinstance(found, InvalidRequest) and project_id is None
        ):
            metrics.DEAD_LETTERS_DROPPED.labels("unknown_key").inc(max(1, len(checked.events)))
        elif (
            project_id is not None
            and self._dead_letters is not None
            and (found is None or isinstance(found, InvalidRequest | OriginNotAllowed))
        ):
            kept: InvalidRequest | OriginNotAllowed = (
                OriginNotAllowed(found.origin, edge)
                if isinstance(found, OriginNotAllowed)
                else InvalidRequest(edge + own)
            )
            # The events whose fields the edge emptied; all of them if one was the request's.
            emptied = {event_index(v.field, len(checked.events)) for v in edge}
            redact_params, ip_mode = self._scrubbing(checked.project_key)
            self._dead_letters.record(
                project_id,
                checked.project_key,
                checked,
                kept,
                redact_params=redact_params,
                only=self._unsuppressed(project_id, checked, None),
                ip_mode=ip_mode,
                incomplete=(
                    range(len(checked.events))
                    if None in emptied
                    else {index for index in emptied if index is not None}
                ),
            )
        if isinstance(found, InvalidRequest):
            return InvalidRequest(own) if own else None
        return found

    def _result(
        self, request: ingest_pb2.IngestEventsRequest, outcome: Outcome | IngestError
    ) -> ingest_pb2.IngestResult:
        """One request's result, counted in the metrics as IngestEvents would count it."""
        if isinstance(outcome, IngestError):
            if isinstance(outcome, StorageUnavailable):
                _log_unavailable(outcome, request)
                self._mark_unavailable(outcome)
            _rejected(request, outcome)
            self._keep(request, outcome)
            rich = rich_status(outcome)
            return ingest_pb2.IngestResult(
                status=ingest_pb2.RequestStatus(
                    code=rich.code, message=rich.message, details=rich.details
                )
            )
        if not request.validate_only:
            _count_accepted(request.project_key, outcome)
        self._keep_rejected(request, outcome)
        return ingest_pb2.IngestResult(
            received=outcome.received, rejected=_rejected_messages(outcome)
        )

    def _keep_rejected(self, request: ingest_pb2.IngestEventsRequest, outcome: Outcome) -> None:
        """The rejected events of a partial request: counted, and kept as dead letters."""
        if not outcome.rejected or request.validate_only or outcome.project_id is None:
            return
        metrics.EVENTS_REJECTED.labels(request.project_key, "invalid_argument").inc(
            len(outcome.rejected)
        )
        if self._dead_letters is not None:
            error = InvalidRequest([v for _, own in outcome.rejected for v in own])
            redact_params, ip_mode = self._scrubbing(request.project_key)
            self._dead_letters.record(
                outcome.project_id,
                request.project_key,
                request,
                error,
                redact_params=redact_params,
                only=self._unsuppressed(
                    outcome.project_id, request, [index for index, _ in outcome.rejected]
                ),
                ip_mode=ip_mode,
            )

    def _unsuppressed(
        self, project_id: int, request: ingest_pb2.IngestEventsRequest, only: list[int] | None
    ) -> list[int] | None:
        """`only` (None: every event) without the events of suppressed ids, counted as dropped
        dead letters: a suppressed person's data is not kept, valid or not."""
        if self._suppressions is None:
            return only
        try:
            kept = self._suppressions.kept_indexes(project_id, request)
        except Exception:  # the database may be gone: the writer will fail on its own
            return only
        if kept is None:
            return only
        chosen = kept if only is None else [index for index in only if index in set(kept)]
        dropped = (len(request.events) if only is None else len(only)) - len(chosen)
        if dropped:
            metrics.DEAD_LETTERS_DROPPED.labels("suppressed").inc(dropped)
        return chosen

    def _scrubbing(self, key: str) -> tuple[frozenset[str], str]:
        """The project's own secret parameter names and its IP mode (its key was just looked
        up: cached). Unknown (the database gone): the built-in names, and no IP kept."""
        try:
            project = self._projects.lookup(key)
        except Exception:  # the database may be gone
            return frozenset(), "none"
        if project is None:
            return frozenset(), "none"
        return project.redact_params, project.ip_mode

    def _mark_unavailable(self, error: StorageUnavailable) -> None:
        """Health turns at once on the database's failure, not on one caller's short wait."""
        if not error.for_deadline:
            self._on_storage_unavailable()

    def _keep(self, request: ingest_pb2.IngestEventsRequest, error: IngestError) -> None:
        """Keep the events of a request refused for its content as dead letters (queued; never
        blocks, never raises). Unknown keys are only counted."""
        if request.validate_only or self._dead_letters is None:
            return
        if isinstance(error, InvalidRequest | OriginNotAllowed) and error.project_id is not None:
            redact_params, ip_mode = self._scrubbing(request.project_key)
            self._dead_letters.record(
                error.project_id,
                request.project_key,
                request,
                error,
                redact_params=redact_params,
                only=self._unsuppressed(error.project_id, request, None),
                ip_mode=ip_mode,
            )
        elif isinstance(error, UnknownProject) or (
            isinstance(error, InvalidRequest) and error.project_id is None
        ):
            metrics.DEAD_LETTERS_DROPPED.labels("unknown_key").inc(max(1, len(request.events)))


def _log_unavailable(error: StorageUnavailable, request: ingest_pb2.IngestEventsRequest) -> None:
    # The database's own error if there was one; else the store's refusal (no answer in time).
    log.warning(
        "storage unavailable: %r",
        error.__cause__ or error,
        extra={"request_id": request.context.request_id or request_id_var.get()},
    )


def _count_accepted(project: str, outcome: Outcome) -> None:
    metrics.EVENTS_ACCEPTED.labels(project).inc(outcome.received)
    if outcome.suppressed:
        metrics.EVENTS_SUPPRESSED.labels(project).inc(outcome.suppressed)
        metrics.EVENTS_DROPPED.labels(project, "suppressed").inc(outcome.suppressed)


def _projects_of(outcomes: Sequence[Outcome | IngestError]) -> str:
    """The `x-apex-projects` metadata of an answer (apex_ingest.common.key_projects): the
    project and rate limit of each accepted request's key, for the gateway's limits."""
    entries: list[key_projects.KeyProject | None] = []
    for outcome in outcomes:
        project = outcome.project if isinstance(outcome, Outcome) else None
        entries.append(
            None
            if project is None
            else key_projects.KeyProject(project.id, project.rate_limit or "", project.uid)
        )
    return key_projects.encode(entries)


def _rejected_messages(outcome: Outcome) -> list[ingest_pb2.RejectedEvent]:
    return [
        ingest_pb2.RejectedEvent(
            index=index,
            violations=[
                ingest_pb2.FieldViolation(field=v.field, description=v.description) for v in own
            ],
        )
        for index, own in outcome.rejected
    ]


class _Rpc:
    """One RPC's bookkeeping, around its servicer method: the caller's request id in every log
    record while it runs, the in-flight gauge, and at its end the duration metric and the
    access-log record (`fields` built only if logged). The method sets `code` when it refuses."""

    def __init__(
        self, method: str, context: grpc.ServicerContext, fields: Callable[[], dict[str, object]]
    ) -> None:
        self.method = method
        self.code = grpc.StatusCode.OK
        self._context = context
        self._fields = fields

    def __enter__(self) -> _Rpc:
        self._token = request_id_var.set(_request_id(self._context))
        self._started = time.perf_counter()
        metrics.RPC_IN_FLIGHT.labels(self.method).inc()
        return self

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self._started
        method, code = self.method, self.code.name
        metrics.RPC_IN_FLIGHT.labels(method).dec()
        metrics.RPC_DURATION.labels(method, code).observe(elapsed)
        if access_log_enabled():
            access_log.info(
                "%s %s",
                method,
                code,
                extra={
                    "rpc": method,
                    "code": code,
                    **self._fields(),
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
        request_id_var.reset(self._token)


#: Characters of a caller's violation field or description kept in a dead letter.
MAX_EDGE_VIOLATION_CHARS = 512


def _bounded(violations: Sequence[ingest_pb2.FieldViolation], events: int) -> list[FieldViolation]:
    """A caller's violations as dead letters keep them: at most MAX_VIOLATIONS_PER_EVENT per
    event of the request and as many for the request itself (a field naming no event of it
    included, as dead letters file it), each cut to MAX_EDGE_VIOLATION_CHARS."""
    kept: list[FieldViolation] = []
    per_target: dict[int | None, int] = {}
    for violation in violations:
        target = event_index(violation.field, events)
        if per_target.get(target, 0) >= MAX_VIOLATIONS_PER_EVENT:
            continue
        per_target[target] = per_target.get(target, 0) + 1
        kept.append(
            FieldViolation(
                violation.field[:MAX_EDGE_VIOLATION_CHARS],
                violation.description[:MAX_EDGE_VIOLATION_CHARS],
            )
        )
    return kept


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
