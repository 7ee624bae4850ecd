"""Monthly partitions of `events` on PostgreSQL (`apex-ingest db partitions` / `db retention`).

Since migration 0002, `events` on PostgreSQL is partitioned by range of `occurred_at`, one
partition per calendar month in UTC (`events_p2026_11` holds [2026-11-01, 2026-12-01)), plus
`events_default` for anything no monthly partition covers, so an insert never fails for want
of a partition. Deduplication on (project_id, event_id) cannot be a unique index of a table
partitioned by occurred_at (it would have to include occurred_at, and a retried event without
timestamp gets a new occurred_at): it lives in the unpartitioned `event_ids` table, written in
the same statement as the events (see storage.py).

Creating partitions ahead of time keeps `events_default` empty in normal operation. If rows for
a month did land in the default partition, creating that month's partition moves them into it.
Retention drops whole monthly partitions that end before the cutoff and deletes older rows
from the default partition; then it forgets the ids of events no longer stored (so a retry
arriving after the retention period would be stored again: the dedup window is the retention
period, rounded up to the start of the oldest month kept).

SQLite has no partitioning: these functions refuse it (the commands say so).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from psycopg.errors import LockNotAvailable
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from apex_ingest.common.limits import MAX_FUTURE

DEFAULT_PARTITION = "events_default"
_NAME_RE = re.compile(r"^events_p(\d{4})_(\d{2})$")


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(start: datetime, months: int) -> datetime:
    index = start.year * 12 + start.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_name(start: datetime) -> str:
    return f"events_p{start.year:04d}_{start.month:02d}"


def is_partitioned(connection: Connection) -> bool:
    if connection.dialect.name != "postgresql":
        return False
    return bool(
        connection.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p "
                "JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relname = 'events' AND c.relnamespace = current_schema()::regnamespace)"
            )
        ).scalar()
    )


def monthly_partitions(connection: Connection) -> dict[str, datetime]:
    """The monthly partitions of `events`: name -> first instant of the month."""
    names = connection.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'events'::regclass"
        )
    ).scalars()
    found = {}
    for name in names:
        match = _NAME_RE.match(name)
        if match:
            found[name] = datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)
    return found


def ensure_default_partition(connection: Connection) -> bool:
    """Create events_default if missing; True if it was created."""
    exists = connection.execute(text("SELECT to_regclass(:name)"), {"name": DEFAULT_PARTITION})
    if exists.scalar() is not None:
        return False
    connection.execute(text(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF events DEFAULT"))
    return True


def create_month_partition(connection: Connection, start: datetime) -> str | None:
    """Create the partition of the month starting at `start`; None if it exists already.

    Rows of that month sitting in the default partition are moved into the new one (a
    partition cannot be created over rows the default partition holds).
    """
    start = month_start(start)
    end = add_months(start, 1)
    name = partition_name(start)
    if name in monthly_partitions(connection):
        return None
    bounds = {"start": start, "end": end}
    has_default = connection.execute(
        text("SELECT to_regclass(:name)"), {"name": DEFAULT_PARTITION}
    ).scalar()
    stranded = (
        has_default is not None
        and connection.execute(
            text(
                f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} "
                "WHERE occurred_at >= :start AND occurred_at < :end)"
            ),
            bounds,
        ).scalar()
    )
    # Bounds are timestamps we computed, rendered as literals (DDL takes no parameters).
    values = f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    if not stranded:
        connection.execute(text(f"CREATE TABLE {name} PARTITION OF events {values}"))
        return name
    connection.execute(text(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE"))
    connection.execute(text(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)"))
    connection.execute(
        text(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
            "WHERE occurred_at >= :start AND occurred_at < :end RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved"
        ),
        bounds,
    )
    connection.execute(text(f"ALTER TABLE events ATTACH PARTITION {name} {values}"))
    return name


def ensure_partitions(
    connection: Connection, months_ahead: int = 3, now: datetime | None = None
) -> list[str]:
    """The default partition and this month's and the next `months_ahead` months' partitions.

    Returns the names of the partitions created.
    """
    _require_partitioned(connection)
    created = [DEFAULT_PARTITION] if ensure_default_partition(connection) else []
    current = month_start(now or datetime.now(UTC))
    for offset in range(months_ahead + 1):
        name = create_month_partition(connection, add_months(current, offset))
        if name is not None:
            created.append(name)
    return created


#: Dropping a partition needs an exclusive lock on `events`; while it waits for one (behind a
#: long query), every insert waits behind it. So it waits at most this long, then lets go and
#: tries again later, up to DROP_ATTEMPTS times.
LOCK_WAIT = "1s"
DROP_ATTEMPTS = 30
DROP_RETRY_SECONDS = 2.0


def apply_retention(
    engine: Engine,
    days: int,
    now: datetime | None = None,
    batch_rows: int = 10_000,
    attempts: int = DROP_ATTEMPTS,
) -> list[str]:
    """Drop monthly partitions ending before now - `days`; trim the rest. Return dropped names.

    Dropping takes an exclusive lock on `events`, so it is one short transaction; event ids are
    then forgotten in batches of their own, while ingestion goes on. Only ids of events no
    longer stored are forgotten: a kept event's id must keep refusing its repeats.
    """
    if days < 1:
        raise ValueError("retention must be at least one day")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    for attempt in range(1, attempts + 1):
        try:
            dropped, kept = _drop_old_months(engine, cutoff)
            break
        except OperationalError as error:
            if not isinstance(error.orig, LockNotAvailable):
                raise
            if attempt == attempts:
                raise RuntimeError(
                    f"could not lock events for {attempts} tries: a long query or transaction "
                    "holds it (see pg_stat_activity); nothing was dropped"
                ) from error
            time.sleep(DROP_RETRY_SECONDS)
    _forget_ids(engine, min([cutoff, *kept]), batch_rows)
    return dropped


def _drop_old_months(engine: Engine, cutoff: datetime) -> tuple[list[str], list[datetime]]:
    dropped, kept = [], []
    with engine.begin() as connection:
        _require_partitioned(connection)
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
        for name, start in sorted(monthly_partitions(connection).items(), key=lambda i: i[1]):
            if add_months(start, 1) <= cutoff:
                connection.execute(text(f"DROP TABLE {name}"))
                dropped.append(name)
            else:
                kept.append(start)
        connection.execute(
            text(f"DELETE FROM {DEFAULT_PARTITION} WHERE occurred_at < :cutoff"),
            {"cutoff": cutoff},
        )
    return dropped, kept


def _forget_ids(engine: Engine, floor: datetime, batch_rows: int) -> None:
    # Every event still stored occurred at or after `floor`, and so was received after
    # floor - MAX_FUTURE (no timestamp is accepted more than that ahead of its receipt).
    forget = text(
        "DELETE FROM event_ids WHERE ctid IN (SELECT ctid FROM event_ids "
        "WHERE received_at < :before LIMIT :rows)"
    )
    while True:
        with engine.begin() as connection:
            deleted = connection.execute(
                forget, {"before": floor - MAX_FUTURE, "rows": batch_rows}
            ).rowcount
        if deleted < batch_rows:
            return


def _require_partitioned(connection: Connection) -> None:
    if not is_partitioned(connection):
        raise RuntimeError(
            "events is not partitioned: partitions need PostgreSQL and `apex-ingest db upgrade`"
        )
