"""Every `APEX_*` setting, read from the environment in one place with one set of rules.

Sections, each a frozen dataclass whose fields are read from `APEX_<FIELD>` by `load()`:

- `NetworkSettings`: where the servers listen (shared by both servers and the process commands);
- `LimitSettings`: limits the gateway and the server both apply;
- `StreamSettings`: stream mode (NATS JetStream between the servers and the database);
- `ServerSettings`: the gRPC server and its database (and the stream settings);
- `GatewaySettings`: the HTTP gateway;
- `ProcessSettings`: how many processes the commands start;
- `LogSettings`: logging.

A field is declared once, in one class, so a variable means the same everywhere (the gateway
and the server read `APEX_MAX_BODY_BYTES` through `LimitSettings`). `check_all()` reads
every section and is what the commands call before they start anything: a bad value is one
`ConfigError` naming the variable. The README's configuration table is checked against these
classes by tests/test_settings.py.

Why not pydantic-settings: it was tried first, and importing it cost ~11 MB of resident memory
in every process (four in `apex-ingest serve`: ~44 MB of the 400 MB budget, issue #21), for
rules that fit in this module: a type per field (str, int, float, bool, a Literal, optional),
bounds, and a parse function where a value needs more.

Internal variables, set by a command for the processes it starts and never by users, are not
settings: they live in `Internal` and their names start with an underscore. This module is the
only one that reads or writes `os.environ` (import-linter cannot check that; a test greps).
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from apex_ingest.common import limits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DATABASE_URL = "sqlite:///apex-ingest.db"
#: The most days of anything kept (a century): more would reach past year 1 when subtracted
#: from now (OverflowError).
MAX_KEPT_DAYS = 36500
ENV_PREFIX = "APEX_"

_YES = frozenset({"1", "true", "yes", "on"})
_NO = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting that cannot work; the message names the environment variable."""


