"""PostgreSQL: monthly partitions of events, dedup through event_ids, retention."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from apex_ingest.ops import partitions
from apex_ingest.ops.migrate import upgrade
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.storage import EventStore, insert_events
from tests.conftest import make_project

pytestmark = pytest.mark.postgres


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APEX_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "apex_ingest", "db", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def _row(project_id: int, event_id: str, occurred_at: datetime) -> dict[str, object]:
    return {
        "project_id": project_id,
        "event_id": event_id,
        "type": "pageview",
        "visitor_id": "v1",
        "user_id": None,
        "url": "/",
        "referrer": None,
        "data": '{"n": 1}',
        "occurred_at": occurred_at,
        "received_at": datetime.now(UTC),
        "ip": None,
        "user_agent": None,
    }


def _project_id(database_url: str) -> int:
    key = make_project(database_url)
    engine = create_engine(database_url)
    with engine.connect() as connection:
        project_id = connection.execute(
            text("SELECT id FROM projects WHERE key = :key"), {"key": key}
        ).scalar_one()
    engine.dispose()
    return int(project_id)


def _partition_of(connection: object, event_id: str) -> str:
    return str(
        connection.execute(  # type: ignore[attr-defined]
            text("SELECT tableoid::regclass::text FROM events WHERE event_id = :id"),
            {"id": event_id},
        ).scalar_one()
    )


def test_events_are_partitioned_by_month_and_stored_once(postgres_url: str) -> None:
    project_id = _project_id(postgres_url)
    engine = create_db_engine(postgres_url)
    now = datetime.now(UTC)
    this_month = partitions.partition_name(partitions.month_start(now))
    long_ago = datetime(2001, 5, 17, tzinfo=UTC)
    try:
        with engine.begin() as connection:
            assert partitions.is_partitioned(connection)
            names = set(partitions.monthly_partitions(connection))
            # The migration made this month and the next three, so inserts land in place.
            assert this_month in names and len(names) >= 4
            insert_events(
                connection, [_row(project_id, "a", now), _row(project_id, "old", long_ago)]
            )
        # A retry of "a" with another occurred_at (no client timestamp): still stored once;
        # repeats inside one statement too.
        store = EventStore(create_session_factory(engine), retry_after_seconds=1)
        store.store(project_id, [_row(project_id, "a", now - timedelta(days=40))])
        store.store(project_id, [_row(project_id, "b", now), _row(project_id, "b", now)])
        with engine.begin() as connection:
            counts: dict[str, int] = dict(
                connection.execute(
                    text("SELECT event_id, count(*) FROM events GROUP BY event_id")
                ).all()
            )
            assert counts == {"a": 1, "b": 1, "old": 1}
            assert _partition_of(connection, "a") == this_month
            assert _partition_of(connection, "old") == partitions.DEFAULT_PARTITION
            # The events table keeps its columns for analytics.
            columns = connection.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'events' ORDER BY ordinal_position"
                )
            ).scalars()
            assert list(columns) == [
                "id", "project_id", "event_id", "type", "visitor_id", "user_id", "url",
                "referrer", "data", "occurred_at", "received_at", "ip", "user_agent",
                # Migration 0008 (enrichment).
                "client_occurred_at", "clock_skew_ms", "browser", "browser_version", "os",
                "device_class", "is_bot", "utm_source", "utm_medium", "utm_campaign",
                "utm_term", "utm_content", "gclid", "fbclid", "referrer_host",
                "referrer_class", "country",
            ]  # fmt: skip
            # Creating a month that has rows in the default partition moves them over.
            created = partitions.create_month_partition(connection, long_ago)
            assert created == "events_p2001_05"
            assert _partition_of(connection, "old") == "events_p2001_05"
    finally:
        engine.dispose()


def test_partitions_and_retention_commands(postgres_url: str) -> None:
    project_id = _project_id(postgres_url)
    engine = create_db_engine(postgres_url)
    now = datetime.now(UTC)
    try:
        assert "created" in _cli(postgres_url, "partitions", "--months-ahead", "6").stdout
        assert "up to date" in _cli(postgres_url, "partitions", "--months-ahead", "6").stdout
        old_month = partitions.add_months(partitions.month_start(now), -4)
        with engine.begin() as connection:
            horizon = partitions.add_months(partitions.month_start(now), 6)
            assert partitions.partition_name(horizon) in partitions.monthly_partitions(connection)
            partitions.create_month_partition(connection, old_month)
            old_row = _row(project_id, "old", old_month + timedelta(days=2))
            old_row["received_at"] = old_month + timedelta(days=2)
            insert_events(connection, [old_row, _row(project_id, "new", now)])

        out = _cli(postgres_url, "retention", "--days", "60").stdout
        assert f"dropped partition {partitions.partition_name(old_month)} (1 rows)" in out
        assert "deleted 0 rows from events_default" in out and "forgot 1 event ids" in out

        with engine.begin() as connection:
            remaining = partitions.monthly_partitions(connection)
            assert partitions.partition_name(old_month) not in remaining
            assert partitions.partition_name(partitions.month_start(now)) in remaining
            stored = connection.execute(text("SELECT event_id FROM events")).scalars().all()
            assert stored == ["new"]
            ids = connection.execute(text("SELECT event_id FROM event_ids")).scalars().all()
            assert ids == ["new"]  # the dedup window is the retention period
    finally:
        engine.dispose()


def test_migration_keeps_existing_rows(postgres_url: str) -> None:
    """Downgrade to the unpartitioned table, store rows, upgrade again: nothing is lost."""
    from alembic import command

    from apex_ingest.ops.migrate import alembic_config

    project_id = _project_id(postgres_url)
    command.downgrade(alembic_config(postgres_url), "0001")
    engine = create_db_engine(postgres_url)
    try:
        with engine.begin() as connection:
            assert not partitions.is_partitioned(connection)
            connection.execute(
                text(
                    "INSERT INTO events (project_id, event_id, type, url, data, occurred_at, "
                    "received_at) VALUES (:p, 'x', 'click', '/', '{}', :t, :t), "
                    "(:p, 'y', 'click', '/', '{}', '2019-02-03T00:00:00Z', :t)"
                ),
                {"p": project_id, "t": datetime.now(UTC)},
            )
        upgrade(postgres_url)
        with engine.begin() as connection:
            assert partitions.is_partitioned(connection)
            assert _partition_of(connection, "y") == "events_p2019_02"
            insert_events(connection, [_row(project_id, "x", datetime.now(UTC))])  # a repeat
            count = connection.execute(text("SELECT count(*) FROM events")).scalar_one()
            assert count == 2
    finally:
        engine.dispose()


def test_sqlite_has_no_partitions(sqlite_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apex_ingest", "db", "partitions"],
        env={**os.environ, "APEX_DATABASE_URL": sqlite_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "PostgreSQL" in result.stderr


def test_retention_forgets_only_the_ids_of_events_it_removed(postgres_url: str) -> None:
    """A kept event's id keeps refusing repeats, even if it was received before the cutoff."""
    project_id = _project_id(postgres_url)
    engine = create_db_engine(postgres_url)
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)  # 30 days: the cutoff is 2026-10-29 12:00
    september, october = datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC)
    try:
        with engine.begin() as connection:
            for month in (september, october, datetime(2026, 11, 1, tzinfo=UTC)):
                partitions.create_month_partition(connection, month)
            rows = []
            old = [("sep-3", september), ("sep-20", september)]
            old += [("oct-20", october), ("oct-2", october)]
            for event_id, when in old:
                row = _row(project_id, event_id, when + timedelta(days=int(event_id[4:]) - 1))
                row["received_at"] = row["occurred_at"]
                rows.append(row)
            insert_events(connection, rows)

        report = partitions.apply_retention(engine, 30, now=now, batch_rows=1)
        assert report.dropped == [("events_p2026_09", 2)] and report.forgotten_ids == 2

        with engine.begin() as connection:
            ids = connection.execute(text("SELECT event_id FROM event_ids ORDER BY 1"))
            assert ids.scalars().all() == ["oct-2", "oct-20"]
            # A repeat of a kept event is still refused; one of a dropped event is stored again.
            repeat = _row(project_id, "oct-20", october + timedelta(days=19))
            insert_events(connection, [repeat, _row(project_id, "sep-20", now)])
            stored = connection.execute(text("SELECT event_id FROM events ORDER BY 1"))
            assert stored.scalars().all() == ["oct-2", "oct-20", "sep-20"]
    finally:
        engine.dispose()


