"""Every `APEX_*` setting, read from the environment in one place with one set of rules.

Sections, each a pydantic-settings class reading `APEX_<FIELD>`:

- `NetworkSettings`: where the servers listen (shared by both servers and the process commands);
- `ServerSettings`: the gRPC server and its database;
- `GatewaySettings`: the HTTP gateway;
- `ProcessSettings`: how many processes the commands start;
- `LogSettings`: logging.

A field is declared once, in one class, so a variable means the same everywhere (the gateway
and the server read `APEX_MAX_BODY_BYTES` through `LimitSettings`). `check_all()` reads
every section and is what the commands call before they start anything: a bad value is one
`ConfigError` naming the variable. The README's configuration table is checked against these
classes by tests/test_settings_docs.py.

Internal variables, set by a command for the processes it starts and never by users, are not
settings: they live in `Internal` and their names start with an underscore. This module is the
only one that reads or writes `os.environ` (import-linter cannot check that; a test greps).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from apex_ingest.common import limits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DATABASE_URL = "sqlite:///apex-ingest.db"
ENV_PREFIX = "APEX_"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the environment variable."""


class _Section(BaseSettings):
    """Reads `APEX_<FIELD>`; an empty or blank variable means unset (the default)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        str_strip_whitespace=True,
        validate_default=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: Any) -> Any:
        # "APEX_X= " (spaces) is as good as unset, like an empty variable; " 8 " is 8.
        if isinstance(values, dict):
            return {
                key: value.strip() if isinstance(value, str) else value
                for key, value in values.items()
                if not (isinstance(value, str) and not value.strip())
            }
        return values


S = TypeVar("S", bound=_Section)


def load(section: type[S], **overrides: Any) -> S:
    """`section` read from the environment, `overrides` taking precedence; ConfigError if bad."""
    try:
        return section(**overrides)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


def describe(error: ValidationError) -> str:
    """One line per bad variable, each naming it: `APEX_GRPC_PORT: ... (got 'x')`."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = variable(field) if field else "settings"
        message = str(problem["msg"]).removeprefix("Value error, ")
        shown = problem.get("input")
        got = f" (got {shown!r})" if isinstance(shown, str | int | float) else ""
        lines.append(f"{name}: {message}{got}")
    return "; ".join(lines)


def variable(field: str) -> str:
    """The environment variable of a settings field: `grpc_port` -> `APEX_GRPC_PORT`."""
    return ENV_PREFIX + field.upper()


# --- shared by several sections ---------------------------------------------------------


class NetworkSettings(_Section):
    """Where the servers listen: both servers, the gateway's default target, the commands."""

    #: Address both servers bind to (`0.0.0.0` or `::` to expose them).
    host: str = "127.0.0.1"
    #: The gateway's HTTP port.
    http_port: int = Field(8080, ge=1, le=65535)
    #: The gRPC server's port.
    grpc_port: int = Field(50051, ge=1, le=65535)

    @property
    def reachable_host(self) -> str:
        return reachable_host(self.host)


class LimitSettings(_Section):
    """Limits both the gateway and the server apply."""

    #: HTTP body limit after decompression; the gRPC receive limit is derived from it.
    max_body_bytes: int = Field(limits.MAX_BODY_BYTES, ge=1)

    @property
    def grpc_max_message_bytes(self) -> int:
        # A request in protobuf is never much bigger than its JSON, plus the event ids
        # the gateway stamps (<= 500 x 64 bytes): twice the body limit leaves room.
        return 2 * self.max_body_bytes + 64 * 1024


def reachable_host(host: str) -> str:
    """Where to connect to a server bound to `host`: a wildcard address means this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host.strip("[]")


def address_host(host: str) -> str:
    """`host` as written before ":port" in an address or URL: an IPv6 literal in brackets."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


# --- the gRPC server ---------------------------------------------------------------------


