"""Event enrichment (issue #19): corrected clocks, parsed user agents, bots, campaigns,
referrers, countries; per-project IP mode and bot dropping

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

`events` gains nullable columns only (old rows keep NULL in each): the client's own time and
the clock skew applied (`client_occurred_at`, `clock_skew_ms`), the parsed User-Agent
(`browser`, `browser_version`, `os`, `device_class`, `is_bot`), the campaign parameters of the
URL (`utm_source` ... `utm_content`, `gclid`, `fbclid`), the referrer's host and class
(`referrer_host`, `referrer_class`) and the country of the IP (`country`). On PostgreSQL
`events` is partitioned: ALTER TABLE on the parent adds each column to every partition
(existing and future); a nullable column without default is a catalog change, no row is
rewritten, so this runs in milliseconds on a table of any size (it takes a short ACCESS
EXCLUSIVE lock per partition: run it when inserts can wait a moment).

`projects` gains `ip_mode` ('full', 'truncated' or 'none'; default 'full', what the server
did before) and `drop_bots` (default false). Both are NOT NULL with a constant default: on
PostgreSQL 11+ and SQLite a metadata change too. Servers of the previous release ignore all
of them, so this migration may run before they are replaced.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: (name, type) of each new column of `events`, all nullable (README: "The database").
EVENT_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("client_occurred_at", sa.DateTime(timezone=True)),
    ("clock_skew_ms", sa.BigInteger()),
    ("browser", sa.String(64)),
    ("browser_version", sa.String(32)),
    ("os", sa.String(64)),
    ("device_class", sa.String(16)),
    ("is_bot", sa.Boolean()),
    ("utm_source", sa.String(256)),
    ("utm_medium", sa.String(256)),
    ("utm_campaign", sa.String(256)),
    ("utm_term", sa.String(256)),
    ("utm_content", sa.String(256)),
    ("gclid", sa.String(256)),
    ("fbclid", sa.String(256)),
    ("referrer_host", sa.String(255)),
    ("referrer_class", sa.String(16)),
    ("country", sa.String(2)),
)


def _view_sql() -> str:
    """0007's `events_with_user` definition: the view is made again around these columns (on
    PostgreSQL its `e.*` was expanded when created; SQLite cannot rebuild `events` under it)."""
    path = Path(__file__).with_name("0007_identity_people.py")
    spec = importlib.util.spec_from_file_location("apex_migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.VIEW_SQL)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS events_with_user")
    for name, type_ in EVENT_COLUMNS:
        op.add_column("events", sa.Column(name, type_, nullable=True))
    op.execute(_view_sql())
    op.add_column(
        "projects",
        sa.Column("ip_mode", sa.String(16), nullable=False, server_default="full"),
    )
    op.add_column(
        "projects",
        sa.Column("drop_bots", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS events_with_user")
    with op.batch_alter_table("projects") as batch:  # SQLite before 3.35 cannot drop columns
        batch.drop_column("drop_bots")
        batch.drop_column("ip_mode")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for name, _ in reversed(EVENT_COLUMNS):
            op.drop_column("events", name)
    else:
        with op.batch_alter_table("events") as batch:
            for name, _ in reversed(EVENT_COLUMNS):
                batch.drop_column(name)
    op.execute(_view_sql())
