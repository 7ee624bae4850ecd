"""Dead letters: the events of requests refused for their content, kept with their reasons.

A request with a known key refused with INVALID_ARGUMENT (a rule broken) or PERMISSION_DENIED
(its origin) stores no event; its events are recorded here instead, so that the project's owner
can see why (the debugger, `apex-ingest dead-letters list`) and replay them after fixing the
cause. Requests with unknown keys are never recorded (counted in metrics only): the public
internet cannot write here without a key.

Recording never slows the answer nor changes it: the servicer hands the refused request to
`DeadLetterRecorder.record`, which only puts it in a bounded queue (dropping it, counted, when
full); a writer thread builds the rows and writes them in transactions of its own, then applies
the caps (per project: APEX_DEAD_LETTER_MAX_ROWS rows and APEX_DEAD_LETTER_MAX_AGE_DAYS days;
APEX_DEAD_LETTER_MAX_TOTAL_ROWS in all; the oldest go first). A failed write is logged and
counted, nothing more.

What is stored of an event is scrubbed as events are (`scrub_event`, `scrub_ip`): the IP as
events store it (reduced or dropped as the project's `ip_mode` says), the User-Agent without
control characters and cut to 1024 characters, and each event capped at MAX_EVENT_BYTES of JSON.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.common.limits import MAX_EVENTS
from apex_ingest.server import metrics
from apex_ingest.server.enrichment import scrub_ip
from apex_ingest.server.errors import FieldViolation, InvalidRequest, OriginNotAllowed
from apex_ingest.server.models import DeadLetter, Project
from apex_ingest.server.projects import ProjectInfo
from apex_ingest.server.redaction import redact_url
from apex_ingest.server.storage import UNAVAILABLE_ERRORS, insert_events
from apex_ingest.server.validation import (
    build_rows,
    check_request_shape,
    clean_user_agent,
    normalized_ip,
)
from apex_ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)

#: An event kept as a dead letter is at most this many bytes of JSON; a bigger one keeps only
#: its identifying fields (cut) and cannot be replayed.
MAX_EVENT_BYTES = 8 * 1024
#: Refused requests written in one transaction by the writer.
_BATCH_REQUESTS = 64
#: Seconds between two passes of the age and total caps (the per-project row cap is applied
#: after every write).
_PRUNE_INTERVAL = 30.0
#: Stream mode: seconds between two tries of a dead-letter write while the database is down.
_OUTAGE_RETRY_SECONDS = 1.0

INVALID_ARGUMENT = "invalid_argument"
PERMISSION_DENIED = "permission_denied"


def scrub_event(
    event: dict[str, Any], redact_params: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The event as a dead letter keeps it: only what an event would keep.

    THE HOOK for every scrubbing rule that applies to stored events: whatever the server never
    stores in an event must be applied here too, with the same function `validation.build_rows`
    calls (CONTRACT.md section 4): the values of secret query parameters in `url` and
    `referrer` (the built-in names and the project's own) are `[redacted]`. The request's IP,
    which dead letters keep once per row beside the event, goes through `scrub_ip` (the
    project's `ip_mode`) in `rows_for`, the same function events' rows use.
    """
    for name in ("url", "referrer"):
        if isinstance(event.get(name), str) and event[name]:
            event[name] = redact_url(event[name], redact_params)
    return event


def event_as_received(event: ingest_pb2.Event) -> dict[str, Any]:
    """The fields of an event as the client sent them (proto field names)."""
    record: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "visitor_id": event.visitor_id,
        "url": event.url,
        "referrer": event.referrer,
        "data": event.data,
    }
    # Only when set: older records, and events without them, keep their exact shape.
    if event.user_id:
        record["user_id"] = event.user_id
    if event.previous_id:
        record["previous_id"] = event.previous_id
    if event.HasField("timestamp"):
        record["timestamp"] = {"seconds": event.timestamp.seconds, "nanos": event.timestamp.nanos}
    return record


