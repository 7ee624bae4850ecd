"""Cookieless visitors (issue #19, item 7): visitor ids the server derives, as Plausible and
Umami count visitors without cookies.

A project with `projects.cookieless` accepts snippet events without `visitorId` (the request's
`derive_visitor_id`, which the gateway sets for the snippet format). Such an event's visitor is

    "cl_" + hex(BLAKE2b-128(key = the salt of the UTC day of receipt,
                            message = project id, client IP, User-Agent))

so the same browser on the same network is one visitor for the day, and nothing in the browser
is needed. The salt is 32 random bytes per UTC day, kept in `visitor_salts` so that every server
process derives the same id: the first process that needs a day's salt inserts it (insert or
ignore on the day, then read: concurrent creators all read the first row) and deletes the rows
older than yesterday. Yesterday's salt is kept one more day because a request received at
23:59:59.9 may reach the database after midnight: its id is still that of its own day. Once
a salt is deleted, nobody (us included) can tell which IP and User-Agent an id of that day
stood for, nor link a visitor's ids of two days.

The id must be derived from the client's full IP, before a project's IP mode truncates or
drops it: `assign_cookieless_visitors` reads the request's context, never the rows' `ip`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server.models import VisitorSalt
from apex_ingest.server.validation import normalized_ip
from apex_ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)

#: Every derived visitor id starts with it, so readers can tell them from the browser's own.
VISITOR_PREFIX = "cl_"
SALT_BYTES = 32
_ONE_DAY = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC)


class VisitorSalts:
    """The daily salts, read from (or created in) the database once per process and day.

    `clock` (UTC) decides which salts are old enough to delete; tests inject one.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], clock: Callable[[], datetime] = _now
    ) -> None:
        self._sessions = session_factory
        self._clock = clock
        self._cache: dict[date, bytes] = {}
        # One database round trip per process and day, not one per request arriving at midnight.
        self._lock = threading.Lock()

    def salt(self, day: date) -> bytes:
        """The salt of a UTC day, created if this is the first use of that day anywhere."""
        cached = self._cache.get(day)  # the hot path: a dict lookup, no clock, no lock
        if cached is not None:
            return cached
        now = self._clock()
        oldest = now.date() - _ONE_DAY
        if day < oldest:
            # That day's salt is (or must be) deleted: a salt of its own that nobody keeps, so
            # the deleted one's ids can never be recomputed (only a request that waited a day).
            return secrets.token_bytes(SALT_BYTES)
        with self._lock:
            cached = self._cache.get(day)
            if cached is None:
                cached = self._load_or_create(day, now, oldest)
                kept = {d: s for d, s in self._cache.items() if d >= oldest}
                kept[day] = cached
                self._cache = kept
            return cached

    def _load_or_create(self, day: date, now: datetime, oldest: date) -> bytes:
        with self._sessions.begin() as session:
            values = {"day": day, "salt": secrets.token_hex(SALT_BYTES), "created_at": now}
            statement: Any
            if session.get_bind().dialect.name == "postgresql":
                statement = postgresql.insert(VisitorSalt).values(values)
            else:
                statement = sqlite.insert(VisitorSalt).values(values)
            created = session.execute(statement.on_conflict_do_nothing(index_elements=["day"]))
            deleted = session.execute(delete(VisitorSalt).where(VisitorSalt.day < oldest))
            stored = session.scalars(select(VisitorSalt.salt).where(VisitorSalt.day == day)).one()
        if getattr(created, "rowcount", 0) == 1:
            log.info(
                "created the cookieless visitor salt of %s (%d older deleted)",
                day,
                getattr(deleted, "rowcount", 0),
            )
        return bytes.fromhex(stored)


def derive_visitor_id(salt: bytes, project_id: int, client_ip: str, user_agent: str) -> str:
    """The cookieless visitor id: "cl_" and 32 hex characters (128 bits of BLAKE2b keyed with
    the day's salt). The User-Agent comes last, so no separator inside it can shift a field."""
    message = f"{project_id}\n{client_ip}\n{user_agent}".encode("utf-8", "surrogatepass")
    return VISITOR_PREFIX + hashlib.blake2b(message, key=salt, digest_size=16).hexdigest()


def assign_cookieless_visitors(
    rows: list[dict[str, Any]],
    project_id: int,
    context: ingest_pb2.RequestContext,
    received_at: datetime,
    salts: VisitorSalts,
) -> None:
    """Give each row without a visitor id the request's cookieless visitor id, in place.

    Reads the client's full IP from `context`: call it before (or independently of) anything
    that truncates or drops the IP. A request with neither an IP nor a User-Agent (an internal
    caller without context) leaves its rows without a visitor: one id for every such caller
    would count them as one visitor.
    """
    if all(row["visitor_id"] is not None for row in rows):
        return
    client_ip = normalized_ip(context.client_ip) or ""
    if not client_ip and not context.user_agent:
        return
    day = received_at.astimezone(UTC).date()
    visitor = derive_visitor_id(salts.salt(day), project_id, client_ip, context.user_agent)
    for row in rows:
        if row["visitor_id"] is None:
            row["visitor_id"] = visitor
