"""The loaders' privacy filter (stream mode): deletions and suppressions made after an event
was published are honoured when it is loaded.

In stream mode a request is answered once it is in the stream; a loader writes it later. A
person deleted meanwhile (`people delete`, `DeletePerson`) must stay deleted, and a person
suppressed meanwhile must not come back. `honour_privacy` is a loader row filter
(apex_ingest/ops/loader.py, `ROW_FILTERS`): inside the loading transaction, before the insert,
it drops a row when

- one of its ids is suppressed now, as the servers judge it (people.SuppressionDirectory): its
  user id or visitor id, or an alias's previous id, is in `suppressions`; or
- a deletion requested at or after the row's receipt (`privacy_audit` action `delete`,
  `requested_at` >= the row's `received_at`) covers it, exactly as `people.delete_person`
  selects events: its user id is a deleted user, its visitor id a deleted visitor, or its
  visitor one of the deleted users' linked visitors (the audit's `linked`) and it carries no
  user id or a deleted one; or it is an alias whose previous id is a deleted visitor. (Stored,
  such an alias's event would outlive the deletion, which removes only its link; in the stream
  it is dropped whole, as a suppression drops it and as deletion removes its dead letters: it
  says who the deleted visitor became, and loading it would record the deleted link again.)

A deletion requested before the row was received is history the client saw: the row is new data
and is kept, as in direct mode.

One limit: the linked visitors are those linked in the database when the deletion was recorded.
A visitor identified as the user only by events still in the stream then (its identify not yet
loaded) is not among them: that identify is dropped (it carries the user), so the link is never
recorded, but the visitor's anonymous events in the stream are loaded, attributed to nobody.

The audit keeps ids as their SHA-256: the batch's ids are hashed only when a deletion is found,
which is rare.

Cost per batch: the people lock (PostgreSQL) and two indexed queries, whatever the batch's size:
the suppressions among the batch's ids, and the deletions of the batch's projects requested since
its oldest row's receipt.

The lock (people.lock_project, shared here, exclusive in the transaction recording a deletion)
closes the race between the two: without it a deletion recorded after this filter's read but
before the loader's commit would miss the rows being inserted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, text

from apex_ingest.server import metrics
from apex_ingest.server.models import PrivacyAudit, Suppression
from apex_ingest.server.people import (
    LINKED,
    USER,
    VISITOR,
    lock_project,
    of_suppressed_person,
    sha256_hex,
)
from apex_ingest.server.storage import Row
from apex_ingest.server.validation import PREVIOUS_ID

log = logging.getLogger(__name__)

#: Ids in one SQL `IN` list on SQLite (PostgreSQL takes one array).
_CHUNK = 500

_PG_SUPPRESSED = text(
    "SELECT project_id, kind, value FROM suppressions "
    # Every column of the unique index (project_id, kind, value): index lookups only.
    "WHERE project_id = ANY(CAST(:projects AS bigint[])) AND kind IN ('user', 'visitor') "
    "AND value = ANY(CAST(:ids AS text[]))"
)


@dataclass(frozen=True)
class _Deletion:
    project_id: int
    requested_at: datetime
    users: frozenset[str]
    visitors: frozenset[str]
    linked: frozenset[str]


def honour_privacy(connection: Connection, rows: list[Row]) -> list[Row]:
    """The rows to insert: without those of suppressed ids or deleted people (module doc)."""
    if not rows:
        return rows
    projects = sorted({int(row["project_id"]) for row in rows})
    lock_project(connection, projects, shared=True)
    ids = _ids_of(rows)
    suppressed = _suppressed(connection, projects, ids)
    received = [_utc(row.get("received_at")) for row in rows]
    deletions = _deletions(connection, projects, min(received))
    if not suppressed and not deletions:
        return rows
    hashes: dict[str, str] = {}

    def hashed(value: str) -> str:
        found = hashes.get(value)
        if found is None:
            found = hashes[value] = sha256_hex(value)
        return found

    kept: list[Row] = []
    dropped = {"suppressed": 0, "deleted": 0}
    for row, received_at in zip(rows, received, strict=True):
        project = int(row["project_id"])
        user, visitor = row.get("user_id"), row.get("visitor_id")
        previous = row.get(PREVIOUS_ID)
        if project in suppressed and of_suppressed_person(row, *suppressed[project]):
            dropped["suppressed"] += 1
            continue
        applying = [
            d for d in deletions if d.project_id == project and received_at <= d.requested_at
        ]
        if applying:
            user_hash = hashed(user) if user else None
            visitor_hash = hashed(visitor) if visitor else None
            previous_hash = hashed(previous) if previous else None
            if any(_deletes(d, user_hash, visitor_hash, previous_hash) for d in applying):
                dropped["deleted"] += 1
                continue
        kept.append(row)
    for reason, count in dropped.items():
        if count:
            metrics.LOADER_ROWS_DROPPED.labels(reason).inc(count)
    if len(kept) < len(rows):
        log.info("dropped %d rows of deleted or suppressed people", len(rows) - len(kept))
    return kept


def _deletes(
    deletion: _Deletion, user: str | None, visitor: str | None, previous: str | None
) -> bool:
    """Whether the deletion covers an event of these (hashed) ids: as people._event_conditions
    selects events, and an alias of a deleted visitor (the module's docstring)."""
    if user is not None and user in deletion.users:
        return True
    if previous is not None and previous in deletion.visitors:
        return True
    if visitor is None:
        return False
    return visitor in deletion.visitors or (visitor in deletion.linked and user is None)


def _ids_of(rows: Iterable[Row]) -> list[str]:
    ids: set[str] = set()
    for row in rows:
        for name in ("user_id", "visitor_id", PREVIOUS_ID):
            value = row.get(name)
            if value:
                ids.add(value)
    return sorted(ids)


def _suppressed(
    connection: Connection, projects: Sequence[int], ids: Sequence[str]
) -> dict[int, tuple[set[str], set[str]]]:
    """Per project, (suppressed user ids, suppressed visitor ids) among `ids`."""
    found: dict[int, tuple[set[str], set[str]]] = {}
    if not ids:
        return found
    if connection.dialect.name == "postgresql":
        rows: Iterable[Any] = connection.execute(
            _PG_SUPPRESSED, {"projects": list(projects), "ids": list(ids)}
        )
    else:
        rows = (
            row
            for start in range(0, len(ids), _CHUNK)
            for row in connection.execute(
                select(Suppression.project_id, Suppression.kind, Suppression.value).where(
                    Suppression.project_id.in_(projects),
                    Suppression.value.in_(list(ids[start : start + _CHUNK])),
                )
            )
        )
    for project_id, kind, value in rows:
        users, visitors = found.setdefault(int(project_id), (set(), set()))
        if kind == USER:
            users.add(str(value))
        elif kind == VISITOR:
            visitors.add(str(value))
    return found


def _deletions(connection: Connection, projects: Sequence[int], since: datetime) -> list[_Deletion]:
    """The deletions of `projects` requested at or after `since`."""
    found = []
    for project_id, requested_at, ids in connection.execute(
        select(PrivacyAudit.project_id, PrivacyAudit.requested_at, PrivacyAudit.ids).where(
            PrivacyAudit.project_id.in_(projects),
            PrivacyAudit.action == "delete",
            PrivacyAudit.requested_at >= since,
        )
    ):
        hashed = _parsed(ids)
        found.append(
            _Deletion(
                int(project_id),
                _utc(requested_at),
                frozenset(hashed.get(USER, ())),
                frozenset(hashed.get(VISITOR, ())),
                frozenset(hashed.get(LINKED, ())),
            )
        )
    return found


def _parsed(ids: str) -> dict[str, list[str]]:
    try:
        value: Any = json.loads(ids)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # Not ours to read: an audit row must never let a deleted person's events through
        # silently, so say so (the rows are kept: nothing here names them).
        log.error("unreadable privacy_audit ids: %r", ids[:200])
        return {}
    return {
        key: [str(v) for v in values] for key, values in value.items() if isinstance(values, list)
    }


def _utc(value: Any) -> datetime:
    """An aware UTC datetime (SQLite gives naive ones back, in UTC); a row without a receipt
    time counts as received long ago (every later deletion applies to it)."""
    if not isinstance(value, datetime):
        return datetime.min.replace(tzinfo=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