def capped_json(record: dict[str, Any]) -> str:
    """`record` as JSON text of at most MAX_EVENT_BYTES bytes (UTF-8)."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8", "surrogatepass"))
    if size <= MAX_EVENT_BYTES:
        return text
    small = {
        "truncated": True,
        **({"incomplete": True} if record.get("incomplete") else {}),
        "bytes": size,
        **{
            name: str(record.get(name, ""))[:limit]
            for name, limit in (("id", 64), ("type", 100), ("visitor_id", 128), ("url", 1024))
        },
    }
    return json.dumps(small, ensure_ascii=False, separators=(",", ":"))


def event_from_record(text: str) -> ingest_pb2.Event | None:
    """The event a dead letter holds, or None if it was not kept whole (too big, or refused by
    the gateway with fields it could not read: `incomplete`)."""
    record = json.loads(text)
    if record.get("truncated"):  # also set on incomplete ones
        return None
    event = ingest_pb2.Event(
        id=record.get("id", ""),
        type=record.get("type", ""),
        visitor_id=record.get("visitor_id", ""),
        url=record.get("url", ""),
        referrer=record.get("referrer", ""),
        data=record.get("data", ""),
        user_id=record.get("user_id", ""),
        previous_id=record.get("previous_id", ""),
    )
    timestamp = record.get("timestamp")
    if timestamp is not None:
        event.timestamp.seconds = timestamp["seconds"]
        event.timestamp.nanos = timestamp["nanos"]
    return event


def per_event_violations(
    violations: Sequence[FieldViolation], events: int
) -> tuple[list[FieldViolation], dict[int, list[FieldViolation]]]:
    """The violations of the request as a whole, and each event's own (by index)."""
    whole: list[FieldViolation] = []
    by_event: dict[int, list[FieldViolation]] = {}
    for violation in violations:
        index = event_index(violation.field, events)
        if index is None:
            whole.append(violation)
        else:
            by_event.setdefault(index, []).append(violation)
    return whole, by_event


def event_index(field: str, events: int | None = None) -> int | None:
    """2 for "events[2].url"; None for a field of the request itself, and (given the request's
    number of `events`) for one naming no event of it, which counts as the request's."""
    if not field.startswith("events["):
        return None
    digits, bracket, _ = field[len("events[") :].partition("]")
    if not (bracket and digits.isdigit()):
        return None
    index = int(digits)
    return None if events is not None and index >= events else index


def rows_for(
    project_id: int,
    request: ingest_pb2.IngestEventsRequest,
    error: InvalidRequest | OriginNotAllowed,
    received_at: datetime,
    only: Iterable[int] | None = None,
    redact_params: frozenset[str] = frozenset(),
    ip_mode: str = "full",
    incomplete: Collection[int] = (),
) -> list[dict[str, Any]]:
    """The dead-letter rows of a refused request (of its events `only`, if given); the IP is
    kept as the project's `ip_mode` says, as in its events. `incomplete`: the indexes of events
    with fields the gateway could not read, which arrived empty (RecordRefused): such an event
    is marked, and never replayed (also "truncated", which servers older than the mark refuse
    to replay too)."""
    events = request.events[:MAX_EVENTS]
    whole, by_event = per_event_violations(error.violations, len(events))
    if isinstance(error, OriginNotAllowed):
        reason = PERMISSION_DENIED
        whole = [FieldViolation("context.origin", "is not allowed for this project"), *whole]
    else:
        reason = INVALID_ARGUMENT
    context = request.context
    shared = {
        "project_id": project_id,
        "received_at": received_at,
        "reason": reason,
        # Refused values may hold anything; PostgreSQL's text holds no NUL.
        "origin": context.origin.replace("\x00", "")[:4096] or None,
        "ip": scrub_ip(normalized_ip(context.client_ip), ip_mode),
        "user_agent": clean_user_agent(context.user_agent),
        "request_id": context.request_id.replace("\x00", "")[:128] or None,
    }
    indexes = range(len(events)) if only is None else only
    rows = []
    for index in indexes:
        own = by_event.get(index, []) + whole
        received = scrub_event(event_as_received(events[index]), redact_params)
        if index in incomplete:
            received["incomplete"] = received["truncated"] = True
        rows.append(
            {
                **shared,
                # The event's own user (the SDK's batches carry one per event), else the batch's.
                "user_id": (events[index].user_id or request.user_id).replace("\x00", "")[:128]
                or None,
                "event_index": index,
                "violations": json.dumps(
                    [{"field": v.field, "description": v.description} for v in own],
                    ensure_ascii=False,
                ),
                "event": capped_json(received),
            }
        )
    return rows


