"""ProjectService: a project's dead letters and its live feed, for holders of a secret key.

Every call is authenticated by `authenticate`: a secret key of the project in the metadata
(`authorization: Bearer sk_...` or `x-apex-secret-key`). No key, or an unknown or revoked one:
UNAUTHENTICATED; a public key: PERMISSION_DENIED.

TailEvents reads what is committed (it polls `events` and `dead_letters`), so it shows events
whichever server process or instance stored them. Ids are handed out when rows are inserted,
and two transactions may commit in the other order: a row committed late may carry an id below
one already sent. So each poll also looks again at the rows received in the last
`_LATE_COMMIT_WINDOW` seconds (longer than any commit may take) and sends those not yet sent.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server import deadletters
from apex_ingest.server import projects as project_store
from apex_ingest.server.models import DeadLetter, Event, Project, ProjectKey
from apex_ingest.server.projects import ProjectDirectory, ProjectInfo, active_public_keys
from apex_ingest.server.storage import UNAVAILABLE_ERRORS
from apex_ingest.v1 import ingest_pb2, project_pb2, project_pb2_grpc

log = logging.getLogger(__name__)

SECRET_KEY_METADATA = "x-apex-secret-key"
#: Seconds between two polls of a tail.
POLL_INTERVAL = 0.25
#: Seconds a tail runs before it ends (the caller calls again with the last ids it saw).
MAX_TAIL_SECONDS = 600.0
#: Tails one server process serves at once (each holds a thread of the server's pool).
MAX_TAILS = 8
#: Longer than any commit may take (connect + statement timeouts, with room).
_LATE_COMMIT_WINDOW = timedelta(seconds=15)
_BATCH = 500
_MAX_BACKLOG = 100
#: With `backlog_only` (a listing, not a tail) a call may ask for more at once.
_MAX_LISTED = 1000
_MAX_IDS = 1000
_MAX_PAGE = 1000
_UNAVAILABLE = "storage unavailable; retry later"


def secret_from_metadata(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == SECRET_KEY_METADATA and value.strip():
            return value.strip()
        if key == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def authenticate(context: grpc.ServicerContext, projects: ProjectDirectory) -> ProjectInfo:
    """The project whose secret key the call carries; aborts the call otherwise."""
    secret = secret_from_metadata(context)
    if secret is None:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "a secret key is required: metadata 'authorization: Bearer sk_...' "
            f"or '{SECRET_KEY_METADATA}'",
        )
    assert secret is not None
    try:
        project = projects.lookup_secret(secret)
        if project is None and projects.lookup(secret) is not None:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "a public key only sends events: use one of the project's secret keys",
            )
    except UNAVAILABLE_ERRORS:
        context.abort(grpc.StatusCode.UNAVAILABLE, _UNAVAILABLE)
    if project is None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked secret key")
    assert project is not None
    return project


def page_limit(requested: int, context: grpc.ServicerContext) -> int:
    """A listing's page size: 100 when not given, 1-1000 when given (INVALID_ARGUMENT else)."""
    limit = requested or 100
    if not 1 <= limit <= _MAX_PAGE:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 1-{_MAX_PAGE}")
    return limit


_Method = TypeVar("_Method", bound=Callable[..., Any])