def setting(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A settings field: its default, bounds, and a parse function for what types cannot say
    (it gets the text or the given value and returns the value, or raises ValueError)."""
    return dataclasses.field(
        default=default, metadata={"ge": ge, "gt": gt, "le": le, "parse": parse}
    )


@dataclasses.dataclass(frozen=True)
class _Section:
    """Fields read from `APEX_<FIELD>`; an empty or blank variable means unset (the default)."""


S = TypeVar("S", bound=_Section)


def load(section: type[S], **overrides: Any) -> S:
    """`section` read from the environment, `overrides` taking precedence; ConfigError if bad."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    hints = typing.get_type_hints(section)
    for field in dataclasses.fields(section):
        raw = (
            overrides[field.name]
            if field.name in overrides
            else os.environ.get(variable(field.name))
        )
        if isinstance(raw, str):
            raw = raw.strip()
        if raw is None or raw == "":
            continue
        try:
            values[field.name] = _value(raw, hints[field.name], field.metadata)
        except ValueError as error:
            got = f" (got {raw!r})" if isinstance(raw, str | int | float) else ""
            problems.append(f"{variable(field.name)}: {error}{got}")
    if problems:
        raise ConfigError("; ".join(problems))
    return section(**values)


def _value(raw: Any, hint: Any, rules: Mapping[str, Any]) -> Any:
    parse = rules.get("parse")
    value = parse(raw) if parse is not None else _typed(raw, hint)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        ge, gt, le = rules.get("ge"), rules.get("gt"), rules.get("le")
        if ge is not None and value < ge:
            raise ValueError(f"must be at least {ge:g}")
        if gt is not None and value <= gt:
            raise ValueError(f"must be more than {gt:g}")
        if le is not None and value > le:
            raise ValueError(f"must be at most {le:g}")
    return value


def _typed(raw: Any, hint: Any) -> Any:
    """`raw` (text from the environment, or a typed value) as the field's type."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in _YES:
            return True
        if word in _NO:
            return False
        raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        text = str(raw).strip()
        if not text.lstrip("+-").isdigit():
            raise ValueError("must be a whole number")
        return int(text)
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ValueError("must be a number") from None
    return str(raw)


def variable(field: str) -> str:
    """The environment variable of a settings field: `grpc_port` -> `APEX_GRPC_PORT`."""
    return ENV_PREFIX + field.upper()


# --- shared by several sections ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetworkSettings(_Section):
    """Where the servers listen: both servers, the gateway's default target, the commands."""

    #: Address both servers bind to (`0.0.0.0` or `::` to expose them).
    host: str = "127.0.0.1"
    #: The gateway's HTTP port.
    http_port: int = setting(8080, ge=1, le=65535)
    #: The gRPC server's port.
    grpc_port: int = setting(50051, ge=1, le=65535)


@dataclasses.dataclass(frozen=True)
class LimitSettings(_Section):
    """Limits both the gateway and the server apply."""

    #: HTTP body limit after decompression; the gRPC receive limit is derived from it.
    max_body_bytes: int = setting(limits.MAX_BODY_BYTES, ge=1)

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


def cannot_listen(host: str, port: int, name: str, error: OSError) -> ConfigError:
    """The one-line error of a server that cannot listen on host:port (the variable `name`)."""
    where = f"{address_host(reachable_host(host))}:{port} ({name})"
    if error.errno == errno.EADDRINUSE:
        return ConfigError(f"{where} is already in use: is another apex-ingest running there?")
    return ConfigError(f"cannot listen on {where}: {error.strerror}")


# --- the gRPC server ---------------------------------------------------------------------


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


def _geoip(value: str) -> str:
    if value in ("builtin", "off"):
        return value
    if not Path(value).is_file():
        raise ValueError("must be builtin, off or the path of a MaxMind DB file that exists")
    return value


def check_stream_urls(value: Any) -> str:
    """One `nats://host:port` or a comma-separated list of a cluster's servers."""
    urls = [part.strip() for part in str(value).split(",") if part.strip()]
    if not urls:
        raise ValueError("names no server")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError(f"must be nats://host:port (comma-separated for a cluster): {url!r}")
        try:
            parts.port  # noqa: B018  (raises ValueError for a port that is no number)
        except ValueError:
            raise ValueError(f"has a port that is no number: {url!r}") from None
    return ",".join(urls)


def _stream_token(value: Any) -> str:
    """A stream, consumer or subject token: letters, digits, `-` and `_` (NATS forbids more)."""
    text = str(value).strip()
    if not text or not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in text):
        raise ValueError("must be letters, digits, - and _ only")
    return text


def _subject_prefix(value: Any) -> str:
    text = str(value).strip()
    if not text or not all(_stream_token(token) for token in text.split(".")):
        raise ValueError("must be dot-separated tokens of letters, digits, - and _")
    return text


@dataclasses.dataclass(frozen=True)
class StreamSettings(_Section):
    """Stream mode (docs/deploy.md): the gRPC servers publish to NATS JetStream, loaders write
    the database. Read by the gRPC server, `apex-ingest loader` and `apex-ingest stream setup`."""

    #: `nats://host:port`, or a comma-separated list of a cluster's servers (unset: no stream,
    #: the servers write the database directly).
    stream_url: str | None = setting(None, parse=check_stream_urls)
    #: The JetStream stream's name.
    stream_name: str = setting("APEX_EVENTS", parse=_stream_token)
    #: Subject prefix: a project's requests go to `<prefix>.<shard>` (shard = project id % 16).
    stream_subject: str = setting("apex.events", parse=_subject_prefix)
    #: Replicas of the stream (1, 3 or 5 in a cluster), set by `stream setup`.
    stream_replicas: int = setting(1, ge=1, le=5)
    #: Seconds a server waits for JetStream's acknowledgement before answering UNAVAILABLE.
    stream_ack_timeout: float = setting(2.0, gt=0)
    #: The loaders' durable pull consumer (all loaders share it: a work queue).
    stream_consumer: str = setting("apex-loaders", parse=_stream_token)
    #: Seconds a loader has to commit and ack a message before JetStream redelivers it.
    stream_ack_wait: float = setting(30.0, gt=0)
    #: Seconds a gRPC server in stream mode keeps answering from a key lookup's (and a
    #: project's suppression list's) last known value while the database is unreachable (0: not
    #: at all; then every key is refused).
    stream_key_grace: float = setting(3600.0, ge=0)
    #: Messages a loader fetches at once (committed in transactions of at most 25,000 rows).
    loader_batch: int = setting(256, ge=1, le=10_000)
    #: Port of a loader's /healthz (lag, stream and database) and /metrics (unset: none).
    loader_port: int | None = setting(None, ge=1, le=65535)

    @property
    def stream_servers(self) -> list[str]:
        return self.stream_url.split(",") if self.stream_url else []