@dataclass(frozen=True, slots=True)
class _Refused:
    project_id: int
    project_label: str
    request: ingest_pb2.IngestEventsRequest
    error: InvalidRequest | OriginNotAllowed
    received_at: datetime
    only: tuple[int, ...] | None
    redact_params: frozenset[str] = frozenset()
    ip_mode: str = "full"
    incomplete: tuple[int, ...] = ()


class DeadLetterRecorder:
    """Records refused requests' events in `dead_letters`, off the request's path."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        max_rows: int = 10_000,
        max_age_days: float = 7.0,
        max_total_rows: int = 1_000_000,
        queue_size: int = 1000,
        wait_out_outages: bool = False,
    ) -> None:
        """`wait_out_outages` (stream mode, where ingestion goes on while the database is
        down): a write that fails because the database is unreachable is tried again every
        second until it succeeds, instead of being dropped; meanwhile new refusals queue up to
        `queue_size` (beyond it they are dropped and counted, as always)."""
        self._session_factory = session_factory
        self._wait_out_outages = wait_out_outages
        self._max_rows = max_rows
        self._max_age = timedelta(days=max_age_days)
        self._max_total = max_total_rows
        self._queue: queue.Queue[_Refused] = queue.Queue(queue_size)
        # One project may hold at most this many queued requests: a flood from one key never
        # takes the room of the others'.
        self._per_project = max(1, queue_size // 8)
        self._queued: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._last_prune = 0.0
        self._idle = threading.Condition(self._lock)
        self._busy = 0

    def record(
        self,
        project_id: int,
        project_label: str,
        request: ingest_pb2.IngestEventsRequest,
        error: InvalidRequest | OriginNotAllowed,
        only: Sequence[int] | None = None,
        redact_params: frozenset[str] = frozenset(),
        ip_mode: str = "full",
        incomplete: Collection[int] = (),
    ) -> bool:
        """Queue the request's events (those at `only`, if given); False if dropped. Never
        blocks, never raises. `ip_mode`: the project's; the IP is scrubbed when the row is
        built, off the request's path (the full IP only waits in memory meanwhile).
        `incomplete`: see `rows_for`."""
        try:
            events = min(len(request.events), MAX_EVENTS) if only is None else len(only)
            if self._max_rows == 0 or self._max_total == 0 or events == 0:
                return False
            item = _Refused(
                project_id,
                project_label,
                request,
                error,
                datetime.now(UTC),
                None if only is None else tuple(only),
                redact_params,
                ip_mode,
                tuple(incomplete),
            )
            with self._lock:
                if self._queued[project_id] >= self._per_project:
                    metrics.DEAD_LETTERS_DROPPED.labels("queue_full").inc(events)
                    return False
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    metrics.DEAD_LETTERS_DROPPED.labels("queue_full").inc(events)
                    return False
                self._queued[project_id] += 1
                self._busy += 1
                if self._writer is None or not self._writer.is_alive():
                    # Started on first use, so a forked child gets its own writer.
                    self._writer = threading.Thread(
                        target=self._write_forever, name="dead-letters", daemon=True
                    )
                    self._writer.start()
            return True
        except Exception:  # never the caller's problem
            log.exception("could not queue dead letters")
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued is written (for tests and a graceful stop)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH_REQUESTS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write_each(batch)
            finally:
                with self._idle:
                    for item in batch:
                        self._queued[item.project_id] -= 1
                        if self._queued[item.project_id] <= 0:
                            del self._queued[item.project_id]
                    self._busy -= len(batch)
                    self._idle.notify_all()

    def _write_each(self, batch: list[_Refused]) -> None:
        """Write the batch; if it fails, each request alone (one bad row loses only its own)."""
        try:
            self._write(batch)
            return
        except UNAVAILABLE_ERRORS as error:
            if not self._wait_out_outages:
                if len(batch) == 1:
                    log.warning("could not record dead letters: %r", error)
                    metrics.DEAD_LETTERS_DROPPED.labels("write_failed").inc(_count(batch[0]))
                    return
            else:
                log.warning("database unavailable; dead letters wait: %r", error)
                while True:
                    time.sleep(_OUTAGE_RETRY_SECONDS)
                    try:
                        self._write(batch)
                        return
                    except UNAVAILABLE_ERRORS:
                        continue
                    except Exception:
                        break  # not an outage: each request alone, as below
        except Exception:
            if len(batch) == 1:
                log.exception("could not record dead letters")
                metrics.DEAD_LETTERS_DROPPED.labels("write_failed").inc(_count(batch[0]))
                return
        for item in batch:
            self._write_each([item])

    def _write(self, batch: list[_Refused]) -> None:
        rows = []
        counts = []
        for item in batch:
            written = rows_for(
                item.project_id,
                item.request,
                item.error,
                item.received_at,
                item.only,
                item.redact_params,
                item.ip_mode,
                item.incomplete,
            )
            counts.append((item.project_label, len(written)))
            rows.extend(written)
        projects = {item.project_id for item in batch}
        with self._session_factory.begin() as session:
            session.execute(insert(DeadLetter), rows)
            for project_id in projects:
                prune_project(session, project_id, self._max_rows)
            now = time.monotonic()
            if now - self._last_prune >= _PRUNE_INTERVAL:
                self._last_prune = now
                prune(session, datetime.now(UTC) - self._max_age, self._max_total)
        for label, count in counts:
            metrics.DEAD_LETTERS_RECORDED.labels(label).inc(count)


def _count(item: _Refused) -> int:
    return len(item.only) if item.only is not None else min(len(item.request.events), MAX_EVENTS)


def prune_project(session: Session, project_id: int, max_rows: int) -> None:
    """Keep the newest `max_rows` dead letters of a project."""
    boundary = session.scalars(
        select(DeadLetter.id)
        .where(DeadLetter.project_id == project_id)
        .order_by(DeadLetter.id.desc())
        .offset(max_rows)
        .limit(1)
    ).first()
    if boundary is not None:
        session.execute(
            delete(DeadLetter).where(DeadLetter.project_id == project_id, DeadLetter.id <= boundary)
        )


def prune(session: Session, older_than: datetime, max_total: int) -> None:
    """Drop dead letters received before `older_than`, and the oldest beyond `max_total`."""
    session.execute(delete(DeadLetter).where(DeadLetter.received_at < older_than))
    boundary = session.scalars(
        select(DeadLetter.id).order_by(DeadLetter.id.desc()).offset(max_total).limit(1)
    ).first()
    if boundary is not None:
        session.execute(delete(DeadLetter).where(DeadLetter.id <= boundary))


# --- reading, replaying, purging (the CLI and ProjectService) ----------------------------

#: Dead letters replayed in one transaction.
_REPLAY_CHUNK = 500


def list_dead_letters(
    session: Session, project_id: int, limit: int = 100, before_id: int = 0
) -> list[DeadLetter]:
    """The project's dead letters, newest first."""
    query = select(DeadLetter).where(DeadLetter.project_id == project_id)
    if before_id > 0:
        query = query.where(DeadLetter.id < before_id)
    return list(session.scalars(query.order_by(DeadLetter.id.desc()).limit(limit)))