def storage_errors_unavailable(method: _Method) -> _Method:
    """An admin RPC whose storage cannot answer now ends UNAVAILABLE ("retry later"), like
    ingestion, never UNKNOWN: for unary methods and server-streaming ones alike."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except UNAVAILABLE_ERRORS:
                context.abort(grpc.StatusCode.UNAVAILABLE, _UNAVAILABLE)

        return cast(_Method, streaming)

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except UNAVAILABLE_ERRORS:
            context.abort(grpc.StatusCode.UNAVAILABLE, _UNAVAILABLE)
            raise  # not reached: abort raises

    return cast(_Method, unary)


def _timestamp(value: datetime) -> Timestamp:
    if value.tzinfo is None:  # SQLite gives naive datetimes (UTC) back
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def dead_letter_message(letter: DeadLetter) -> project_pb2.DeadLetter:
    return project_pb2.DeadLetter(
        id=letter.id,
        received_at=_timestamp(letter.received_at),
        reason=letter.reason,
        violations=[
            ingest_pb2.FieldViolation(field=v.field, description=v.description)
            for v in deadletters.dead_letter_violations(letter)
        ],
        event_index=letter.event_index,
        event_json=letter.event,
        user_id=letter.user_id or "",
        origin=letter.origin or "",
        client_ip=letter.ip or "",
        user_agent=letter.user_agent or "",
        request_id=letter.request_id or "",
    )


def key_message(row: ProjectKey) -> project_pb2.ProjectKey:
    message = project_pb2.ProjectKey(
        id=row.id,
        kind=row.kind,
        key=project_store.shown_key(row),
        label=row.label,
        created_at=_timestamp(row.created_at),
    )
    if row.revoked_at is not None:
        message.revoked_at.CopyFrom(_timestamp(row.revoked_at))
    return message


def event_message(event: Event) -> project_pb2.StoredEvent:
    return project_pb2.StoredEvent(
        id=event.id,
        event_id=event.event_id,
        type=event.type,
        visitor_id=event.visitor_id or "",
        user_id=event.user_id or "",
        url=event.url,
        referrer=event.referrer or "",
        data=event.data,  # text as stored (models.JSONBText): numbers exact
        occurred_at=_timestamp(event.occurred_at),
        received_at=_timestamp(event.received_at),
        **_enrichment_fields(event),
    )


#: StoredEvent's string fields read from the event row as they are (NULL: empty).
_ENRICHED_TEXT = (
    "browser",
    "browser_version",
    "os",
    "device_class",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
    "referrer_host",
    "referrer_class",
    "country",
)


def _enrichment_fields(event: Event) -> dict[str, Any]:
    """The derived columns of migration 0008 as StoredEvent fields (NULL: unset or empty)."""
    fields: dict[str, Any] = {name: getattr(event, name) or "" for name in _ENRICHED_TEXT}
    if event.client_occurred_at is not None:
        fields["client_occurred_at"] = _timestamp(event.client_occurred_at)
    if event.clock_skew_ms is not None:
        fields["clock_skew_ms"] = event.clock_skew_ms
    if event.is_bot is not None:
        fields["is_bot"] = bool(event.is_bot)
    return fields


class ProjectServicer(project_pb2_grpc.ProjectServiceServicer):
    def __init__(
        self,
        projects: ProjectDirectory,
        session_factory: sessionmaker[Session],
        poll_interval: float = POLL_INTERVAL,
        max_tail_seconds: float = MAX_TAIL_SECONDS,
        max_tails: int = MAX_TAILS,
    ) -> None:
        self._projects = projects
        self._session_factory = session_factory
        self._poll_interval = poll_interval
        self._max_tail_seconds = max_tail_seconds
        self._tails = threading.BoundedSemaphore(max_tails)

    @storage_errors_unavailable
    def ListDeadLetters(
        self, request: project_pb2.ListDeadLettersRequest, context: grpc.ServicerContext
    ) -> project_pb2.ListDeadLettersResponse:
        project = authenticate(context, self._projects)
        limit = page_limit(request.limit, context)
        with self._session_factory() as session:
            letters = deadletters.list_dead_letters(session, project.id, limit, request.before_id)
            return project_pb2.ListDeadLettersResponse(
                dead_letters=[dead_letter_message(letter) for letter in letters]
            )

    @storage_errors_unavailable
    def ReplayDeadLetters(
        self, request: project_pb2.ReplayDeadLettersRequest, context: grpc.ServicerContext
    ) -> project_pb2.ReplayDeadLettersResponse:
        project = authenticate(context, self._projects)
        ids = _chosen(request.ids, request.all, context)
        result = deadletters.replay(self._session_factory, project.id, project.allowed_origins, ids)
        return project_pb2.ReplayDeadLettersResponse(
            replayed=result.replayed,
            failed=[dead_letter_message(letter) for letter in result.failed],
        )

    @storage_errors_unavailable
    def PurgeDeadLetters(
        self, request: project_pb2.PurgeDeadLettersRequest, context: grpc.ServicerContext
    ) -> project_pb2.PurgeDeadLettersResponse:
        project = authenticate(context, self._projects)
        ids = _chosen(request.ids, request.all, context)
        with self._session_factory.begin() as session:
            purged = deadletters.purge(session, project.id, ids)
        return project_pb2.PurgeDeadLettersResponse(purged=purged)

    @storage_errors_unavailable
    def TailEvents(
        self, request: project_pb2.TailEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[project_pb2.TailEventsResponse]:
        project = authenticate(context, self._projects)
        if not self._tails.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already serves {MAX_TAILS} tails; retry later",
            )
        try:
            yield from self._tail(project.id, request, context)
        finally:
            self._tails.release()

    @storage_errors_unavailable
    def GetProject(
        self, request: project_pb2.GetProjectRequest, context: grpc.ServicerContext
    ) -> project_pb2.GetProjectResponse:
        project = authenticate(context, self._projects)
        with self._session_factory() as session:
            row = session.get(Project, project.id)
            assert row is not None  # projects are never deleted
            return project_pb2.GetProjectResponse(
                id=row.id,
                name=row.name,
                allowed_origins=sorted(row.allowed_origins or ()),
                redact_params=sorted(row.redact_params or ()),
                rate_limit=row.rate_limit or "",
                public_keys=active_public_keys(session, row.id),
            )

    @storage_errors_unavailable
    def ListKeys(
        self, request: project_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> project_pb2.ListKeysResponse:
        project = authenticate(context, self._projects)
        with self._session_factory() as session:
            rows = project_store.list_keys(session, project.id)
            return project_pb2.ListKeysResponse(keys=[key_message(row) for row in rows])

    @storage_errors_unavailable
    def CreateKey(
        self, request: project_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> project_pb2.CreateKeyResponse:
        project = authenticate(context, self._projects)
        if request.kind not in (project_store.PUBLIC, project_store.SECRET):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'kind must be "public" or "secret"')
        label = request.label.strip() or "default"
        if len(label) > 200 or any(ord(ch) < 32 for ch in label):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "label: 1-200 characters, no control characters"
            )
        with self._session_factory.begin() as session:
            key = project_store.add_key(session, project.id, request.kind, label=label)
            row = project_store.find_key(session, project.id, key)
            assert row is not None
            return project_pb2.CreateKeyResponse(key=key, info=key_message(row))

    @storage_errors_unavailable
    def RevokeKey(
        self, request: project_pb2.RevokeKeyRequest, context: grpc.ServicerContext
    ) -> project_pb2.RevokeKeyResponse:
        project = authenticate(context, self._projects)
        with self._session_factory.begin() as session:
            row = session.get(ProjectKey, request.id) if request.id > 0 else None
            if row is None or row.project_id != project.id:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such key in this project")
            assert row is not None
            try:
                project_store.revoke_key_row(session, row, allow_last=request.allow_last)
            except project_store.LastKey as error:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{error}: create a new one first, or set allow_last",
                )
            session.flush()
            return project_pb2.RevokeKeyResponse(info=key_message(row))

    def _tail(
        self,
        project_id: int,
        request: project_pb2.TailEventsRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[project_pb2.TailEventsResponse]:
        limit = _MAX_LISTED if request.backlog_only else _MAX_BACKLOG
        backlog = max(0, min(request.backlog, limit))
        if request.backlog_only and backlog == 0:
            backlog = 100
        feeds = _feeds(request)
        with self._session_factory() as session:
            for feed in feeds:
                feed.start(session, project_id, backlog)
            if request.backlog_only:
                listed = [
                    item for feed in feeds for item in feed.listing(session, project_id, backlog)
                ]
                for _, item in sorted(listed, key=lambda pair: pair[0]):
                    yield item
                return
        ends = time.monotonic() + self._max_tail_seconds
        while context.is_active() and time.monotonic() < ends:
            items: list[tuple[datetime, project_pb2.TailEventsResponse]] = []
            try:
                with self._session_factory() as session:
                    for feed in feeds:
                        items.extend(feed.poll(session, project_id))
            except UNAVAILABLE_ERRORS as error:
                log.warning("tail: storage unavailable: %s", error.__class__.__name__)
            for _, item in sorted(items, key=lambda pair: pair[0]):
                yield item
            time.sleep(self._poll_interval)


def _feeds(request: project_pb2.TailEventsRequest) -> list[_Feed]:
    """The feeds a tail reads, with the request's filters as SQL conditions."""
    since: list[Any] = []
    if request.HasField("since"):
        moment = request.since.ToDatetime(tzinfo=UTC)
        since = [Event.received_at >= moment]
        letters_since = [DeadLetter.received_at >= moment]
    else:
        letters_since = []
    chosen = [
        *since,
        *([Event.type == request.type] if request.type else []),
        *([Event.visitor_id == request.visitor_id] if request.visitor_id else []),
        *([Event.user_id == request.user_id] if request.user_id else []),
    ]
    feeds = [_Feed(Event, Event.id, request.after_event_id, "event", chosen)]
    # Dead letters are refused requests, not events of a type or a person: a filter on those
    # leaves them out (the proto says so).
    if not (request.events_only or request.type or request.visitor_id or request.user_id):
        feeds.append(
            _Feed(
                DeadLetter,
                DeadLetter.id,
                request.after_dead_letter_id,
                "dead_letter",
                letters_since,
            )
        )
    return feeds


