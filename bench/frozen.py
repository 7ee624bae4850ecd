"""The frozen COPY denominator: COPY of the batch loads' rows into today's `events` schema.

The batch targets of issue #21 are ratios of what PostgreSQL takes by COPY into `events` *as it
stands today* (migrations 0001 + 0002 on PostgreSQL): range-partitioned by month of occurred_at
(a default partition, this month and the next three), primary key (id, occurred_at), btree
indexes (project_id, occurred_at), (project_id, visitor_id, occurred_at),
(project_id, user_id, occurred_at) and a non-unique (project_id, event_id), a foreign key to
projects. The benchmark builds that table itself as `bench_events_frozen` (its own sequence and
partitions), so the denominator stays the same when a later migration makes `events` lighter:
a lighter schema then shows as a higher ratio. Do not change FROZEN_DDL to follow migrations.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import psycopg

from bench.events import Batch

TABLE = "bench_events_frozen"
COLUMNS = (
    "project_id, event_id, type, visitor_id, user_id, url, referrer, data, occurred_at,"
    " received_at, ip, user_agent"
)

# Migration 0002's column list, verbatim but for the sequence's name.
_COLUMNS_DDL = (
    f"id bigint NOT NULL DEFAULT nextval('{TABLE}_id_seq'::regclass), "
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


def _month(year: int, month: int) -> datetime:
    return datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1, tzinfo=UTC)


def frozen_ddl(now: datetime) -> list[str]:
    statements = [
        f"DROP TABLE IF EXISTS {TABLE}",
        f"DROP SEQUENCE IF EXISTS {TABLE}_id_seq",
        f"CREATE SEQUENCE {TABLE}_id_seq",
        f"CREATE TABLE {TABLE} ({_COLUMNS_DDL}) PARTITION BY RANGE (occurred_at)",
        f"CREATE TABLE {TABLE}_default PARTITION OF {TABLE} DEFAULT",
    ]
    for offset in range(4):  # this month and the next three, as migration 0002
        start, end = _month(now.year, now.month + offset), _month(now.year, now.month + offset + 1)
        statements.append(
            f"CREATE TABLE {TABLE}_p{start:%Y_%m} PARTITION OF {TABLE}"
            f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
    statements += [
        f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, occurred_at)",
        f"CREATE INDEX {TABLE}_project_occurred ON {TABLE} (project_id, occurred_at)",
        f"CREATE INDEX {TABLE}_project_visitor ON {TABLE} (project_id, visitor_id, occurred_at)",
        f"CREATE INDEX {TABLE}_project_user ON {TABLE} (project_id, user_id, occurred_at)",
        f"CREATE INDEX {TABLE}_project_event ON {TABLE} (project_id, event_id)",
    ]
    return statements


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


NULL = "\\N"


def _copy_text(value: str) -> str:
    return value.translate(_COPY_ESCAPES)


def copy_rows(pool: list[Batch], project_id: int, rows: int) -> str:
    """`rows` rows of the pool's events in COPY text format, each with its own event id."""
    received = datetime.now(UTC).isoformat()
    tails = [
        f"{_copy_text(event.type)}\t{_copy_text(event.visitor_id)}\t{_copy_text(batch.user_id)}"
        f"\t{_copy_text(event.url)}\t{_copy_text(event.referrer) if event.referrer else NULL}"
        f"\t{_copy_text(event.data)}\t{event.timestamp.isoformat()}\t{received}\t{batch.ip}"
        f"\t{_copy_text(batch.user_agent)}\n"
        for batch in pool
        for event in batch.events
    ]
    return "".join(
        f"{project_id}\tcopy{number:028x}\t{tails[number % len(tails)]}" for number in range(rows)
    )


def copy_rate(conninfo: str, table: str, text: str, rows: int, keep: bool) -> float:
    """Rows/s of one COPY of `text` into `table` (committed if `keep`, else rolled back)."""
    with psycopg.connect(conninfo) as conn:
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY {table} ({COLUMNS}) FROM STDIN") as copy:
            for offset in range(0, len(text), 1 << 20):
                copy.write(text[offset : offset + (1 << 20)])
        if keep:
            conn.commit()
        elapsed = time.perf_counter() - started
        if not keep:
            conn.rollback()
    return rows / elapsed


def frozen_copy_rate(conninfo: str, pool: list[Batch], project_id: int, rows: int) -> float:
    """Build bench_events_frozen (empty), COPY `rows` rows into it and commit; rows/s."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for statement in frozen_ddl(datetime.now(UTC)):
            conn.execute(statement)
    rate = copy_rate(conninfo, TABLE, copy_rows(pool, project_id, rows), rows, keep=True)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {TABLE}")
        conn.execute(f"DROP SEQUENCE {TABLE}_id_seq")
    return rate