class ServerSettings(NetworkSettings, LimitSettings):
    """The gRPC server and its database."""

    #: SQLAlchemy URL: `sqlite:///PATH` or `postgresql+psycopg://user:pass@host/db`.
    database_url: str = DEFAULT_DATABASE_URL
    #: Seconds a key lookup (and so a revocation or a new allowlist) may be cached.
    project_cache_ttl: float = Field(5.0, ge=0)
    #: gRPC worker threads per server process.
    grpc_threads: int = Field(32, ge=1)
    #: Ingest calls held by a process (queued or running) beyond which it answers
    #: RESOURCE_EXHAUSTED with RetryInfo.
    grpc_max_concurrent_rpcs: int = Field(256, ge=1)
    #: Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace: float = Field(10.0, ge=0)
    #: Seconds to connect to / get a connection from the database.
    db_connect_timeout: float = Field(2.0, ge=0.1)
    #: Statement timeout in ms (PostgreSQL; on SQLite how long a write waits for the lock);
    #: below the gateway's gRPC deadline, so a blocked database is a 503, not a 504.
    db_statement_timeout_ms: int = Field(3000, ge=0)
    #: Connections per server process (plus as many overflow).
    db_pool_size: int = Field(10, ge=1)
    #: Seconds between two probes of the database by the health monitor.
    health_interval: float = Field(1.0, gt=0)
    #: Seconds a refused caller is told to wait (RetryInfo / Retry-After).
    retry_after_seconds: int = Field(1, ge=1)
    #: Whether the gRPC server applies pending migrations when it starts.
    migrate_on_start: bool = True
    #: Port of the gRPC server's Prometheus /metrics (unset: none).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: Dead letters (events of refused requests) kept per project; the oldest go first.
    dead_letter_max_rows: int = Field(10_000, ge=0)
    #: Days a dead letter is kept.
    dead_letter_max_age_days: float = Field(7.0, ge=0)
    #: Dead letters kept in all, every project together; the oldest go first.
    dead_letter_max_total_rows: int = Field(1_000_000, ge=0)
    #: Refused requests waiting for the dead-letter writer, per server process; beyond it
    #: (and beyond an eighth of it for one project) their events are not recorded (counted).
    dead_letter_queue: int = Field(1000, ge=1)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return check_database_url(value)

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def commit_timeout(self) -> float:
        # Getting a connection and running the statement, with a second to spare.
        return self.db_connect_timeout + self.db_statement_timeout_ms / 1000 + 1


def check_database_url(url: str) -> str:
    """`url` if it names a database this service supports (`postgresql://` gets psycopg)."""
    scheme, separator, rest = url.partition("://")
    if not separator or not scheme:
        raise ValueError(f"is not a database URL: {url!r}")
    backend, _, driver = scheme.partition("+")
    if backend == "postgres":
        raise ValueError("write postgresql+psycopg://..., not postgres://...")
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"must be sqlite:///PATH or postgresql+psycopg://..., got {backend}://...")
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            raise ValueError(f"the PostgreSQL driver must be psycopg, got {driver}")
        try:
            urlsplit(url).port  # noqa: B018  (raises ValueError for a port that is no number)
        except ValueError:
            raise ValueError(f"is not a database URL: {url!r}") from None
        # SQLAlchemy's default driver is psycopg2, which is not installed; psycopg 3 is.
        return f"postgresql+psycopg://{rest}"
    database = rest[1:] if rest.startswith("/") else rest
    path = database.partition("?")[0]
    if path and path != ":memory:" and not Path(path).parent.is_dir():
        raise ValueError(f"the directory {Path(path).parent} does not exist")
    return url


# --- the HTTP gateway --------------------------------------------------------------------


