"""Shared fixtures: databases (SQLite and a PostgreSQL database of the test's own) and servers."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from apex_ingest.common.settings import ServerSettings
from apex_ingest.ops.migrate import upgrade
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import create_project
from apex_ingest.server.server import IngestServer, create_server

POSTGRES_ADMIN_URL = os.environ.get(
    "APEX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
_postgres_problem: str | None = None


def _postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None. Checked once per session."""
    global _postgres_problem
    if _postgres_problem is None:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            _postgres_problem = ""
        except Exception as error:
            _postgres_problem = f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {error}"
        finally:
            engine.dispose()
    return _postgres_problem or None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _postgres_problem:
        terminalreporter.write_sep("!", "PostgreSQL tests did NOT run", red=True, bold=True)
        terminalreporter.write_line(_postgres_problem)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'apex.db'}"
    upgrade(url)
    return url


@contextmanager
def fresh_postgres_database(
    prefix: str = "apex_test", options: str = "", migrate: bool = True
) -> Iterator[str]:
    """A migrated PostgreSQL database of the caller's own (empty if not `migrate`), dropped
    afterwards; `options` are CREATE DATABASE's (a collation, say).

    Unreachable PostgreSQL fails the test under CI=true and skips it (loudly) elsewhere.
    """
    problem = _postgres_unreachable()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" {options}'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts connections and never answers (a frozen database,
    or a middlebox that still completes TCP handshakes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"postgresql+psycopg://apex@127.0.0.1:{listener.getsockname()[1]}/apex"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each storage test runs on both databases."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def make_project(
    database_url: str, name: str = "test", allowed_origins: tuple[str, ...] = ()
) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, name, allowed_origins=allowed_origins).key
    finally:
        engine.dispose()


@dataclass
class RunningServer:
    server: IngestServer
    port: int
    database_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server(database_url: str, **settings: object) -> RunningServer:
    defaults: dict[str, object] = {"project_cache_ttl": 0.0, "health_interval": 0.2}
    config = ServerSettings(database_url=database_url, **{**defaults, **settings})  # type: ignore[arg-type]
    server, port = create_server("127.0.0.1:0", config)
    server.start()
    return RunningServer(server, port, database_url)


@pytest.fixture
def grpc_server(sqlite_url: str) -> Iterator[RunningServer]:
    """A running gRPC server on port 0 against SQLite."""
    running = start_server(sqlite_url)
    yield running
    running.server.stop(0)


@pytest.fixture
def project_key(grpc_server: RunningServer) -> str:
    return make_project(grpc_server.database_url)
