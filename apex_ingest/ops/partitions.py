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
from the default partition; then it forgets the ids of exactly the events removed
(`event_ids.occurred_at`, migration 0004): an id is kept as long as its event is stored, and no
longer. A repeat of a removed event is then judged afresh: refused as too old by servers with
the same APEX_RETENTION_DAYS, stored again otherwise; never answered "accepted" unstored.

SQLite has no partitioning: `ensure_partitions` refuses it (the command says so); retention
there deletes the old rows.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from psycopg.errors import LockNotAvailable
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from apex_ingest.common.settings import MAX_KEPT_DAYS

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


@dataclass
class RetentionReport:
    """What `apply_retention` removed."""

    cutoff: datetime
    #: (partition, rows it held) of each monthly partition dropped, oldest first.
    dropped: list[tuple[str, int]] = field(default_factory=list)
    #: Rows deleted one by one: from events_default (PostgreSQL) or from events (SQLite).
    deleted_rows: int = 0
    deleted_from: str = DEFAULT_PARTITION
    #: Event ids forgotten (PostgreSQL's event_ids), so that a repeat is judged afresh.
    forgotten_ids: int = 0

    @property
    def dropped_names(self) -> list[str]:
        return [name for name, _ in self.dropped]

    def lines(self) -> list[str]:
        """What `db retention` prints: every count, including zeros."""
        lines = [f"removing events that occurred before {self.cutoff.isoformat()}"]
        for name, rows in self.dropped:
            lines.append(f"dropped partition {name} ({rows} rows)")
        if not self.dropped and self.deleted_from == DEFAULT_PARTITION:
            lines.append("dropped no partition (none ends before that)")
        lines.append(f"deleted {self.deleted_rows} rows from {self.deleted_from}")
        if self.deleted_from == DEFAULT_PARTITION:
            lines.append(f"forgot {self.forgotten_ids} event ids of removed events")
        return lines


def apply_retention(
    engine: Engine,
    days: int,
    now: datetime | None = None,
    batch_rows: int = 10_000,
    attempts: int = DROP_ATTEMPTS,
) -> RetentionReport:
    """Remove the events that occurred more than `days` ago; report what was removed.

    PostgreSQL: drop the monthly partitions ending before now - `days` and delete older rows
    from the default partition, in one short transaction (it takes an exclusive lock on
    `events`); then forget the ids of the events removed, in batches of their own, while
    ingestion goes on. The rule: an id is kept exactly as long as its event is stored
    (`event_ids.occurred_at` is the stored event's), so a repeat of a stored event is never
    stored twice, and a repeat of a removed one is never answered "accepted" without being
    stored (the servers refuse it as too old when APEX_RETENTION_DAYS is the same `days`).

    SQLite (not partitioned; its unique index is the dedup): delete the rows, in batches.
    """
    if not 1 <= days <= MAX_KEPT_DAYS:
        raise ValueError(f"retention must be 1 to {MAX_KEPT_DAYS} days")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    if engine.dialect.name == "sqlite":
        return RetentionReport(
            cutoff, deleted_rows=_delete_sqlite(engine, cutoff, batch_rows), deleted_from="events"
        )
    for attempt in range(1, attempts + 1):
        try:
            report, kept = _drop_old_months(engine, cutoff)
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
    report.forgotten_ids = _forget_ids(engine, min([cutoff, *kept]), batch_rows)
    return report


def _drop_old_months(engine: Engine, cutoff: datetime) -> tuple[RetentionReport, list[datetime]]:
    report, kept = RetentionReport(cutoff), []
    with engine.begin() as connection:
        _require_partitioned(connection)
        old = []
        for name, start in sorted(monthly_partitions(connection).items(), key=lambda i: i[1]):
            if add_months(start, 1) <= cutoff:
                old.append(name)
            else:
                kept.append(start)
        # Counted before the first DROP locks `events` (a count of a big partition takes a
        # while, and inserts would queue behind the lock meanwhile).
        for name in old:
            rows = connection.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()
            report.dropped.append((name, int(rows)))
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
        for name in old:
            connection.execute(text(f"DROP TABLE {name}"))
        report.deleted_rows = connection.execute(
            text(f"DELETE FROM {DEFAULT_PARTITION} WHERE occurred_at < :cutoff"),
            {"cutoff": cutoff},
        ).rowcount
    return report, kept


def _forget_ids(engine: Engine, floor: datetime, batch_rows: int) -> int:
    """Forget the ids of the events no longer stored; return how many.

    Every event still stored occurred at or after `floor` (the start of the oldest month
    kept, or the cutoff when it is older: rows of events_default before the cutoff are gone,
    and the month holding the cutoff, if it has a partition, has no rows in events_default).
    So an id whose event occurred before `floor` has no event any more. Ids written by servers
    of a release before migration 0004 have no occurred_at: they go once no event has them.
    """
    statements = (
        text(
            "DELETE FROM event_ids WHERE ctid IN (SELECT ctid FROM event_ids "
            "WHERE occurred_at < :floor LIMIT :rows)"
        ),
        text(
            "DELETE FROM event_ids WHERE ctid IN (SELECT i.ctid FROM event_ids i "
            "WHERE i.occurred_at IS NULL AND NOT EXISTS (SELECT 1 FROM events e "
            "WHERE e.project_id = i.project_id AND e.event_id = i.event_id) LIMIT :rows)"
        ),
    )
    forgotten = 0
    for statement in statements:
        while True:
            with engine.begin() as connection:
                deleted = connection.execute(
                    statement, {"floor": floor, "rows": batch_rows}
                ).rowcount
            forgotten += deleted
            if deleted < batch_rows:
                break
    return forgotten


def _delete_sqlite(engine: Engine, cutoff: datetime, batch_rows: int) -> int:
    """Delete events older than `cutoff`, `batch_rows` per transaction (SQLite has one writer:
    short transactions let the server's writes through in between)."""
    from sqlalchemy import delete, select

    from apex_ingest.server.models import Event

    old = select(Event.id).where(Event.occurred_at < cutoff).limit(batch_rows)
    deleted = 0
    while True:
        with engine.begin() as connection:
            count = connection.execute(delete(Event).where(Event.id.in_(old))).rowcount
        deleted += count
        if count < batch_rows:
            return deleted


def _require_partitioned(connection: Connection) -> None:
    if not is_partitioned(connection):
        raise RuntimeError(
            "events is not partitioned: partitions need PostgreSQL and `apex-ingest db upgrade`"
        )
