"""Logging: one JSON object per line (default for the servers) or plain text, with request ids.

`APEX_LOG_FORMAT=json|text` chooses. A JSON record is written with json.dumps, which escapes
CR, LF, ESC and every other control character: whatever a client puts in a header or a field,
it cannot start a new log line or forge a record. The text format escapes them as well.

The request id of the call being handled (`X-Request-ID` at the gateway, the `x-request-id`
gRPC metadata at the server) lives in a context variable; every record logged while handling
that call carries it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from apex_ingest.common.settings import LogSettings, load

#: The current call's request id, if any.
request_id_var: ContextVar[str | None] = ContextVar("apex_request_id", default=None)

#: Header (HTTP) and metadata key (gRPC) carrying the request id.
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_METADATA = "x-request-id"

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: LogRecord attributes that are not user-supplied `extra` fields.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """The caller's request id if a sane token (1-128 of [A-Za-z0-9._:@/+=-]), else a new one."""
    if value and _REQUEST_ID_RE.fullmatch(value):
        return value
    return new_request_id()


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", "request_id"?, extra fields..., "exc_info"?}"""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            document["request_id"] = request_id
        for key, value in _extra_fields(record).items():
            document.setdefault(key, value)
        if record.exc_info:
            document["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    """Classic `time level logger: message`, with control characters escaped (one line each)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{self.formatTime(record)} {record.levelname} {record.name}: "
            f"{escape_control(record.getMessage())}"
        )
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            line += f" request_id={escape_control(str(request_id))}"
        for key, value in _extra_fields(record).items():
            if key != "request_id":
                shown = repr(value) if isinstance(value, str) else str(value)
                line += f" {key}={escape_control(shown)}"
        if record.exc_info:  # a traceback is ours, not the client's: it keeps its lines
            line += "\n" + self.formatException(record.exc_info)
        return line


def escape_control(text: str) -> str:
    """`text` with control characters (C0, DEL, C1, line and paragraph separators) as \\xNN."""
    return _CONTROL_RE.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


#: The log settings of this process, read once (configure_logging, or the first record's need).
_settings: LogSettings | None = None


def log_settings() -> LogSettings:
    global _settings
    if _settings is None:
        _settings = load(LogSettings)
    return _settings


def log_format(default: str = "json") -> str:
    """APEX_LOG_FORMAT, else `default`."""
    return log_settings().log_format or default


def configure_logging(default_format: str = "json") -> None:
    """Log to stderr in APEX_LOG_FORMAT (else `default_format`) at APEX_LOG_LEVEL (INFO).

    Reads the log settings anew (ConfigError naming a bad variable)."""
    global _settings
    _settings = load(LogSettings)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format(default_format) == "json" else TextFormatter()
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(_settings.log_level)


def access_log_enabled() -> bool:
    """One INFO record per request/RPC unless APEX_ACCESS_LOG is off (read once)."""
    return log_settings().access_log


def make_formatter() -> logging.Formatter:
    """The formatter APEX_LOG_FORMAT asks for (for logging.config's "()" factories)."""
    return JsonFormatter() if log_format() == "json" else TextFormatter()


class _DropThreadCountWarning(logging.Filter):
    """Drops granian's warning about its many threads: the gateway chose them on purpose (slow
    clients hold a thread each; gateway/serve.py), so every start would warn about nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Configuration allows spawning up to")


def granian_log_config() -> dict[str, Any]:
    """granian's own loggers, in our format on stderr (its default is text on stdout)."""
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "apex",
        "filters": ["drop_thread_count_warning"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"apex": {"()": "apex_ingest.common.logs.make_formatter"}},
        "filters": {
            "drop_thread_count_warning": {"()": "apex_ingest.common.logs._DropThreadCountWarning"}
        },
        "handlers": {"console": handler, "access": handler},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }
