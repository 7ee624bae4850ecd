"""The engine's PostgreSQL session settings."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, exc, text

from apex_ingest.common.settings import ServerSettings
from apex_ingest.server.database import create_db_engine


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