def _split_networks(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(NetworkSettings, LimitSettings):
    """The HTTP gateway (`create_app(test_config)` overrides these by variable name)."""

    #: Where the gateway finds the gRPC server (default: APEX_HOST, loopback for a
    #: wildcard, and APEX_GRPC_PORT).
    grpc_target: str = ""
    #: Deadline in seconds of each gateway -> gRPC call; 504 when it passes.
    grpc_timeout: float = Field(5.0, gt=0)
    #: gRPC connections per gateway worker, used round-robin.
    grpc_channels: int = Field(4, ge=1)
    #: Per project; a batch counts once (429 with Retry-After).
    rate_limit: str = "100/second"
    #: Per client IP: requests whose projectKey this gateway worker has not seen accepted
    #: (key guessing, junk floods); past it, 429 without calling the server.
    auth_rate_limit: str = "60/minute"
    #: Seconds the gateway remembers a key the server refused (401 without a call).
    unknown_key_ttl: float = Field(5.0, ge=0)
    #: `memory://` (the workers of one gateway share a table) or `redis://host:6379`.
    rate_limit_storage: str = "memory://"
    #: Comma-separated IPs/CIDRs whose X-Forwarded-For is believed.
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = ()
    #: Seconds a client has to send a whole request body once its headers are in (408 after);
    #: 0: no limit (behind a proxy that buffers bodies and has its own timeout).
    body_timeout: float = Field(10.0, ge=0)
    #: Access-Control-Max-Age of preflight answers.
    cors_max_age: int = Field(86400, ge=0)
    #: Request threads per gateway worker (unset: granian's default, 512 here).
    http_threads: int | None = Field(None, ge=1)
    #: Seconds a gateway worker keeps serving after SIGTERM before it stops accepting.
    shutdown_drain: float = Field(2.0, ge=0, le=300)

    @field_validator("grpc_timeout", "shutdown_drain", "body_timeout")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        items = _split_networks(value)
        networks = []
        for item in items or ():
            try:
                networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return tuple(networks)

    @field_validator("rate_limit", "auth_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many  # a gateway dependency; only needed here

        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f"must be like 100/second or 100/second;5000/hour, got {value!r}"
            ) from None
        return value

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_storage(cls, value: str) -> str:
        from limits.errors import ConfigurationError
        from limits.storage import storage_from_string

        try:
            storage_from_string(value)  # builds a client; connects only when first used
        except ConfigurationError as exc:
            raise ValueError(f"{exc} ({value!r})") from None
        return value

    @model_validator(mode="after")
    def _default_target(self) -> GatewaySettings:
        if not self.grpc_target:
            target = f"{address_host(reachable_host(self.host))}:{self.grpc_port}"
            object.__setattr__(self, "grpc_target", target)
        return self

    #: create_app(test_config) keys that are not settings (Flask's own, e.g. TESTING).
    FLASK_KEYS: ClassVar[frozenset[str]] = frozenset({"TESTING", "DEBUG"})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GatewaySettings:
        """Settings from the environment, overridden by `APEX_*` keys of a Flask config."""
        fields = cls.model_fields
        overrides = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in config.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields
        }
        return load(cls, **overrides)


# --- processes and logging ---------------------------------------------------------------


class ProcessSettings(_Section):
    """How many processes `serve`, `grpc` and `gateway` start (their options win)."""

    #: Gateway worker processes (unset: one per CPU core).
    http_workers: int | None = Field(None, ge=1)
    #: gRPC server processes sharing APEX_GRPC_PORT (unset: cores for `grpc`, half for `serve`).
    grpc_processes: int | None = Field(None, ge=1)


class LogSettings(_Section):
    """Logging of every command."""

    #: Log level.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: `json` or `text` (unset: JSON for the servers, text for other commands).
    log_format: Literal["json", "text"] | None = None
    #: One record per HTTP request / RPC.
    access_log: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


#: Every section; `check_all` reads each once.
SECTIONS: tuple[type[_Section], ...] = (
    NetworkSettings,
    LimitSettings,
    ServerSettings,
    GatewaySettings,
    ProcessSettings,
    LogSettings,
)


def check_all() -> None:
    """Read every section; ConfigError naming each bad variable. Commands call it first."""
    problems = []
    for section in SECTIONS:
        try:
            section()
        except ValidationError as error:
            problems.append(describe(error))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def documented_variables() -> dict[str, Any]:
    """Every setting's variable and default, for the README's table (and its test)."""
    variables: dict[str, Any] = {}
    for section in SECTIONS:
        for name, info in section.model_fields.items():
            variables.setdefault(variable(name), info.default)
    return variables


# --- internal variables: from a command to the processes it starts -----------------------


class Internal:
    """Variables a command sets for its child processes; not settings, never set by users."""

    #: The pid of the `serve`/`grpc` process supervising this gRPC child.
    PARENT_PID = "_APEX_PARENT_PID"
    #: The file in which a gateway's workers share their in-memory rate-limit windows.
    RATE_LIMIT_TABLE = "_APEX_RATE_LIMIT_TABLE"
    #: Set when a parent serves its children's metrics (the children must not bind the port).
    METRICS_SERVED_BY_PARENT = "_APEX_METRICS_SERVED_BY_PARENT"
    #: prometheus-client's own variable: where processes of one tree write their samples.
    PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

    @staticmethod
    def get(name: str) -> str:
        return os.environ.get(name, "")

    @staticmethod
    def set(name: str, value: str) -> None:
        """Set for this process and every child it starts from now on."""
        os.environ[name] = value

    @staticmethod
    def set_default(name: str, value: str) -> str:
        return os.environ.setdefault(name, value)


def child_environment(**variables: str) -> dict[str, str]:
    """This process's environment plus `variables`, for a child process."""
    return {**os.environ, **variables}


def set_setting(field: str, value: str) -> None:
    """Set a setting for this process and its children (e.g. `serve` telling its gateway
    workers where the gRPC server is)."""
    os.environ[variable(field)] = value
