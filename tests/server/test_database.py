"""The engine's PostgreSQL session settings."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, exc, text

from apex_ingest.common.settings import ServerSettings
from apex_ingest.server.database import create_db_engine
from tests.conftest import fresh_postgres_database


@pytest.mark.postgres
def test_a_transaction_left_idle_past_the_statement_timeout_is_ended_with_its_locks(
    postgres_url: str,
) -> None:
    """What a process that died mid-transaction without PostgreSQL noticing would hold: ended
    by PostgreSQL itself, so that a loader's redelivered batch is not blocked by it."""
    settings = ServerSettings(database_url=postgres_url, db_statement_timeout_ms=500)
    engine = create_db_engine(postgres_url, settings)
    other = create_engine(postgres_url)

    def lock_free() -> bool:
        with other.connect() as connection:
            free = connection.execute(text("SELECT pg_try_advisory_xact_lock(4242)")).scalar()
            connection.rollback()
        return bool(free)

    try:
        with engine.connect() as abandoned:
            abandoned.execute(text("SELECT pg_advisory_xact_lock(4242)"))
            assert not lock_free()
            time.sleep(1.5)
            assert lock_free()
            with pytest.raises(exc.DBAPIError, match="idle-in-transaction timeout"):
                abandoned.execute(text("SELECT 1"))
    finally:
        engine.dispose()
        other.dispose()


def test_the_schema_revision_is_alembic_head() -> None:
    """A new migration must move SCHEMA_REVISION, or health would accept a database without it."""
    from alembic.script import ScriptDirectory

    from apex_ingest.ops.migrate import alembic_config
    from apex_ingest.server.models import SCHEMA_REVISION

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head == SCHEMA_REVISION


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_storage_cannot_take_events_without_the_schema(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Reachable is not enough: an unmigrated database answered SERVING, then every write failed."""
    from apex_ingest.ops.migrate import upgrade
    from apex_ingest.server.storage import storage_problem

    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
        context: contextlib.AbstractContextManager[str] = contextlib.nullcontext(url)
    else:
        request.applymarker(pytest.mark.postgres)
        context = fresh_postgres_database(migrate=False)
    with context as url:
        engine = create_db_engine(url)
        try:
            problem = storage_problem(engine)
            assert problem is not None and "revision none" in problem and "db upgrade" in problem
            upgrade(url, "0009")
            problem = storage_problem(engine)
            assert problem is not None and "revision 0009" in problem
            upgrade(url)
            assert storage_problem(engine) is None
            with engine.begin() as connection:  # a newer release's migration (a rolling upgrade)
                connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
            assert storage_problem(engine) is None
        finally:
            engine.dispose()
    assert storage_problem(create_db_engine("sqlite:////nonexistent-dir/apex.db")) == (
        "the database is unreachable"
    )
