"""Identity links: which user a visitor is, written in the transaction of the events showing it.

A link visitor -> user is recorded by an `identify` event (its visitor id and user id), an
`alias` event (its previous id and user id) and, so that a backend batch or a snippet after
identify needs nothing more, by any event carrying both a visitor id and a user id. Only rows
holding both ids cost anything: one upsert per group commit, one row per distinct link, and an
existing link is rewritten only when an event moves its first or last time.

One visitor, one user: a visitor seen with a second, different user keeps its first link; the
new one is recorded with `conflict` true and never merged (as PostHog refuses to merge persons
already identified). The view `events_with_user` (migration 0007) attributes a visitor's events
to its first non-conflicting link (lowest id); storage keeps links in key order, so within one
group the flag decides, not the id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, DateTime, bindparam, text
from sqlalchemy.orm import Session

from apex_ingest.server.validation import IDENTIFY, PREVIOUS_ID

Row = dict[str, Any]

LINK_COLUMNS = (
    ("project_id", "bigint"),
    ("visitor_id", "text"),
    ("user_id", "text"),
    ("source", "text"),
    ("first_seen", "timestamptz"),
    ("last_seen", "timestamptz"),
    ("conflict", "boolean"),
)


def links_of(rows: Sequence[Row]) -> list[Row]:
    """The links the rows show, one per (project, visitor, user), in key order.

    `conflict` is true here for a link whose visitor showed another user earlier in `rows`;
    the database adds the links already stored (see the upserts).
    """
    found: dict[tuple[int, str, str], Row] = {}
    owner: dict[tuple[int, str], str] = {}
    for row in rows:
        user = row.get("user_id")
        if not user:
            continue
        previous = row.get(PREVIOUS_ID)
        if previous:
            visitor, source = previous, "alias"
        elif row.get("visitor_id"):
            visitor = row["visitor_id"]
            source = "identify" if row["type"] == IDENTIFY else "event"
        else:
            continue
        project = row["project_id"]
        at = row["occurred_at"]
        link = found.get((project, visitor, user))
        if link is None:
            first = owner.setdefault((project, visitor), user)
            found[(project, visitor, user)] = {
                "project_id": project,
                "visitor_id": visitor,
                "user_id": user,
                "source": source,
                "first_seen": at,
                "last_seen": at,
                "conflict": first != user,
            }
        elif at < link["first_seen"]:
            link["first_seen"] = at
        elif at > link["last_seen"]:
            link["last_seen"] = at
    # Key order: two transactions upserting some of the same links wait for each other in one
    # direction only, never deadlock.
    return [found[key] for key in sorted(found)]


def event_columns_only(rows: Sequence[Row]) -> Sequence[Row]:
    """The rows without the keys that are not columns of `events` (an alias's previous id)."""
    if not any(PREVIOUS_ID in row for row in rows):
        return rows
    return [{k: v for k, v in row.items() if k != PREVIOUS_ID} for row in rows]


def _pg_links_sql(arrays: Sequence[str]) -> str:
    names = ", ".join(name for name, _ in LINK_COLUMNS)
    return (
        f"INSERT INTO identity_links AS l ({names}) "
        "SELECT i.project_id, i.visitor_id, i.user_id, i.source, i.first_seen, i.last_seen, "
        "i.conflict OR EXISTS (SELECT 1 FROM identity_links o WHERE o.project_id = i.project_id "
        "AND o.visitor_id = i.visitor_id AND o.user_id <> i.user_id) "
        f"FROM unnest({', '.join(arrays)}) AS i({names}) "
        "ON CONFLICT (project_id, visitor_id, user_id) DO UPDATE SET "
        "first_seen = LEAST(l.first_seen, EXCLUDED.first_seen), "
        "last_seen = GREATEST(l.last_seen, EXCLUDED.last_seen) "
        # Most events only confirm a link: no new row version for them.
        "WHERE EXCLUDED.first_seen < l.first_seen OR EXCLUDED.last_seen > l.last_seen"
    )


#: For the group-commit writer's own psycopg connection (arrays in binary: links are few per group).
PG_LINKS_DRIVER = _pg_links_sql([f"%b::{pg_type}[]" for _, pg_type in LINK_COLUMNS])
_PG_LINKS = text(_pg_links_sql([f"CAST(:{name} AS {pg_type}[])" for name, pg_type in LINK_COLUMNS]))

_SQLITE_LINKS = text(
    "INSERT INTO identity_links (project_id, visitor_id, user_id, source, first_seen, "
    "last_seen, conflict) "
    "SELECT :project_id, :visitor_id, :user_id, :source, :first_seen, :last_seen, "
    "(:conflict OR EXISTS (SELECT 1 FROM identity_links o WHERE o.project_id = :project_id "
    "AND o.visitor_id = :visitor_id AND o.user_id <> :user_id)) WHERE true "
    "ON CONFLICT (project_id, visitor_id, user_id) DO UPDATE SET "
    "first_seen = min(first_seen, excluded.first_seen), "
    "last_seen = max(last_seen, excluded.last_seen)"
).bindparams(
    # Bound as SQLAlchemy's DateTime stores them on SQLite, so min/max compare like with like.
    bindparam("first_seen", type_=DateTime(timezone=True)),
    bindparam("last_seen", type_=DateTime(timezone=True)),
)


def link_columns(links: Sequence[Row]) -> list[list[Any]]:
    """The links as one array per column, for PG_LINKS_DRIVER."""
    return [[link[name] for link in links] for name, _ in LINK_COLUMNS]


def upsert_links(connection: Connection | Session, links: Sequence[Row]) -> None:
    """Record `links` (links_of) in the caller's transaction."""
    if not links:
        return
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    if bind.dialect.name == "postgresql":
        connection.execute(
            _PG_LINKS, {name: [link[name] for link in links] for name, _ in LINK_COLUMNS}
        )
    else:
        # Row by row, each seeing the ones before: a group's first link of a visitor goes
        # first, or it would be flagged against the later one.
        connection.execute(_SQLITE_LINKS, sorted(links, key=lambda link: link["conflict"]))
