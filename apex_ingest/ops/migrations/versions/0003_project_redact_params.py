"""projects.redact_params: a project's own query parameter names to redact

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A nullable JSON list (JSONB on PostgreSQL) of extra parameter names whose values the server
stores as `[redacted]` in `url` and `referrer` (apex_ingest/server/redaction.py). Null or empty:
only the built-in list. Adding a nullable column rewrites no row on either database, so this
one is safe to run while servers of the previous release are up (they do not read it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "projects",
        sa.Column("redact_params", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:  # SQLite before 3.35 cannot drop columns
        batch.drop_column("redact_params")
