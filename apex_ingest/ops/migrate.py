"""Schema migrations with Alembic (`apex-ingest db upgrade`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

# Alembic announces every plugin it loads (at import) and its context at INFO; only its warnings
# matter to operators.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402  (after quieting its logger)
from alembic.config import Config  # noqa: E402

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: On PostgreSQL, migration 0002 partitions `events` and keeps event ids in `event_ids`, which
#: the models (shared with SQLite) do not describe. (Migration 0005 dropped the plain index on
#: events (project_id, event_id) and the FK of events, which the model keeps for SQLite only.)
_POSTGRES_ONLY = re.compile(
    r"^(event_ids|ix_event_ids_(received|occurred)"
    r"|events_(default|p\d{4}_\d{2})(_\w+_idx)?)$"
)


def include_in_autogenerate(dialect: str) -> Any:
    """Alembic's include_object: what autogenerate may compare (else it would propose dropping
    the partitions and event_ids on PostgreSQL)."""

    def include(_object: Any, name: str | None, kind: str, reflected: bool, _other: Any) -> bool:
        if dialect != "postgresql":
            return True
        if kind == "foreign_key_constraint" and _object.table.name == "events":
            return False  # SQLite only since 0005 (see the model)
        if name is None:
            return True
        if reflected and _POSTGRES_ONLY.match(name):
            return False
        return not (kind == "unique_constraint" and name == "uq_events_project_event")

    return include


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's config is ConfigParser-based: '%' in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