def test_autogenerate_sees_no_difference_on_a_migrated_database(postgres_url: str) -> None:
    """Else the next migration's author would get one that drops event_ids and every partition."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from apex_ingest.ops.migrate import include_in_autogenerate
    from apex_ingest.server.models import Base

    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            partitions.ensure_partitions(connection, months_ahead=1)
            context = MigrationContext.configure(
                connection, opts={"include_object": include_in_autogenerate("postgresql")}
            )
            assert compare_metadata(context, Base.metadata) == []
            # Alembic does not compare partial indexes' predicates: the model's and the database's.
            for index in Base.metadata.tables["events"].indexes:
                where = index.dialect_options["postgresql"]["where"]
                predicate = connection.execute(
                    text(
                        "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i "
                        "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = :name"
                    ),
                    {"name": index.name},
                ).scalar_one()
                assert predicate == (None if where is None else f"({where})"), index.name
    finally:
        engine.dispose()


def test_retention_behind_a_long_query_gives_up_instead_of_blocking_inserts(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the exclusive lock, the DROP would queue every insert behind it."""
    monkeypatch.setattr(partitions, "DROP_RETRY_SECONDS", 0.1)
    engine = create_db_engine(postgres_url)
    old = datetime(2020, 1, 1, tzinfo=UTC)
    try:
        with engine.begin() as connection:
            partitions.create_month_partition(connection, old)
        with engine.connect() as reader:
            reader.execute(text("SELECT count(*) FROM events"))  # holds its lock until rollback
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="could not lock events"):
                partitions.apply_retention(engine, 30, attempts=2)
            assert time.monotonic() - started < 10
            reader.rollback()
        assert partitions.apply_retention(engine, 30).dropped_names == ["events_p2020_01"]
    finally:
        engine.dispose()


