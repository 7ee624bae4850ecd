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


#: Seconds to connect to PostgreSQL before a migration gives up (APEX_DB_CONNECT_TIMEOUT where
#: the caller has settings): a database that accepts connections but never answers must fail
#: `db upgrade`, and a server's start, rather than hang them.
DEFAULT_CONNECT_TIMEOUT = 10.0


def upgrade(
    database_url: str, revision: str = "head", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> None:
    config = alembic_config(database_url)
    config.attributes["connect_timeout"] = connect_timeout  # read by migrations/env.py
    command.upgrade(config, revision)


def postgres_connect_args(database_url: str, connect_timeout: float) -> dict[str, Any]:
    """The connect arguments of a migration's engine: a bounded connect on PostgreSQL (no
    statement timeout: a migration may rightly take long)."""
    from sqlalchemy.engine import make_url

    if make_url(database_url).get_backend_name() != "postgresql":
        return {}
    return {"connect_timeout": max(1, round(connect_timeout))}


def current_revision(
    database_url: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(
        database_url, connect_args=postgres_connect_args(database_url, connect_timeout)
    )
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def is_known_revision(revision: str) -> bool:
    """Whether `revision` is one of this release's migrations (else a newer release's)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return (
            ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(revision)
            is not None
        )
    except CommandError:
        return False