def dead_letter_violations(letter: DeadLetter) -> list[FieldViolation]:
    return [FieldViolation(v["field"], v["description"]) for v in json.loads(letter.violations)]


@dataclass(frozen=True)
class ReplayResult:
    #: Dead letters stored as events (and deleted).
    replayed: int
    #: Those refused again (they stay, with their new violations).
    failed: list[DeadLetter]


def replay(
    session_factory: sessionmaker[Session],
    project_id: int,
    allowed_origins: frozenset[str],
    ids: Sequence[int] | None = None,
) -> ReplayResult:
    """Submit dead letters again through validation and storage (`ids`, or all of them).

    Each is checked as the request it came in would be today (the project's allowlist for its
    origin, every rule for its event and user id) with its original time of receipt; those that
    pass are inserted as events (insert-or-ignore on the event id, so a replay never stores an
    event twice) and deleted from the dead letters in the same transaction.
    """
    with session_factory() as session:
        stored = session.get(Project, project_id)
        ip_mode = stored.ip_mode if stored is not None else "full"
    # The IP mode of today: a project that keeps less now than when the letter was written
    # stores only what it keeps now.
    project = ProjectInfo(project_id, allowed_origins, ip_mode=ip_mode or "full")
    replayed = 0
    failed: list[DeadLetter] = []
    last_id = 0
    while True:
        with session_factory.begin() as session:
            query = select(DeadLetter).where(
                DeadLetter.project_id == project_id, DeadLetter.id > last_id
            )
            if ids is not None:
                query = query.where(DeadLetter.id.in_(list(ids)))
            letters = list(session.scalars(query.order_by(DeadLetter.id).limit(_REPLAY_CHUNK)))
            if not letters:
                break
            last_id = letters[-1].id
            rows: list[dict[str, Any]] = []
            done = []
            again = []
            for letter in letters:
                violations = _replay_violations(letter, project, rows)
                if violations:
                    letter.violations = json.dumps(
                        [{"field": v.field, "description": v.description} for v in violations],
                        ensure_ascii=False,
                    )
                    again.append(letter)
                else:
                    done.append(letter.id)
            if rows:
                for row in rows:
                    row["project_id"] = project_id
                insert_events(session, rows)
            if done:
                session.execute(delete(DeadLetter).where(DeadLetter.id.in_(done)))
            replayed += len(done)
            session.flush()
            for letter in again:
                session.expunge(letter)  # kept readable after the commit
            failed.extend(again)
        if ids is not None and len(letters) < _REPLAY_CHUNK:
            break
    return ReplayResult(replayed, failed)


