"""Engine and session factory: one of each per process, made at startup."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.common.settings import ServerSettings


def create_db_engine(url: str, settings: ServerSettings | None = None) -> Engine:
    """An engine for `url` with `settings`' timeouts and pool (default: the defaults; `url` is
    not checked again, so a test may point at a database that cannot be opened)."""
    settings = settings or ServerSettings(database_url=url)
    sa_url = make_url(url)
    # Both databases give up on a statement (a lock wait included) before the gateway's
    # deadline passes, so a blocked database is a 503 with Retry-After, not a 504.
    wait_s = settings.db_statement_timeout_ms / 1000
    if sa_url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": wait_s})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Bounded connect, statement and TCP timeouts: when PostgreSQL goes away a call
    # fails within seconds (UNAVAILABLE) instead of hanging; pre-ping replaces
    # dead pooled connections, so service resumes by itself when it is back.
    # idle_in_transaction_session_timeout is the server's side of it: a process that dies (or
    # is cut off) in the middle of a transaction without PostgreSQL noticing would otherwise
    # hold that transaction's row locks, and block every insert of the same event ids (a
    # loader's redelivered batch), until TCP keepalives end it hours later.
    timeout_ms = settings.db_statement_timeout_ms
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, int(settings.db_connect_timeout)),
        "options": (
            f"-c statement_timeout={timeout_ms} -c idle_in_transaction_session_timeout={timeout_ms}"
        ),
        "tcp_user_timeout": timeout_ms,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "application_name": "apex-ingest",
    }
    return create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_connect_timeout,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL keeps "OK means
    # committed" true even across power loss; other writers are waited out for the
    # connect argument `timeout` (sqlite3 sets busy_timeout from it).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
