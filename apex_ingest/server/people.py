"""A person's data on request: deletion, suppression, export, and their audit record.

Shared by `apex-ingest people` (ops/people_cli.py) and PeopleService (people_service.py).

A person is named by user ids and/or visitor ids. A user id also reaches the visitors whose
FIRST identity link is to that user (the visitors `events_with_user` attributes to it): their
anonymous events (no user id, or this one) go with the user's. Their events with another user's
id stay: those are that other user's.

Deletion runs in small transactions (`BATCH` rows each) so that ingestion, which inserts other
rows, never waits long for it. Events stored while it runs may survive it: `suppress` first
stops them (within the suppression cache's time, APEX_PROJECT_CACHE_TTL).

Every request writes a `privacy_audit` row before it starts (so an interrupted one is on
record) and completes it with the row counts when done. The ids are kept as their SHA-256:
the audit proves what was asked without keeping the person's ids (suppressions must keep them).
A deletion's row also holds the linked visitors' SHA-256 (`linked`): in stream mode the loaders
read it to drop the person's events still in the stream (apex_ingest/server/privacy_filter.py),
and the links themselves are gone by then.

The transaction recording a deletion holds the project's people lock (`lock_project`)
exclusively; the loaders hold it shared from reading the deletions until their commit. So a
loader either commits before the deletion is recorded (the deletion then finds its rows) or
reads the deletion (and drops them): nothing lands between the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    column,
    delete,
    func,
    or_,
    select,
    table,
    text,
    tuple_,
)
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.common.limits import MAX_ID_CHARS
from apex_ingest.server.models import (
    DeadLetter,
    Event,
    IdentityLink,
    PrivacyAudit,
    Suppression,
)
from apex_ingest.server.storage import UNAVAILABLE_ERRORS
from apex_ingest.server.validation import PREVIOUS_ID
from apex_ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)

#: Rows deleted per transaction.
BATCH = 1000
#: Ids in one request, all kinds together (Segment's regulations take 5000 user ids per call).
MAX_IDS = 5000
#: Ids in one SQL `IN` list.
_CHUNK = 500
USER, VISITOR = "user", "visitor"
#: The key of `privacy_audit.ids` holding a deletion's linked visitors (SHA-256 too).
LINKED = "linked"
#: The first half of the people lock's PostgreSQL advisory key (the second is the project):
#: the two-int key space, apart from the migrations' one-bigint lock.
_LOCK_CLASS = 0x41504558  # "APEX"

_event_ids = table("event_ids", column("project_id"), column("event_id"))


class InvalidIds(ValueError):
    """Ids no request may hold (none, too many, too long, control characters)."""


@dataclass(frozen=True)
class Person:
    user_ids: tuple[str, ...] = ()
    visitor_ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, user_ids: Sequence[str], visitor_ids: Sequence[str]) -> Person:
        """The ids, stripped and without repeats; InvalidIds when they cannot name a person."""
        users = tuple(dict.fromkeys(u.strip() for u in user_ids if u.strip()))
        visitors = tuple(dict.fromkeys(v.strip() for v in visitor_ids if v.strip()))
        if not users and not visitors:
            raise InvalidIds("give at least one user id or visitor id")
        if len(users) + len(visitors) > MAX_IDS:
            raise InvalidIds(f"at most {MAX_IDS} ids per request")
        for value in (*users, *visitors):
            if len(value) > MAX_ID_CHARS or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
                raise InvalidIds(
                    f"an id is 1-{MAX_ID_CHARS} characters without control characters: {value!r}"
                )
        return cls(users, visitors)

    def hashed(self, linked: Sequence[str] | None = None) -> str:
        """The audit's `ids`; with `linked` (a deletion), the linked visitors' too."""
        ids = {
            USER: [sha256_hex(u) for u in self.user_ids],
            VISITOR: [sha256_hex(v) for v in self.visitor_ids],
        }
        if linked is not None:
            ids[LINKED] = [sha256_hex(v) for v in linked]
        return json.dumps(ids)


def sha256_hex(value: str) -> str:
    """How the audit keeps an id."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def lock_project(
    connection: Connection | Session, project_ids: Sequence[int], shared: bool
) -> None:
    """Hold the projects' people lock until the transaction ends (see the module); PostgreSQL
    only (SQLite's single writer already serializes a deletion and a loader's batch).

    In project order, so two holders of several never wait for each other in a cycle.
    """
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    if bind.dialect.name != "postgresql" or not project_ids:
        return
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    # The ids in order, a lock per row of the ordered subquery (no snapshot is read before).
    connection.execute(
        text(
            f"SELECT count({function}(:class, CAST(p % 2147483648 AS integer))) "
            "FROM (SELECT unnest(CAST(:projects AS bigint[])) AS p ORDER BY 1) AS ordered"
        ),
        {"class": _LOCK_CLASS, "projects": sorted(set(project_ids))},
    )


def _chunks(values: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), _CHUNK):
        yield list(values[start : start + _CHUNK])


def linked_visitors(session: Session, project_id: int, user_ids: Sequence[str]) -> list[str]:
    """The visitors whose first link (as `events_with_user` reads it) is to one of the users."""
    users = set(user_ids)
    candidates: set[str] = set()
    for chunk in _chunks(list(users)):
        candidates.update(
            session.scalars(
                select(IdentityLink.visitor_id).where(
                    IdentityLink.project_id == project_id, IdentityLink.user_id.in_(chunk)
                )
            )
        )
    found: list[str] = []
    for chunk in _chunks(sorted(candidates)):
        first: dict[str, str] = {}
        for visitor, user in session.execute(
            select(IdentityLink.visitor_id, IdentityLink.user_id)
            .where(IdentityLink.project_id == project_id, IdentityLink.visitor_id.in_(chunk))
            .order_by(IdentityLink.conflict, IdentityLink.id)
        ):
            first.setdefault(visitor, user)
        found.extend(v for v, u in first.items() if u in users)
    return sorted(found)


def _event_conditions(
    project_id: int, person: Person, linked: Sequence[str]
) -> list[ColumnElement[bool]]:
    """WHERE clauses, each for one chunk of ids, that together select the person's events."""
    conditions: list[ColumnElement[bool]] = []
    for chunk in _chunks(person.user_ids):
        conditions.append(and_(Event.project_id == project_id, Event.user_id.in_(chunk)))
    for chunk in _chunks(person.visitor_ids):
        conditions.append(and_(Event.project_id == project_id, Event.visitor_id.in_(chunk)))
    for chunk in _chunks(linked):
        anonymous_or_theirs: ColumnElement[bool] = Event.user_id.is_(None)
        if person.user_ids:
            anonymous_or_theirs = or_(anonymous_or_theirs, Event.user_id.in_(person.user_ids))
        conditions.append(
            and_(Event.project_id == project_id, Event.visitor_id.in_(chunk), anonymous_or_theirs)
        )
    return conditions


def _link_conditions(project_id: int, person: Person) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    for chunk in _chunks(person.user_ids):
        conditions.append(
            and_(IdentityLink.project_id == project_id, IdentityLink.user_id.in_(chunk))
        )
    for chunk in _chunks(person.visitor_ids):
        conditions.append(
            and_(IdentityLink.project_id == project_id, IdentityLink.visitor_id.in_(chunk))
        )
    return conditions


@dataclass
class Report:
    audit_id: int
    events: int = 0
    identity_links: int = 0
    dead_letters: int = 0
    suppressed: int = 0
    linked_visitors: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def as_counts(self) -> dict[str, int]:
        return {
            "events": self.events,
            "identity_links": self.identity_links,
            "dead_letters": self.dead_letters,
            "suppressed": self.suppressed,
            "linked_visitors": self.linked_visitors,
        }