def _replay_violations(
    letter: DeadLetter, project: ProjectInfo, rows: list[dict[str, Any]]
) -> list[FieldViolation]:
    """Why `letter` is refused again (empty: its row was appended to `rows`)."""
    event = event_from_record(letter.event)
    if event is None:
        if json.loads(letter.event).get("incomplete"):
            # Refused by the gateway for fields it could not read: they were never kept, so
            # the event stays refused for what it was.
            return dead_letter_violations(letter)
        return [FieldViolation("event", f"was over {MAX_EVENT_BYTES} bytes: not kept whole")]
    if letter.origin and not project.allows_origin(letter.origin):
        return [FieldViolation("context.origin", "is not allowed for this project")]
    request = ingest_pb2.IngestEventsRequest(
        project_key="replay",
        user_id=letter.user_id or "",
        events=[event],
        context=ingest_pb2.RequestContext(
            client_ip=letter.ip or "", user_agent=letter.user_agent or ""
        ),
    )
    violations = check_request_shape(request)
    received_at = letter.received_at
    if received_at.tzinfo is None:  # SQLite gives naive datetimes back
        received_at = received_at.replace(tzinfo=UTC)
    built = build_rows(request, received_at, violations, ip_mode=project.ip_mode)
    if violations:
        return [
            FieldViolation(
                v.field.replace("events[0]", f"events[{letter.event_index}]"), v.description
            )
            for v in violations
        ]
    rows.extend(built)
    return []


def purge(session: Session, project_id: int, ids: Sequence[int] | None = None) -> int:
    """Delete the project's dead letters (`ids`, or all); return how many."""
    statement = delete(DeadLetter).where(DeadLetter.project_id == project_id)
    if ids is not None:
        statement = statement.where(DeadLetter.id.in_(list(ids)))
    result = session.execute(statement)
    return int(getattr(result, "rowcount", 0) or 0)
