"""PostgreSQL: partition events by month of occurred_at; dedup through event_ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

`events` keeps its columns (analytics read them) but becomes a table partitioned by range of
`occurred_at` (see apex_ingest/ops/partitions.py). Its unique (project_id, event_id) cannot stay
(a unique index of a partitioned table must include the partition key), so dedup moves to
the new unpartitioned `event_ids` (project_id, event_id) primary key; the primary key of
`events` becomes (id, occurred_at). Existing rows are copied. SQLite: nothing changes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op
from sqlalchemy import text

from apex_ingest.ops import partitions

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = (
    "id bigint NOT NULL DEFAULT nextval('events_id_seq'::regclass), "
    "project_id bigint NOT NULL REFERENCES projects (id), "
    "event_id varchar(64) NOT NULL, "
    "type varchar(100) NOT NULL, "
    "visitor_id varchar(128), "
    "user_id varchar(128), "
    "url varchar(4096) NOT NULL, "
    "referrer varchar(4096), "
    "data jsonb NOT NULL, "
    "occurred_at timestamptz NOT NULL, "
    "received_at timestamptz NOT NULL, "
    "ip varchar(45), "
    "user_agent varchar(1024)"
)
_NAMES = (
    "id, project_id, event_id, type, visitor_id, user_id, url, referrer, data, occurred_at, "
    "received_at, ip, user_agent"
)
_INDEXES = (
    ("ix_events_project_occurred", "project_id, occurred_at"),
    ("ix_events_project_visitor", "project_id, visitor_id, occurred_at"),
    ("ix_events_project_user", "project_id, user_id, occurred_at"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    connection = op.get_bind()
    op.execute(
        "CREATE TABLE event_ids ("
        "project_id bigint NOT NULL, event_id varchar(64) NOT NULL, "
        "received_at timestamptz NOT NULL, "
        "CONSTRAINT pk_event_ids PRIMARY KEY (project_id, event_id))"
    )
    op.execute("CREATE INDEX ix_event_ids_received ON event_ids (received_at)")
    op.execute("ALTER TABLE events RENAME TO events_unpartitioned")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
    op.execute(f"CREATE TABLE events ({_COLUMNS}) PARTITION BY RANGE (occurred_at)")
    partitions.ensure_default_partition(connection)
    # A partition for every month that has rows (not every month since the oldest: a stray
    # 1970 timestamp must not mean 700 partitions), and this month and the next three.
    months = connection.execute(
        text(
            "SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC') "
            "FROM events_unpartitioned"
        )
    ).scalars()
    current = partitions.month_start(datetime.now(UTC))
    wanted = {month.replace(tzinfo=UTC) for month in months}
    wanted |= {partitions.add_months(current, offset) for offset in range(4)}
    for month in sorted(wanted):
        partitions.create_month_partition(connection, month)
    op.execute(f"INSERT INTO events ({_NAMES}) SELECT {_NAMES} FROM events_unpartitioned")
    op.execute(
        "INSERT INTO event_ids (project_id, event_id, received_at) "
        "SELECT project_id, event_id, received_at FROM events_unpartitioned"
    )
    op.execute("DROP TABLE events_unpartitioned")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
    op.execute("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id, occurred_at)")
    for name, columns in _INDEXES:
        op.execute(f"CREATE INDEX {name} ON events ({columns})")
    # Not unique (event_ids enforces that), but lookups by client id stay fast.
    op.execute("CREATE INDEX ix_events_project_event ON events (project_id, event_id)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE events RENAME TO events_partitioned")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY NONE")
    for name, _ in _INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_partitioned")
    op.execute("ALTER TABLE events_partitioned RENAME CONSTRAINT events_pkey TO events_pkey_old")
    op.execute(
        f"CREATE TABLE events ({_COLUMNS}, CONSTRAINT events_pkey PRIMARY KEY (id), "
        "CONSTRAINT uq_events_project_event UNIQUE (project_id, event_id))"
    )
    op.execute(f"INSERT INTO events ({_NAMES}) SELECT {_NAMES} FROM events_partitioned")
    op.execute("DROP TABLE events_partitioned CASCADE")
    op.execute("DROP TABLE event_ids")
    op.execute("ALTER SEQUENCE events_id_seq OWNED BY events.id")
    for name, columns in _INDEXES:
        op.execute(f"CREATE INDEX {name} ON events ({columns})")