def _start_audit(
    factory: sessionmaker[Session],
    project_id: int,
    action: str,
    person: Person,
    actor: str,
    via: str,
    suppress: bool = False,
) -> int:
    with factory.begin() as session:
        return _add_audit(session, project_id, action, person, actor, via, suppress)


def _add_audit(
    session: Session,
    project_id: int,
    action: str,
    person: Person,
    actor: str,
    via: str,
    suppress: bool = False,
    linked: Sequence[str] | None = None,
) -> int:
    row = PrivacyAudit(
        project_id=project_id,
        action=action,
        actor=actor[:200],
        via=via,
        requested_at=datetime.now(UTC),
        finished_at=None,
        ids=person.hashed(linked),
        counts="{}",
        suppress=suppress,
    )
    session.add(row)
    session.flush()
    return row.id


def _finish_audit(factory: sessionmaker[Session], audit_id: int, counts: dict[str, int]) -> None:
    with factory.begin() as session:
        row = session.get(PrivacyAudit, audit_id)
        assert row is not None
        row.counts = json.dumps(counts)
        row.finished_at = datetime.now(UTC)


def delete_person(
    factory: sessionmaker[Session],
    project_id: int,
    person: Person,
    *,
    suppress: bool = False,
    actor: str,
    via: str,
) -> Report:
    """Delete the person's events, identity links and dead letters (see the module)."""
    with factory.begin() as session:
        # Recorded under the people lock, the linked visitors with it: from its commit on, the
        # loaders drop the person's rows still in the stream (stream mode).
        lock_project(session, [project_id], shared=False)
        linked = linked_visitors(session, project_id, person.user_ids)
        audit_id = _add_audit(session, project_id, "delete", person, actor, via, suppress, linked)
    report = Report(audit_id)
    report.linked_visitors = len(linked)
    if suppress:
        # Before deleting: events arriving meanwhile are dropped, not left behind.
        report.suppressed = add_suppressions(
            factory, project_id, person.user_ids, [*person.visitor_ids, *linked], actor
        )
    for condition in _event_conditions(project_id, person, linked):
        report.events += _delete_events(factory, condition)
    for condition in _link_conditions(project_id, person):
        report.identity_links += _delete_batches(factory, IdentityLink, condition)
    report.dead_letters = _delete_dead_letters(factory, project_id, person, linked)
    _finish_audit(factory, report.audit_id, report.as_counts())
    log.info(
        "deleted a person's data",
        extra={"project_id": project_id, "audit_id": report.audit_id, **report.as_counts()},
    )
    return report


def _delete_events(factory: sessionmaker[Session], condition: ColumnElement[bool]) -> int:
    """Delete the events matching `condition`, BATCH per transaction; return how many.

    PostgreSQL: each event's once-only record (`event_ids`) goes with it, in the same
    statement (the ids are the client's and may say something about the person).
    """
    total = 0
    while True:
        with factory.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                doomed = (
                    select(Event.project_id, Event.id, Event.occurred_at)
                    .where(condition)
                    .limit(BATCH)
                    .cte("doomed")
                )
                gone = (
                    delete(Event)
                    .where(
                        tuple_(Event.project_id, Event.id, Event.occurred_at).in_(select(doomed))
                    )
                    .returning(Event.project_id, Event.event_id)
                    .cte("gone")
                )
                ids_gone = (
                    delete(_event_ids)
                    .where(
                        tuple_(_event_ids.c.project_id, _event_ids.c.event_id).in_(
                            select(gone.c.project_id, gone.c.event_id)
                        )
                    )
                    .returning(_event_ids.c.event_id)
                    .cte("ids_gone")
                )
                count = session.execute(
                    select(
                        select(func.count()).select_from(gone).scalar_subquery(),
                        select(func.count()).select_from(ids_gone).scalar_subquery(),
                    )
                ).one()[0]
            else:
                ids = select(Event.id).where(condition).limit(BATCH).scalar_subquery()
                result = session.execute(delete(Event).where(Event.id.in_(ids)))
                count = int(getattr(result, "rowcount", 0) or 0)
        total += int(count)
        if count < BATCH:
            return total


