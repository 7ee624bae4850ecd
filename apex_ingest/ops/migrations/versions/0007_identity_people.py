"""identity_links, view events_with_user, suppressions, privacy_audit

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`identity_links`: visitor -> user, written with the events that show it (identify, alias, or
any event carrying both ids). A visitor is attributed to its FIRST link (lowest id); a later
link of the same visitor to another user is kept with `conflict` true and not merged.

`events_with_user`: every column of `events`, plus `resolved_user_id`: the event's own
`user_id`, else the user of its visitor's first link (so a visitor's anonymous events before
an identify are attributed without rewriting `events`). Links are recorded from this version
on: events stored before it keep their own `user_id` only.

For later migrations touching `events`: adding a nullable column (`op.add_column`) works with the
view in place, but PostgreSQL expanded its `e.*` when it was created: drop and create the view
again (VIEW_SQL below) to show the new column. Rebuilding `events` on SQLite (Alembic batch mode)
fails while the view exists ("error in view events_with_user: no such table"): drop the view
before and create it again after.

`suppressions`: user or visitor ids whose events are dropped at ingest (answered as accepted).
`privacy_audit`: one row per deletion, lifting or export (ids as SHA-256, row counts).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

big_pk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: The visitor's first link only (not flagged as a conflict, then the lowest id): a visitor is
#: never split between two users. (Within one group commit links are written in key order, so
#: the flag, set from the order of the events, decides there.)
VIEW_SQL = """
CREATE VIEW events_with_user AS
SELECT e.*, COALESCE(e.user_id, l.user_id) AS resolved_user_id
FROM events e
LEFT JOIN identity_links l
  ON l.project_id = e.project_id AND l.visitor_id = e.visitor_id
 AND NOT EXISTS (
   SELECT 1 FROM identity_links o
   WHERE o.project_id = l.project_id AND o.visitor_id = l.visitor_id AND o.id <> l.id
     AND (o.conflict < l.conflict OR (o.conflict = l.conflict AND o.id < l.id)))
"""


def upgrade() -> None:
    op.create_table(
        "identity_links",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("visitor_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conflict", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.UniqueConstraint(
            "project_id", "visitor_id", "user_id", name="uq_identity_links_project_visitor_user"
        ),
    )
    op.create_index("ix_identity_links_project_user", "identity_links", ["project_id", "user_id"])
    op.execute(VIEW_SQL)
    op.create_table(
        "suppressions",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.UniqueConstraint(
            "project_id", "kind", "value", name="uq_suppressions_project_kind_value"
        ),
    )
    op.create_table(
        "privacy_audit",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ids", sa.Text(), nullable=False),
        sa.Column("counts", sa.Text(), nullable=False),
        sa.Column("suppress", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_privacy_audit_project", "privacy_audit", ["project_id", "id"])


def downgrade() -> None:
    op.drop_table("privacy_audit")
    op.drop_table("suppressions")
    op.execute("DROP VIEW events_with_user")
    op.drop_table("identity_links")