def _events_indexes(connection: object) -> dict[str, str]:
    """Index name -> definition, of the partitioned `events` itself."""
    rows = connection.execute(  # type: ignore[attr-defined]
        text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events'")
    ).all()
    return {name: definition.replace("public.", "") for name, definition in rows}


def _events_fks(connection: object) -> list[str]:
    return list(
        connection.execute(  # type: ignore[attr-defined]
            text(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'events'::regclass "
                "AND contype = 'f'"
            )
        ).scalars()
    )


#: What migration 0005 leaves on `events` (each index's query: see the migration).
INDEXES_0005 = {
    "events_pkey": "CREATE UNIQUE INDEX events_pkey ON ONLY events USING btree "
    "(project_id, id, occurred_at)",
    "ix_events_project_occurred": "CREATE INDEX ix_events_project_occurred ON ONLY events "
    "USING btree (project_id, occurred_at)",
    "ix_events_project_visitor": "CREATE INDEX ix_events_project_visitor ON ONLY events "
    "USING btree (project_id, visitor_id, occurred_at) WHERE (visitor_id IS NOT NULL)",
    "ix_events_project_user": "CREATE INDEX ix_events_project_user ON ONLY events "
    "USING btree (project_id, user_id, occurred_at) WHERE (user_id IS NOT NULL)",
}
INDEXES_0004 = {
    "events_pkey": "CREATE UNIQUE INDEX events_pkey ON ONLY events USING btree (id, occurred_at)",
    "ix_events_project_occurred": INDEXES_0005["ix_events_project_occurred"],
    "ix_events_project_visitor": "CREATE INDEX ix_events_project_visitor ON ONLY events "
    "USING btree (project_id, visitor_id, occurred_at)",
    "ix_events_project_user": "CREATE INDEX ix_events_project_user ON ONLY events "
    "USING btree (project_id, user_id, occurred_at)",
    "ix_events_project_event": "CREATE INDEX ix_events_project_event ON ONLY events "
    "USING btree (project_id, event_id)",
}