def _delete_batches(
    factory: sessionmaker[Session], model: Any, condition: ColumnElement[bool]
) -> int:
    total = 0
    while True:
        with factory.begin() as session:
            ids = list(session.scalars(select(model.id).where(condition).limit(BATCH)))
            if ids:
                session.execute(delete(model).where(model.id.in_(ids)))
        total += len(ids)
        if len(ids) < BATCH:
            return total


def _matching_dead_letters(
    session: Session, project_id: int, person: Person, linked: Sequence[str]
) -> list[int]:
    """Ids of the project's dead letters that belong to the person (their event JSON is read:
    dead letters are bounded per project, APEX_DEAD_LETTER_MAX_ROWS)."""
    users, visitors, linked_set = set(person.user_ids), set(person.visitor_ids), set(linked)
    found = []
    after = 0
    while True:
        letters = session.scalars(
            select(DeadLetter)
            .where(DeadLetter.project_id == project_id, DeadLetter.id > after)
            .order_by(DeadLetter.id)
            .limit(BATCH)
        ).all()
        for letter in letters:
            if _belongs(letter, users, visitors, linked_set):
                found.append(letter.id)
        if len(letters) < BATCH:
            return found
        after = letters[-1].id


def _belongs(letter: DeadLetter, users: set[str], visitors: set[str], linked: set[str]) -> bool:
    try:
        event = json.loads(letter.event)
    except ValueError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    user = event.get("user_id") or letter.user_id or None
    visitor = event.get("visitor_id") or None
    previous = event.get("previous_id") or None
    if user in users or visitor in visitors or previous in visitors:
        return True
    return visitor in linked and (user is None or user in users)


def _delete_dead_letters(
    factory: sessionmaker[Session], project_id: int, person: Person, linked: Sequence[str]
) -> int:
    with factory() as session:
        ids = _matching_dead_letters(session, project_id, person, linked)
    for start in range(0, len(ids), BATCH):
        with factory.begin() as session:
            session.execute(delete(DeadLetter).where(DeadLetter.id.in_(ids[start : start + BATCH])))
    return len(ids)


def add_suppressions(
    factory: sessionmaker[Session],
    project_id: int,
    user_ids: Sequence[str],
    visitor_ids: Sequence[str],
    actor: str,
) -> int:
    """Suppress the ids (those already suppressed stay as they are); return how many are new."""
    wanted = [(USER, u) for u in dict.fromkeys(user_ids)] + [
        (VISITOR, v) for v in dict.fromkeys(visitor_ids)
    ]
    added = 0
    now = datetime.now(UTC)
    with factory.begin() as session:
        for kind, value in wanted:
            exists = session.scalars(
                select(Suppression.id).where(
                    Suppression.project_id == project_id,
                    Suppression.kind == kind,
                    Suppression.value == value,
                )
            ).first()
            if exists is None:
                session.add(
                    Suppression(
                        project_id=project_id,
                        kind=kind,
                        value=value,
                        created_at=now,
                        actor=actor[:200],
                    )
                )
                added += 1
    return added


def lift_suppressions(
    factory: sessionmaker[Session], project_id: int, person: Person, *, actor: str, via: str
) -> int:
    """Lift the suppression of the ids; return how many were suppressed. Audited."""
    audit_id = _start_audit(factory, project_id, "unsuppress", person, actor, via)
    lifted = 0
    with factory.begin() as session:
        for kind, values in ((USER, person.user_ids), (VISITOR, person.visitor_ids)):
            for chunk in _chunks(values):
                result = session.execute(
                    delete(Suppression).where(
                        Suppression.project_id == project_id,
                        Suppression.kind == kind,
                        Suppression.value.in_(chunk),
                    )
                )
                lifted += int(getattr(result, "rowcount", 0) or 0)
    _finish_audit(factory, audit_id, {"lifted": lifted})
    return lifted


