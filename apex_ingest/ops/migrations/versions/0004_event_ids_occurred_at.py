"""PostgreSQL: event_ids remembers the occurred_at of the event it stands for

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

`db retention` removes events by `occurred_at` (whole monthly partitions, rows of
`events_default`); it must forget exactly the ids of the events it removed, so that the id of a
removed event never makes a repeat of it look stored (answered 200, stored nowhere). Until now
ids were forgotten by `received_at`, which misses an event received recently with an old
timestamp. The new column is that stored event's `occurred_at`; the index that forgetting uses
moves from `received_at` to it.

Existing rows are filled from `events` (one UPDATE joining on (project_id, event_id): time it on
a restored backup of a large database); ids whose event is no longer stored are forgotten now,
as docs/deploy.md always said they were. The column stays nullable so that servers of the
previous release, which do not write it, keep working during a rolling upgrade; `db retention`
forgets such a row only once no event with its id is stored. SQLite: nothing changes (its
unique index on events is the dedup, and goes with the rows).
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE event_ids ADD COLUMN occurred_at timestamptz")
    op.execute(
        "UPDATE event_ids i SET occurred_at = e.occurred_at FROM events e "
        "WHERE e.project_id = i.project_id AND e.event_id = i.event_id"
    )
    op.execute("DELETE FROM event_ids WHERE occurred_at IS NULL")
    op.execute("CREATE INDEX ix_event_ids_occurred ON event_ids (occurred_at)")
    op.execute("DROP INDEX ix_event_ids_received")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE INDEX ix_event_ids_received ON event_ids (received_at)")
    op.execute("DROP INDEX ix_event_ids_occurred")
    op.execute("ALTER TABLE event_ids DROP COLUMN occurred_at")