class _Feed:
    """New rows of one table for one project, each sent once (see the module's docstring).

    A row committed late has an id handed out after the rows inserted before it: above the
    cursor as it stood `_LATE_COMMIT_WINDOW` ago. So each poll reads the ids above that older
    cursor (an index range) and skips those already sent.
    """

    def __init__(
        self, table: Any, id_column: Any, after: int, kind: str, filters: list[Any] | None = None
    ) -> None:
        self.table = table
        self.id_column = id_column
        self.cursor = after
        self.kind = kind
        #: SQL conditions a row must meet (the request's filters).
        self.filters = filters or []
        #: Ids sent (or already there at the start) above the floor.
        self.seen: set[int] = set()
        #: (time.monotonic(), cursor) of past polls: the floor is the cursor of one window ago.
        self.history: deque[tuple[float, int]] = deque()

    def start(self, session: Session, project_id: int, backlog: int) -> None:
        if self.cursor <= 0:
            newest = session.scalars(
                select(self.id_column)
                .where(self.table.project_id == project_id, *self.filters)
                .order_by(self.id_column.desc())
                .offset(backlog)
                .limit(1)
            ).first()
            self.cursor = int(newest) if newest is not None else 0
        self.history.append((time.monotonic(), self.cursor))

    def listing(
        self, session: Session, project_id: int, limit: int
    ) -> list[tuple[datetime, project_pb2.TailEventsResponse]]:
        """At most `limit` committed rows after the cursor, once (`backlog_only`)."""
        rows = session.scalars(
            select(self.table)
            .where(self.table.project_id == project_id, self.id_column > self.cursor, *self.filters)
            .order_by(self.id_column)
            .limit(limit)
        ).all()
        return [self._item(row) for row in rows]

    def _item(self, row: Any) -> tuple[datetime, project_pb2.TailEventsResponse]:
        received = row.received_at
        if received.tzinfo is None:
            received = received.replace(tzinfo=UTC)
        if self.kind == "event":
            return received, project_pb2.TailEventsResponse(event=event_message(row))
        return received, project_pb2.TailEventsResponse(dead_letter=dead_letter_message(row))

    def poll(
        self, session: Session, project_id: int
    ) -> list[tuple[datetime, project_pb2.TailEventsResponse]]:
        now = time.monotonic()
        window = _LATE_COMMIT_WINDOW.total_seconds()
        while len(self.history) > 1 and self.history[1][0] <= now - window:
            self.history.popleft()
        floor = self.history[0][1]
        rows = session.scalars(
            select(self.table)
            .where(self.table.project_id == project_id, self.id_column > floor, *self.filters)
            .order_by(self.id_column)
            .limit(_BATCH)
        ).all()
        found = []
        for row in rows:
            if row.id in self.seen:
                continue
            self.seen.add(row.id)
            self.cursor = max(self.cursor, row.id)
            found.append(self._item(row))
        self.history.append((now, self.cursor))
        self.seen = {i for i in self.seen if i > floor}
        return found


def _chosen(ids: Any, every: bool, context: grpc.ServicerContext) -> list[int] | None:
    if every and ids:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give ids or all, not both")
    if not every and not ids:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give ids, or all")
    if len(ids) > _MAX_IDS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {_MAX_IDS} ids per call")
    return None if every else [int(i) for i in ids]