@dataclasses.dataclass(frozen=True)
class ServerSettings(NetworkSettings, LimitSettings, StreamSettings):
    """The gRPC server and its database."""

    #: SQLAlchemy URL: `sqlite:///PATH` or `postgresql+psycopg://user:pass@host/db`.
    database_url: str = setting(DEFAULT_DATABASE_URL, parse=check_database_url)
    #: Seconds a key lookup (and so a revocation or a new allowlist) may be cached.
    project_cache_ttl: float = setting(5.0, ge=0)
    #: gRPC worker threads per server process.
    grpc_threads: int = setting(32, ge=1)
    #: Ingest calls held by a process (queued or running) beyond which it answers
    #: RESOURCE_EXHAUSTED with RetryInfo.
    grpc_max_concurrent_rpcs: int = setting(256, ge=1)
    #: Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace: float = setting(10.0, ge=0)
    #: Seconds to connect to / get a connection from the database.
    db_connect_timeout: float = setting(2.0, ge=0.1)
    #: Statement timeout in ms (PostgreSQL; on SQLite how long a write waits for the lock);
    #: below the gateway's gRPC deadline, so a blocked database is a 503, not a 504.
    db_statement_timeout_ms: int = setting(3000, ge=0)
    #: Connections per server process (plus as many overflow).
    db_pool_size: int = setting(10, ge=1)
    #: Seconds between two probes of the database by the health monitor.
    health_interval: float = setting(1.0, gt=0)
    #: Seconds a refused caller is told to wait (RetryInfo / Retry-After).
    retry_after_seconds: int = setting(1, ge=1)
    #: Whether the gRPC server applies pending migrations when it starts.
    migrate_on_start: bool = True
    #: Port of the gRPC server's Prometheus /metrics (unset: none).
    metrics_port: int | None = setting(None, ge=1, le=65535)
    #: Days of events kept (unset: forever). The servers refuse events older than this, and
    #: `apex-ingest db retention` removes them: an accepted event is never one the next
    #: retention run deletes on the spot.
    retention_days: int | None = setting(None, ge=1, le=MAX_KEPT_DAYS)
    #: Dead letters (events of refused requests) kept per project; the oldest go first.
    dead_letter_max_rows: int = setting(10_000, ge=0)
    #: Days a dead letter is kept.
    dead_letter_max_age_days: float = setting(7.0, ge=0, le=MAX_KEPT_DAYS)
    #: Dead letters kept in all, every project together; the oldest go first.
    dead_letter_max_total_rows: int = setting(1_000_000, ge=0)
    #: Refused requests waiting for the dead-letter writer, per server process; beyond it
    #: (and beyond an eighth of it for one project) their events are not recorded (counted).
    dead_letter_queue: int = setting(1000, ge=1)
    #: Derive columns from each event at ingest: parsed User-Agent, bot flag, campaign,
    #: referrer class, country (docs/enrichment.md). Off: those columns stay null (clock-skew
    #: correction and the projects' IP modes still apply).
    enrichment: bool = True
    #: Country database: `builtin` (geoip2fast's bundled one), `off`, or the path of a MaxMind
    #: DB file (GeoLite2-Country.mmdb or compatible) the operator provides.
    geoip: str = setting("builtin", parse=lambda value: _geoip(str(value)))

    @property
    def retention(self) -> timedelta | None:
        return None if self.retention_days is None else timedelta(days=self.retention_days)

    @property
    def commit_timeout(self) -> float:
        # Getting a connection and running the statement, with a second to spare.
        return self.db_connect_timeout + self.db_statement_timeout_ms / 1000 + 1


