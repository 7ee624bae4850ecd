"""Alembic environment: runs migrations online against `sqlalchemy.url`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from apex_ingest.ops.migrate import (
    DEFAULT_CONNECT_TIMEOUT,
    include_in_autogenerate,
    postgres_connect_args,
)
from apex_ingest.server.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    timeout = config.attributes.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    engine = create_engine(
        url, poolclass=pool.NullPool, connect_args=postgres_connect_args(url, timeout)
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode copies the table.
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=include_in_autogenerate(connection.dialect.name),
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Several servers may start at once: one migrates, the others wait.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7411402024)")
            context.run_migrations()
    engine.dispose()


run_migrations()
