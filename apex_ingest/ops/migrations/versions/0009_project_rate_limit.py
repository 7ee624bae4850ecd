"""projects.rate_limit: a project's own rate limit at the gateway

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

A nullable text such as `100/second;5000/hour` (the syntax of APEX_RATE_LIMIT), counted by the
gateway over all of the project's keys together; null: APEX_RATE_LIMIT. Adding a nullable column
rewrites no row on either database (`projects` is not partitioned), so this one is safe to run
while servers of the previous release are up (they do not read it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projects", sa.Column("rate_limit", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:  # SQLite before 3.35 cannot drop columns
        batch.drop_column("rate_limit")