# --- the HTTP gateway --------------------------------------------------------------------


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    networks = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or CIDR") from None
    return tuple(networks)


#: A target URI of gRPC's naming schemes, passed to gRPC as it is: SCHEME:/... (dns:///,
#: xds:///, google-c2p:///: gRPC knows more than we could list), or one of the schemes that
#: take no slash.
_GRPC_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:/\S*|(?i:ipv4|ipv6|unix|unix-abstract|vsock|dns):\S+"
)
#: Otherwise HOST or HOST:PORT (gRPC's default port then 443), an IPv6 address in brackets.
_GRPC_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+(%\w+)?\]|[^\s:\[\]/]+)(:(\d{1,5}))?")


def _grpc_target(value: Any) -> str:
    """A gRPC target. Only what gRPC could never resolve is refused ('::::', a host with a bad
    port): it would fail only at the gateway's first call, as a 503 for every request."""
    text = str(value).strip()
    if not text:
        return text
    host_port = _GRPC_HOST_PORT.fullmatch(text)
    if host_port is not None:
        port = host_port.group(4)
        if port is None or 0 < int(port) < 65536:
            return text
    elif _GRPC_URI.fullmatch(text):
        return text
    raise ValueError(
        "must be HOST:PORT or HOST (an IPv6 address in brackets, [::1]:50051) or a gRPC target URI "
        "(dns:///host:port, ipv4:, unix:, xds:, ...)"
    )


def _rate_limit(value: Any) -> str:
    from limits import parse_many  # a gateway dependency; only needed here

    text = str(value).strip()
    try:
        parse_many(text)
    except ValueError:
        raise ValueError("must be like 100/second or 100/second;5000/hour") from None
    return text


def _rate_limit_storage(value: Any) -> str:
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    text = str(value).strip()
    try:
        storage_from_string(text)  # builds a client; connects only when first used
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
    return text