def test_migration_0005_up_and_down_with_rows_in_partitions_and_default(
    postgres_url: str,
) -> None:
    """0005 (write path): no FK, primary key (project_id, id, occurred_at), partial person
    indexes, no (project_id, event_id) index, on every partition; downgrade restores 0004's;
    rows in a monthly partition and in events_default survive both ways."""
    from alembic import command

    from apex_ingest.ops.migrate import alembic_config

    project_id = _project_id(postgres_url)
    engine = create_db_engine(postgres_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            assert _events_indexes(connection) == INDEXES_0005
            assert _events_fks(connection) == []
        command.downgrade(alembic_config(postgres_url), "0004")
        with engine.begin() as connection:
            assert _events_indexes(connection) == INDEXES_0004
            assert _events_fks(connection) == ["events_project_id_fkey1"]  # as 0002 named it
            rows = [_row(project_id, "here", now), _row(project_id, "stray", datetime(2003, 3, 3))]
            rows[1]["occurred_at"] = datetime(2003, 3, 3, tzinfo=UTC)
            rows[1]["user_id"], rows[1]["visitor_id"] = "u1", None
            _insert_as_0004(connection, rows)  # today's insert_events needs 0008's columns
            # An id written by a server of a release before 0004 (no occurred_at).
            connection.execute(
                text("UPDATE event_ids SET occurred_at = NULL WHERE event_id = 'here'")
            )
        upgrade(postgres_url)
        with engine.begin() as connection:
            assert _events_indexes(connection) == INDEXES_0005
            assert _events_fks(connection) == []
            assert _partition_of(connection, "stray") == partitions.DEFAULT_PARTITION
            # Each partition, events_default included, has its copy of each index.
            for partition in (partitions.DEFAULT_PARTITION, _partition_of(connection, "here")):
                definitions = connection.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE tablename = :t"),
                    {"t": partition},
                ).scalars()
                assert sorted(d.split(" USING ")[1] for d in definitions) == sorted(
                    d.split(" USING ")[1] for d in INDEXES_0005.values()
                )
            filled = connection.execute(
                text("SELECT occurred_at FROM event_ids WHERE event_id = 'here'")
            ).scalar_one()
            assert filled == rows[0]["occurred_at"]  # filled while the old index existed
            insert_events(connection, [_row(project_id, "here", now), _row(project_id, "new", now)])
            stored = connection.execute(text("SELECT event_id FROM events ORDER BY 1"))
            assert stored.scalars().all() == ["here", "new", "stray"]
        command.downgrade(alembic_config(postgres_url), "0004")
        with engine.begin() as connection:
            assert _events_indexes(connection) == INDEXES_0004
            assert _events_fks(connection) == ["events_project_id_fkey1"]
            stored = connection.execute(text("SELECT event_id FROM events ORDER BY 1"))
            assert stored.scalars().all() == ["here", "new", "stray"]
        upgrade(postgres_url)
        with engine.begin() as connection:
            assert _events_indexes(connection) == INDEXES_0005
    finally:
        engine.dispose()


def test_queries_by_person_and_recent_events_use_the_0005_indexes(postgres_url: str) -> None:
    """`= $x` implies IS NOT NULL: the partial indexes serve a person's events, generic plans
    included; the primary key serves a project's latest events (the tail feed) without a sort."""
    project_id = _project_id(postgres_url)
    engine = create_db_engine(postgres_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            rows = []
            for n in range(300):
                row = _row(project_id, f"e{n}", now - timedelta(minutes=n))
                row["user_id"] = f"u{n % 7}" if n % 3 == 0 else None
                row["visitor_id"] = f"v{n % 11}" if n % 2 == 0 else None
                rows.append(row)
            insert_events(connection, rows)
            connection.execute(text("ANALYZE events"))
            connection.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
            connection.execute(text("SET LOCAL enable_seqscan = off"))
            connection.execute(text("SET LOCAL enable_sort = off"))
            queries = {
                "user_id_occurred_at_idx": "SELECT id FROM events "
                "WHERE project_id = $1 AND user_id = $2 ORDER BY occurred_at",
                "visitor_id_occurred_at_idx": "SELECT id FROM events "
                "WHERE project_id = $1 AND visitor_id = $2 ORDER BY occurred_at",
            }
            arguments = f"({project_id}, 'x')"
            for number, (index, query) in enumerate(queries.items()):
                connection.execute(text(f"PREPARE q{number} AS {query}"))
                plan = "\n".join(
                    connection.execute(text(f"EXPLAIN EXECUTE q{number}{arguments}")).scalars()
                )
                assert index in plan, plan
            connection.execute(
                text(
                    "PREPARE tail AS SELECT id FROM events WHERE project_id = $1 AND id < $2 "
                    "ORDER BY id DESC LIMIT 50"
                )
            )
            plan = "\n".join(
                connection.execute(text(f"EXPLAIN EXECUTE tail({project_id}, 1000000)")).scalars()
            )
            assert "Index Only Scan Backward using" in plan and "Sort  (" not in plan, plan
            assert "Index Cond: ((project_id = $1) AND (id < $2))" in plan, plan
    finally:
        engine.dispose()


def _insert_as_0004(connection: Any, rows: list[dict[str, Any]]) -> None:
    """Rows inserted as a server of the 0004 release did: the columns of that schema only."""
    for row in rows:
        connection.execute(
            text(
                "INSERT INTO event_ids (project_id, event_id, received_at, occurred_at) "
                "VALUES (:project_id, :event_id, :received_at, :occurred_at)"
            ),
            row,
        )
        connection.execute(
            text(
                "INSERT INTO events (project_id, event_id, type, visitor_id, user_id, url, "
                "referrer, data, occurred_at, received_at, ip, user_agent) VALUES (:project_id, "
                ":event_id, :type, :visitor_id, :user_id, :url, :referrer, CAST(:data AS jsonb), "
                ":occurred_at, :received_at, :ip, :user_agent)"
            ),
            row,
        )