def list_suppressions(
    session: Session, project_id: int, limit: int = 100, after_id: int = 0
) -> Sequence[Suppression]:
    return session.scalars(
        select(Suppression)
        .where(Suppression.project_id == project_id, Suppression.id > after_id)
        .order_by(Suppression.id)
        .limit(limit)
    ).all()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite gives naive datetimes (UTC) back
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def export_person(
    factory: sessionmaker[Session], project_id: int, person: Person, *, actor: str, via: str
) -> Iterator[dict[str, Any]]:
    """The person's events, then identity links, as JSON-ready dicts (what delete_person would
    delete, dead letters aside). Audited when the export is complete."""
    audit_id = _start_audit(factory, project_id, "export", person, actor, via)
    counts = {"events": 0, "identity_links": 0}
    with factory() as session:
        linked = linked_visitors(session, project_id, person.user_ids)
    seen: set[int] = set()
    for condition in _event_conditions(project_id, person, linked):
        after = 0
        while True:
            with factory() as session:
                events = session.scalars(
                    select(Event).where(condition, Event.id > after).order_by(Event.id).limit(BATCH)
                ).all()
            for event in events:
                if event.id in seen:  # an event found by its user and by its visitor
                    continue
                seen.add(event.id)
                counts["events"] += 1
                yield _event_record(event)
            if len(events) < BATCH:
                break
            after = events[-1].id
    # Read before yielding: a slow reader of the export must not hold a transaction open (the
    # server ends transactions left idle past the statement timeout).
    with factory() as session:
        links = [
            link
            for condition in _link_conditions(project_id, person)
            for link in session.scalars(
                select(IdentityLink).where(condition).order_by(IdentityLink.id)
            )
        ]
    for link in links:
        counts["identity_links"] += 1
        yield {
            "record": "identity_link",
            "visitor_id": link.visitor_id,
            "user_id": link.user_id,
            "source": link.source,
            "first_seen": _iso(link.first_seen),
            "last_seen": _iso(link.last_seen),
            "conflict": bool(link.conflict),
        }
    _finish_audit(factory, audit_id, counts)


#: What an export holds of an event: every column but the surrogate id (README, "Export").
_EXPORTED_COLUMNS = tuple(column.key for column in Event.__table__.columns if column.key != "id")


def _event_record(event: Event) -> dict[str, Any]:
    record: dict[str, Any] = {"record": "event"}
    for name in _EXPORTED_COLUMNS:
        value = getattr(event, name)
        if isinstance(value, datetime):
            value = _iso(value)
        elif name == "data":
            value = orjson.Fragment(value)  # the stored text: its numbers exactly as stored
        record[name] = value
    return record


def export_line(record: Mapping[str, Any]) -> str:
    """One record of export_person as the JSON line written (CLI and PeopleService alike)."""
    return orjson.dumps(record).decode()


@dataclass(frozen=True)
class _Suppressed:
    users: frozenset[str]
    visitors: frozenset[str]


_NONE = _Suppressed(frozenset(), frozenset())


def of_suppressed_person(
    row: Mapping[str, Any], users: AbstractSet[str], visitors: AbstractSet[str]
) -> bool:
    """Whether a row is a suppressed person's: its user id is a suppressed user id, or its
    visitor id (or an alias's previous id) a suppressed visitor id. The one rule, applied at
    ingest (SuppressionDirectory: to rows, and to a request's events for its dead letters) and,
    in stream mode, at load (privacy_filter)."""
    return (
        row.get("user_id") in users
        or row.get("visitor_id") in visitors
        or row.get(PREVIOUS_ID) in visitors
    )


