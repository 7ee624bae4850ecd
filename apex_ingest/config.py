"""Server configuration, read once from the environment (see the README's table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_DATABASE_URL = "sqlite:///apex-ingest.db"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


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
            database_url=os.environ.get("APEX_DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL,
            host=os.environ.get("APEX_HOST", "").strip() or "127.0.0.1",
            grpc_port=_env_int("APEX_GRPC_PORT", 50051),
            http_port=_env_int("APEX_HTTP_PORT", 8080),
            max_body_bytes=_env_int("APEX_MAX_BODY_BYTES", 1024 * 1024),
            project_cache_ttl=_env_float("APEX_PROJECT_CACHE_TTL", 5.0),
            grpc_threads=_env_int("APEX_GRPC_THREADS", 32),
            grpc_max_concurrent_rpcs=_env_int("APEX_GRPC_MAX_CONCURRENT_RPCS", 256),
            shutdown_grace=_env_float("APEX_SHUTDOWN_GRACE", 10.0),
            db_connect_timeout=_env_float("APEX_DB_CONNECT_TIMEOUT", 2.0),
            db_statement_timeout_ms=_env_int("APEX_DB_STATEMENT_TIMEOUT_MS", 3000),
            db_pool_size=_env_int("APEX_DB_POOL_SIZE", 10),
        )
