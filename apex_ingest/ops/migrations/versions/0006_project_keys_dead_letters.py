"""project_keys (public and secret keys, several per project) and dead_letters

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`project_keys` holds every key of a project: `public` keys (sent with events, stored as they
are) and `secret` keys (read and administer, stored as their SHA-256). Each existing project's
`projects.key` becomes its public key (label "default", its creation and revocation times);
`projects.key` stays, filled with a project's first public key, for readers of that table: the
server authenticates through `project_keys` only.

`dead_letters` keeps the events of requests refused for their content (issue #17).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

big_pk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "project_keys",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("kind", "key", name="uq_project_keys_kind_key"),
    )
    op.create_index("ix_project_keys_project", "project_keys", ["project_id"])
    op.execute(
        "INSERT INTO project_keys (project_id, kind, key, label, created_at, revoked_at) "
        "SELECT id, 'public', key, 'default', created_at, revoked_at FROM projects ORDER BY id"
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", big_pk, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("violations", sa.Text(), nullable=False),
        sa.Column("event_index", sa.Integer(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("origin", sa.String(4096), nullable=True),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("user_agent", sa.String(1024), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_dead_letters_project_id", "dead_letters", ["project_id", "id"])
    op.create_index("ix_dead_letters_received", "dead_letters", ["received_at"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("project_keys")