@dataclasses.dataclass(frozen=True)
class GatewaySettings(NetworkSettings, LimitSettings):
    """The HTTP gateway (`create_app(test_config)` overrides these by variable name)."""

    #: Where the gateway finds the gRPC server (default: APEX_HOST, loopback for a
    #: wildcard, and APEX_GRPC_PORT).
    grpc_target: str = setting("", parse=_grpc_target)
    #: Deadline in seconds of each gateway -> gRPC call; 504 when it passes.
    grpc_timeout: float = setting(5.0, gt=0)
    #: gRPC connections per gateway worker, used round-robin.
    grpc_channels: int = setting(4, ge=1)
    #: IngestMany calls a gateway worker keeps in flight at once (gateway/coalescer.py).
    grpc_calls_in_flight: int = setting(1, ge=1, le=16)
    #: How long an IngestMany call about to leave may wait while other requests are in this
    #: worker's view, for as many more (a lone request never waits; 0: never).
    coalesce_linger_ms: float = setting(2.0, ge=0, le=50)
    #: Per project; a batch counts once (429 with Retry-After).
    rate_limit: str = setting("100/second", parse=_rate_limit)
    #: Per client IP: requests whose projectKey this gateway worker has not seen accepted
    #: (key guessing, junk floods); past it, 429 without calling the server.
    auth_rate_limit: str = setting("60/minute", parse=_rate_limit)
    #: Seconds the gateway remembers a key the server refused (401 without a call).
    unknown_key_ttl: float = setting(5.0, ge=0)
    #: `memory://` (the workers of one gateway share a table) or `redis://host:6379`.
    rate_limit_storage: str = setting("memory://", parse=_rate_limit_storage)
    #: Comma-separated IPs/CIDRs whose X-Forwarded-For is believed.
    trusted_proxies: tuple[IPNetwork, ...] = setting((), parse=_networks)
    #: Seconds a client has to send a whole request body once its headers are in (408 after);
    #: 0: no limit (behind a proxy that buffers bodies and has its own timeout).
    body_timeout: float = setting(10.0, ge=0)
    #: Access-Control-Max-Age of preflight answers.
    cors_max_age: int = setting(86400, ge=0)
    #: Request threads per gateway worker (unset: granian's default, 512 here).
    http_threads: int | None = setting(None, ge=1)
    #: Seconds a gateway worker keeps serving after SIGTERM before it stops accepting.
    shutdown_drain: float = setting(2.0, ge=0, le=300)
    #: What the gateway's own logs keep of a client IP: `truncated` (IPv4 /24, IPv6 /48),
    #: `full` or `none`. The gateway does not know the projects' IP modes: never full by default.
    log_client_ip: str = setting(
        "truncated", parse=lambda value: _one_of(str(value).lower(), ("truncated", "full", "none"))
    )

    def __post_init__(self) -> None:
        if not self.grpc_target:
            target = f"{address_host(reachable_host(self.host))}:{self.grpc_port}"
            object.__setattr__(self, "grpc_target", target)

    #: create_app(test_config) keys that are not settings (Flask's own, e.g. TESTING).
    FLASK_KEYS: ClassVar[frozenset[str]] = frozenset({"TESTING", "DEBUG"})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GatewaySettings:
        """Settings from the environment, overridden by `APEX_*` keys of a Flask config."""
        names = {field.name for field in dataclasses.fields(cls)}
        overrides = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in config.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in names
        }
        return load(cls, **overrides)


# --- processes and logging ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessSettings(_Section):
    """How many processes `serve`, `grpc` and `gateway` start (their options win)."""

    #: Gateway worker processes (unset: one per CPU core).
    http_workers: int | None = setting(None, ge=1)
    #: gRPC server processes sharing APEX_GRPC_PORT (unset: cores for `grpc`, half for `serve`).
    grpc_processes: int | None = setting(None, ge=1)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass(frozen=True)
class LogSettings(_Section):
    """Logging of every command."""

    #: Log level.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = setting(
        "INFO", parse=lambda value: _one_of(str(value).upper(), _LEVELS)
    )
    #: `json` or `text` (unset: JSON for the servers, text for other commands).
    log_format: Literal["json", "text"] | None = setting(
        None, parse=lambda value: _one_of(str(value).lower(), ("json", "text"))
    )
    #: One record per HTTP request / RPC.
    access_log: bool = True


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return value


#: Every section; `check_all` reads each once.
SECTIONS: tuple[type[_Section], ...] = (
    NetworkSettings,
    LimitSettings,
    StreamSettings,
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
            load(section)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def documented_variables() -> dict[str, Any]:
    """Every setting's variable and default, for the README's table (and its test)."""
    variables: dict[str, Any] = {}
    for section in SECTIONS:
        for field in dataclasses.fields(section):
            variables.setdefault(variable(field.name), field.default)
    return variables


# --- internal variables: from a command to the processes it starts -----------------------


class Internal:
    """Variables a command sets for its child processes; not settings, never set by users."""

    #: The pid of the `serve`/`grpc` process supervising this gRPC child.
    PARENT_PID = "_APEX_PARENT_PID"
    #: The pid of granian's master process, for the gateway workers it forks.
    GATEWAY_MASTER_PID = "_APEX_GATEWAY_MASTER_PID"
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


def child_environment(**variables: str) -> dict[str, str]:
    """This process's environment plus `variables`, for a child process."""
    return {**os.environ, **variables}
