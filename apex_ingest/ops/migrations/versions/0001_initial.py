"""projects and events

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

big_pk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
json_list = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
json_object = sa.Text().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("allowed_origins", json_list, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("key", name="uq_projects_key"),
    )
    op.create_table(
        "events",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("visitor_id", sa.String(128), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("url", sa.String(4096), nullable=False),
        sa.Column("referrer", sa.String(4096), nullable=True),
        sa.Column("data", json_object, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("user_agent", sa.String(1024), nullable=True),
        sa.UniqueConstraint("project_id", "event_id", name="uq_events_project_event"),
    )
    op.create_index("ix_events_project_occurred", "events", ["project_id", "occurred_at"])
    op.create_index(
        "ix_events_project_visitor", "events", ["project_id", "visitor_id", "occurred_at"]
    )
    op.create_index("ix_events_project_user", "events", ["project_id", "user_id", "occurred_at"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("projects")
