"""PostgreSQL: events keeps only the indexes product queries use; no per-row FK check

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Gain, with storage.py's statement of the same change (no DISTINCT ON; bench/README.md, "Write
path"): PostgreSQL's CPU per stored row 1.4x less (38-41 -> 27-29 us), the once-only insert at
0.75-0.85 of a COPY into the schema of 0004 instead of 0.62-0.64 (medians of two runs).

What each remaining index serves:
- events_pkey (project_id, id, occurred_at), was (id, occurred_at): recent events of a project in
  arrival order, for the live debugger and `events tail`: WHERE project_id = :p [AND id < :cursor]
  ORDER BY id DESC LIMIT n (an index scan backward, merged across partitions). `id` stays unique
  (one sequence); occurred_at is in the key because a unique index of a partitioned table must
  hold the partition key.
- ix_events_project_occurred (project_id, occurred_at), unchanged: time ranges per project
  (analytics, retention checks; partitions are pruned by occurred_at first).
- ix_events_project_visitor (project_id, visitor_id, occurred_at) WHERE visitor_id IS NOT NULL and
  ix_events_project_user (project_id, user_id, occurred_at) WHERE user_id IS NOT NULL, were full:
  a person's events (identity stitching, deletion). Such queries always name the id, and
  `= :x` implies IS NOT NULL, so the planner uses the partial index (generic plans too); rows
  without that id (snippet events have no user_id, server batches often no visitor_id) no longer
  touch the index.
- event_ids: pk_event_ids (project_id, event_id) is the once-only guarantee;
  ix_event_ids_occurred (migration 0004) is how retention forgets ids with their events.

Dropped:
- The FK events.project_id -> projects (named events_project_id_fkey1 by 0002: found by lookup):
  a per-row check of what the server already checked (it resolves the project before it writes),
  and projects are never deleted, only revoked.
- ix_events_project_event (project_id, event_id): no query reads it (once-only lives in
  event_ids), and it was the most expensive index (random keys).

Ids in event_ids without occurred_at (written by servers of a release before 0004) are given
their event's occurred_at here first, while the index on (project_id, event_id) still exists.
Rows of that kind written after this migration (servers older than 0004 still running) are
forgotten by `db retention` only after a lookup of `events` by (project_id, event_id), which now
reads all of `events` (a hash anti join; nothing is read while no such row exists): finish
upgrading servers past 0004 before this migration.

Plain (not CONCURRENTLY) DDL in the migration's transaction, under its advisory lock: building
the primary key and the two partial indexes takes a SHARE lock on each partition, so inserts
wait for the builds (seconds per GB of events): time it on a restored backup, run it at a quiet
hour. Downgrade restores the schema of 0004 (FK, full indexes, old primary key,
ix_events_project_event). SQLite: nothing changes (its schema is small, single-machine, and keeps
its unique index as the dedup and its FK).
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_PERSON_INDEXES = (
    ("ix_events_project_visitor", "visitor_id"),
    ("ix_events_project_user", "user_id"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "UPDATE event_ids i SET occurred_at = e.occurred_at FROM events e "
        "WHERE i.occurred_at IS NULL AND e.project_id = i.project_id AND e.event_id = i.event_id"
    )
    # 0002 created the FK with a generated name (events_project_id_fkey1): drop it by what it is.
    op.execute(
        "DO $$ DECLARE c name; BEGIN "
        "FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'events'::regclass "
        "AND contype = 'f' AND confrelid = 'projects'::regclass LOOP "
        "EXECUTE format('ALTER TABLE events DROP CONSTRAINT %I', c); END LOOP; END $$"
    )
    op.execute("DROP INDEX ix_events_project_event")
    op.execute("ALTER TABLE events DROP CONSTRAINT events_pkey")
    op.execute(
        "ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (project_id, id, occurred_at)"
    )
    for name, column in _PERSON_INDEXES:
        op.execute(f"DROP INDEX {name}")
        op.execute(
            f"CREATE INDEX {name} ON events (project_id, {column}, occurred_at) "
            f"WHERE {column} IS NOT NULL"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, column in _PERSON_INDEXES:
        op.execute(f"DROP INDEX {name}")
        op.execute(f"CREATE INDEX {name} ON events (project_id, {column}, occurred_at)")
    op.execute("ALTER TABLE events DROP CONSTRAINT events_pkey")
    op.execute("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id, occurred_at)")
    op.execute("CREATE INDEX ix_events_project_event ON events (project_id, event_id)")
    op.execute(
        "ALTER TABLE events ADD CONSTRAINT events_project_id_fkey1 "
        "FOREIGN KEY (project_id) REFERENCES projects (id)"
    )
