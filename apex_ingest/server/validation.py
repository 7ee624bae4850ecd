"""Checks every rule of the contract on a request and turns its events into rows.

Plain functions on the generated messages: no gRPC, no database. Every violation
is collected (not just the first), with its proto field path.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson

from apex_ingest.common.limits import (
    MAX_DATA_BYTES,
    MAX_DATA_DEPTH,
    MAX_EVENT_ID_CHARS,
    MAX_EVENTS,
    MAX_FUTURE,
    MAX_ID_CHARS,
    MAX_TYPE_CHARS,
    MAX_URL_CHARS,
    MAX_USER_AGENT_CHARS,
)
from apex_ingest.common.rpc import new_event_ids
from apex_ingest.server.errors import FieldViolation
from apex_ingest.server.redaction import redact_url
from apex_ingest.v1 import ingest_pb2

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: PostgreSQL stores JSON numbers as `numeric`: at most 16383 digits after the decimal point
#: once the exponent is applied, and an exponent below 2**30 in size.
MAX_NUMBER_SCALE = 16383
_MAX_EXPONENT = 2**30 - 1  # INT_MAX / 2 in numeric.c
#: Only a long exponent or a very long run of digits can break those limits (the data limit
#: caps a literal at 32 KiB); anything else skips the exact check.
_NUMBER_AT_RISK = re.compile(r"[eE][+-]?[0-9]{4}|[0-9]{15000}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Row = dict[str, Any]


def check_request_shape(request: ingest_pb2.IngestEventsRequest) -> list[FieldViolation]:
    """Rules on the request itself, checked before the project is looked up."""
    violations = []
    if not request.project_key:
        violations.append(FieldViolation("project_key", "is required"))
    elif project_key_problem(request.project_key):
        violations.append(FieldViolation("project_key", "is not a valid project key"))
    if request.user_id:
        problem = _id_problem(request.user_id, MAX_ID_CHARS)
        if problem:
            violations.append(FieldViolation("user_id", problem))
    if not request.events:
        violations.append(FieldViolation("events", "must hold at least 1 event"))
    elif len(request.events) > MAX_EVENTS:
        violations.append(FieldViolation("events", f"must hold at most {MAX_EVENTS} events"))
    if request.context.client_ip:
        try:
            ipaddress.ip_address(request.context.client_ip)
        except ValueError:
            violations.append(FieldViolation("context.client_ip", "is not an IP address"))
    return violations


def project_key_problem(key: str) -> str | None:
    """Why `key` can never be a project key, or None."""
    if not 1 <= len(key) <= MAX_ID_CHARS:
        return f"must be 1-{MAX_ID_CHARS} characters"
    if _CONTROL.search(key) or key != key.strip():
        return "must not contain control characters nor start or end with spaces"
    return None


def build_rows(
    request: ingest_pb2.IngestEventsRequest,
    received_at: datetime,
    violations: list[FieldViolation],
    retention: timedelta | None = None,
    redact_params: frozenset[str] = frozenset(),
    visitor_required: bool = False,
) -> list[Row]:
    """Validate every event, appending each problem to `violations`; return the valid rows.

    `retention` (APEX_RETENTION_DAYS): an event whose stored time (its timestamp, or the time
    of receipt) is older than `received_at - retention` is refused, since the next
    `db retention` would remove it. The rows' `url` and `referrer` are redacted (secret
    query parameters, plus `redact_params`) once the event is valid: the limits apply to what
    the client sent. `visitor_required`: an event without `visitor_id` is refused (a
    browser event of a project that is not cookieless: IngestEventsRequest.derive_visitor_id).
    """
    latest = received_at + MAX_FUTURE
    earliest = received_at - retention if retention is not None else None
    context = request.context
    user_id = request.user_id or None
    ip = normalized_ip(context.client_ip)
    user_agent = clean_user_agent(context.user_agent)
    rows: list[Row] = []
    for index, event in enumerate(request.events[:MAX_EVENTS]):
        prefix = f"events[{index}]."
        before = len(violations)

        event_id = event.id
        if event_id:
            problem = _id_problem(event_id, MAX_EVENT_ID_CHARS)
            if problem:
                violations.append(FieldViolation(prefix + "id", problem))
        else:
            event_id = new_event_ids(1)[0]

        problem = _type_problem(event.type)
        if problem:
            violations.append(FieldViolation(prefix + "type", problem))
        if event.visitor_id:
            problem = _id_problem(event.visitor_id, MAX_ID_CHARS)
            if problem:
                violations.append(FieldViolation(prefix + "visitor_id", problem))
        elif visitor_required:
            violations.append(FieldViolation(prefix + "visitor_id", "is required"))
        problem = _url_problem(event.url)
        if problem:
            violations.append(FieldViolation(prefix + "url", problem))
        if event.referrer:
            if len(event.referrer) > MAX_URL_CHARS:
                violations.append(
                    FieldViolation(
                        prefix + "referrer", f"must be at most {MAX_URL_CHARS} characters"
                    )
                )
            elif _CONTROL.search(event.referrer):
                violations.append(
                    FieldViolation(prefix + "referrer", "must not contain control characters")
                )
        data = event.data or "{}"
        problem = data_problem(data)
        if problem:
            violations.append(FieldViolation(prefix + "data", problem))

        occurred_at = received_at
        if event.HasField("timestamp"):
            ts = event.timestamp
            too_late = "must not be more than one day after the time of receipt"
            if not 0 <= ts.nanos <= 999_999_999:
                problem = "has invalid nanos"
            elif ts.seconds < 0:
                problem = "must not be before 1970-01-01T00:00:00Z"
            elif ts.seconds > (latest - _EPOCH).total_seconds():
                # Checked before building a datetime: seconds near 2**63 overflow it.
                problem = too_late
            else:
                occurred_at = _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
                if occurred_at > latest:
                    problem = too_late
                elif earliest is not None and occurred_at < earliest:
                    assert retention is not None
                    problem = (
                        f"must not be more than {retention.days} days before the time of "
                        "receipt (the retention period, APEX_RETENTION_DAYS): older events "
                        "are not kept"
                    )
                else:
                    problem = None
            if problem:
                violations.append(FieldViolation(prefix + "timestamp", problem))

        if len(violations) == before:
            rows.append(
                {
                    "event_id": event_id,
                    "type": event.type,
                    "visitor_id": event.visitor_id or None,
                    "user_id": user_id,
                    "url": redact_url(event.url, redact_params),
                    "referrer": redact_url(event.referrer, redact_params) or None,
                    "data": data,
                    "occurred_at": occurred_at,
                    "received_at": received_at,
                    "ip": ip,
                    "user_agent": user_agent,
                }
            )
    return rows


def clean_user_agent(user_agent: str) -> str | None:
    """The User-Agent as stored: without control characters, cut to 1024 characters."""
    return _CONTROL.sub("", user_agent)[:MAX_USER_AGENT_CHARS] or None


def normalized_ip(text: str) -> str | None:
    try:
        # "fe80::1%eth0": the zone names an interface of the proxy's host, meaningless here.
        return str(ipaddress.ip_address(text.partition("%")[0])) if text else None
    except ValueError:
        return None  # reported by check_request_shape


def _id_problem(value: str, max_chars: int) -> str | None:
    if len(value) > max_chars:
        return f"must be 1-{max_chars} characters"
    if _CONTROL.search(value):
        return "must not contain control characters"
    return None


def _type_problem(value: str) -> str | None:
    if not value:
        return "is required"
    if len(value) > MAX_TYPE_CHARS:
        return f"must be 1-{MAX_TYPE_CHARS} characters"
    if _CONTROL.search(value):
        return "must not contain control characters"
    return None


def _url_problem(url: str) -> str | None:
    if not url:
        return "is required"
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    if _CONTROL.search(url):
        return "must not contain control characters"
    if url.startswith("/"):
        # "//host/..." is a scheme-relative URL, not a path, and browsers read "/\host" so too.
        if url.startswith(("//", "/\\")):
            return "must be an absolute http(s) URL or a path"
        return None
    if url[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(url)
            _port = parts.port  # raises ValueError unless absent or 0-65535
            # A path or query may hold a raw space (servers send such URLs); a host may not.
            if parts.hostname and " " not in parts.hostname:
                return None
        except ValueError:
            pass
    return "must be an absolute http(s) URL or a path starting with /"


def data_problem(data: str) -> str | None:
    """Why `data` (JSON text) breaks the rules, or None."""
    # Measuring UTF-8 bytes needs an encode; skip it when the answer is certain.
    if len(data) > MAX_DATA_BYTES or (
        len(data) * 4 > MAX_DATA_BYTES
        and len(data.encode("utf-8", "surrogatepass")) > MAX_DATA_BYTES
    ):
        return f"must be at most {MAX_DATA_BYTES} bytes of JSON"
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "infinity" in exc.msg:
            return "holds a number beyond what a double can hold (about 1.8e308)"
        return f"must be a JSON object ({exc.msg})"
    if not isinstance(value, dict):
        return "must be a JSON object"
    # Both walks are only needed when the text could break the rule: fewer than
    # MAX_DATA_DEPTH brackets cannot nest deeper, and NUL is always escaped in JSON.
    if data.count("{") + data.count("[") > MAX_DATA_DEPTH and _depth(value) > MAX_DATA_DEPTH:
        return f"must not nest deeper than {MAX_DATA_DEPTH} levels"
    if "\\u0000" in data and _contains_nul(value):
        return "must not contain NUL (\\u0000) characters"
    if _NUMBER_AT_RISK.search(data) and not _numbers_storable(data):
        return (
            "holds a number that cannot be stored (at most "
            f"{MAX_NUMBER_SCALE} digits after the decimal point, exponent included)"
        )
    return None


class _Unstorable(Exception):
    pass


def _check_number(text: str) -> None:
    mantissa, _, exponent_text = text.lower().partition("e")
    digits = exponent_text.lstrip("+-").lstrip("0")
    if len(digits) > 10:
        raise _Unstorable
    exponent = int(exponent_text) if exponent_text else 0
    scale = len(mantissa.partition(".")[2]) - exponent
    if abs(exponent) >= _MAX_EXPONENT or scale > MAX_NUMBER_SCALE:
        raise _Unstorable


def _numbers_storable(data: str) -> bool:
    """Whether PostgreSQL can store every number literal of `data` (orjson reads 1e-20000 as 0)."""
    try:
        # The standard parser hands over each number's text; integers are never a problem.
        json.loads(data, parse_float=_check_number, parse_int=lambda _text: 0)
    except _Unstorable:
        return False
    return True


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        else:
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return deepest


def _contains_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            if any("\x00" in key for key in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