class SuppressionDirectory:
    """The suppressed ids of each project, cached for `ttl` seconds (APEX_PROJECT_CACHE_TTL,
    as keys): a new suppression or a lifted one takes effect within that time on every server.
    A project's whole list is read at once: it is small, and most projects have none.

    `stale_for` (stream mode, APEX_STREAM_KEY_GRACE, as ProjectDirectory's keys): while the
    database is unreachable, a list read at most `ttl + stale_for` seconds ago is used instead
    of the error, so ingestion goes on through an outage with the suppressions as they last
    were (a suppression made meanwhile waits for the database, and the loaders still honour
    it: apex_ingest/server/privacy_filter.py). A project never read, or read longer ago,
    is refused as before (UNAVAILABLE).
    """

    MAX_PROJECTS = 100_000

    def __init__(
        self, session_factory: sessionmaker[Session], ttl: float, stale_for: float = 0.0
    ) -> None:
        self._session_factory = session_factory
        self._ttl = ttl
        self._stale_for = stale_for
        #: project -> (time.monotonic() past which it is read again, the list, read at)
        self._cache: dict[int, tuple[float, _Suppressed, float]] = {}
        self._lock = threading.Lock()

    def _of(self, project_id: int) -> _Suppressed:
        now = time.monotonic()
        cached = self._cache.get(project_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        # The last list read is usable until then while the database is away (stream mode).
        stale: tuple[float, _Suppressed, float] | None = None
        if cached is not None and self._stale_for > 0:
            until = cached[2] + self._ttl + self._stale_for
            stale = (until, cached[1], cached[2]) if now <= until else None
        if stale is not None:
            # This request reads the list again; concurrent ones keep the last one meanwhile
            # (a database that hangs delays one request a second, not all of them).
            with self._lock:
                self._cache[project_id] = (min(now + 1.0, stale[0]), stale[1], stale[2])
        try:
            found = self._fetch(project_id)
        except UNAVAILABLE_ERRORS:
            if stale is None:
                raise
            # The last known list, through the outage; read again after a second at the
            # earliest, not one failing connection attempt per request.
            with self._lock:
                self._cache[project_id] = (
                    min(now + max(self._ttl, 1.0), stale[0]),
                    stale[1],
                    stale[2],
                )
            return stale[1]
        with self._lock:
            if len(self._cache) >= self.MAX_PROJECTS:
                self._cache.clear()
            self._cache[project_id] = (now + self._ttl, found, now)
        return found

    def _fetch(self, project_id: int) -> _Suppressed:
        users: set[str] = set()
        visitors: set[str] = set()
        with self._session_factory() as session:
            for kind, value in session.execute(
                select(Suppression.kind, Suppression.value).where(
                    Suppression.project_id == project_id
                )
            ):
                (users if kind == USER else visitors).add(value)
        return _Suppressed(frozenset(users), frozenset(visitors)) if users or visitors else _NONE

    def kept_indexes(
        self, project_id: int, request: ingest_pb2.IngestEventsRequest
    ) -> list[int] | None:
        """The indexes of the request's events of ids not suppressed; None: all of them.
        (A suppressed person's refused events are not kept as dead letters either.)"""
        suppressed = self._of(project_id)
        if suppressed is _NONE:
            return None
        users, visitors = suppressed.users, suppressed.visitors
        return [
            index
            for index, event in enumerate(request.events)
            if not of_suppressed_person(
                {
                    "user_id": event.user_id or request.user_id,
                    "visitor_id": event.visitor_id,
                    PREVIOUS_ID: event.previous_id,
                },
                users,
                visitors,
            )
        ]

    def drop_suppressed(
        self, project_id: int, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], int]:
        """The rows without those of suppressed ids, and how many were dropped."""
        suppressed = self._of(project_id)
        if suppressed is _NONE:
            return rows, 0
        users, visitors = suppressed.users, suppressed.visitors
        kept = [row for row in rows if not of_suppressed_person(row, users, visitors)]
        return kept, len(rows) - len(kept)
