"""Server configuration, read once from the environment (see the README's table)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite:///apex-ingest.db"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the environment variable."""


def env_int(name: str, default: int, low: int = 1, high: int | None = None) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be {bounds}, got {raw!r}")
    return value


def env_float(name: str, default: float, low: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name} must be a number of at least {low}, got {raw!r}")
    return value


def reachable_host(host: str) -> str:
    """Where to connect to a server bound to `host`: a wildcard address means this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def address_host(host: str) -> str:
    """`host` as written before ":port" in an address or URL: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def check_database_url(url: str) -> str:
    """`url` if it names a database this service supports, else ConfigError saying why."""
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise ConfigError(f"APEX_DATABASE_URL is not a database URL: {url!r}") from None
    if backend == "postgres":
        raise ConfigError("APEX_DATABASE_URL: write postgresql+psycopg://..., not postgres://...")
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            "APEX_DATABASE_URL must be sqlite:///PATH or postgresql+psycopg://..., "
            f"got {backend}://..."
        )
    if parsed.drivername == "postgresql":
        # SQLAlchemy's default driver is psycopg2, which is not installed; psycopg 3 is.
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    database = parsed.database
    if backend == "sqlite" and database and database != ":memory:":
        directory = Path(database).parent
        if not directory.is_dir():
            raise ConfigError(f"APEX_DATABASE_URL: the directory {directory} does not exist")
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    # The gateway's HTTP body limit; the gRPC receive limit is derived from it.
    max_body_bytes: int = 1024 * 1024
    # How long a project lookup (and so a revocation) may be served from cache.
    project_cache_ttl: float = 5.0
    grpc_threads: int = 32
    # Calls beyond this are refused with RESOURCE_EXHAUSTED instead of queueing without bound.
    grpc_max_concurrent_rpcs: int = 256
    shutdown_grace: float = 10.0
    db_connect_timeout: float = 2.0
    # Below the gateway's gRPC deadline (APEX_GRPC_TIMEOUT, 5 s): see database.py.
    db_statement_timeout_ms: int = 3000
    db_pool_size: int = 10
    health_interval: float = 1.0
    retry_after_seconds: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_max_message_bytes(self) -> int:
        # A request in protobuf is never much bigger than its JSON, plus the event ids
        # the gateway stamps (<= 500 x 64 bytes): twice the body limit leaves room.
        return 2 * self.max_body_bytes + 64 * 1024

    @property
    def commit_timeout(self) -> float:
        # Getting a connection and running the statement, with a second to spare.
        return self.db_connect_timeout + self.db_statement_timeout_ms / 1000 + 1

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=check_database_url(
                os.environ.get("APEX_DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL
            ),
            host=os.environ.get("APEX_HOST", "").strip() or "127.0.0.1",
            grpc_port=env_int("APEX_GRPC_PORT", 50051, high=65535),
            http_port=env_int("APEX_HTTP_PORT", 8080, high=65535),
            max_body_bytes=env_int("APEX_MAX_BODY_BYTES", 1024 * 1024),
            project_cache_ttl=env_float("APEX_PROJECT_CACHE_TTL", 5.0),
            grpc_threads=env_int("APEX_GRPC_THREADS", 32),
            grpc_max_concurrent_rpcs=env_int("APEX_GRPC_MAX_CONCURRENT_RPCS", 256),
            shutdown_grace=env_float("APEX_SHUTDOWN_GRACE", 10.0),
            db_connect_timeout=env_float("APEX_DB_CONNECT_TIMEOUT", 2.0, low=0.1),
            db_statement_timeout_ms=env_int("APEX_DB_STATEMENT_TIMEOUT_MS", 3000),
            db_pool_size=env_int("APEX_DB_POOL_SIZE", 10),
        )
