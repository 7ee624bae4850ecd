"""projects.cookieless and visitor_salts: visitor ids derived by the server (issue #19, item 7)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

`projects.cookieless` (nullable boolean, default false; null reads as false): the project accepts
snippet events without `visitorId`, and the server derives the visitor id from a daily salt, the
project, the client's IP and User-Agent (apex_ingest/server/cookieless.py).

`visitor_salts` holds that salt, one random row per UTC day (`day` is the key, so two servers
creating the day's salt at once end up with the same one). Only today's and yesterday's rows
exist: older ones are deleted when a day's salt is created, so yesterday's visitor ids cannot be
recomputed once the next day is over.

Adding a nullable column and a new table rewrites no row on either database (PostgreSQL 11+
stores a constant default without touching the rows), so this runs safely while servers of
the previous release are up (they read neither).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "projects",
        sa.Column("cookieless", sa.Boolean(), nullable=True, server_default=sa.false()),
    )
    op.create_table(
        "visitor_salts",
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("visitor_salts")
    with op.batch_alter_table("projects") as batch:  # SQLite before 3.35 cannot drop columns
        batch.drop_column("cookieless")
