"""Checks every rule of the contract on a request and turns its events into rows.

Plain functions on the generated messages: no gRPC, no database. Every violation
is collected (not just the first), with its proto field path.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
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
from apex_ingest.server import enrichment
from apex_ingest.server.errors import FieldViolation
from apex_ingest.server.redaction import CACHED_URL_CHARS, redact_url
from apex_ingest.v1 import ingest_pb2

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control(value: str) -> bool:
    """Whether `value` holds a C0 or C1 control character (or DEL)."""
    # Printable ASCII (most ids, types and URLs) cannot: two C calls instead of a regex scan.
    if value.isascii() and value.isprintable():
        return False
    return _CONTROL.search(value) is not None


#: PostgreSQL stores JSON numbers as `numeric`: at most 16383 digits after the decimal point
#: once the exponent is applied, and an exponent below 2**30 in size.
MAX_NUMBER_SCALE = 16383
_MAX_EXPONENT = 2**30 - 1  # INT_MAX / 2 in numeric.c
#: Only a long exponent (always after a digit, in JSON) or a very long run of digits can break
#: those limits (the data limit caps a literal at 32 KiB); anything else skips the exact check.
# An exponent of 4 digits or more after a digit ([0-9][eE][+-]?[0-9]{4}), found by mapping every
# digit to 0 and E to e in C and searching for three fixed strings (`_has_long_exponent`): a
# third less time than the regular expression took, on every event's data.
_EXPONENT_FORM = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_DIGITS = 15000
_DIGIT_RUN = re.compile(f"[0-9]{{{_LONG_DIGITS}}}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Seconds since the epoch of the last second datetime can hold (9999-12-31T23:59:59Z).
_MAX_SECONDS = 253_402_300_799
#: A client clock off by less than this is not corrected: the measured skew includes the
#: request's time in transit (a slow mobile upload, a first connection: 1.1 s measured for the
#: gRPC SDK's first call on a busy machine), and correcting by it would move a correct clock's
#: events later, reordering them against the same client's other requests. Real skews are
#: minutes, hours (a wrong time zone) or years (docs/enrichment.md, "Clock skew").
SKEW_THRESHOLD = timedelta(seconds=10)
_BEFORE_EPOCH_CORRECTED = (
    "must not be before 1970-01-01T00:00:00Z once corrected by the client's clock skew "
    "(measured with the request's send time: sentAt, or sent_at over gRPC)"
)

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
    if request.context.client_ip and normalized_ip(request.context.client_ip) is None:
        violations.append(FieldViolation("context.client_ip", "is not an IP address"))
    return violations


def project_key_problem(key: str) -> str | None:
    """Why `key` can never be a project key, or None."""
    if not 1 <= len(key) <= MAX_ID_CHARS:
        return f"must be 1-{MAX_ID_CHARS} characters"
    if has_control(key) or key != key.strip():
        return "must not contain control characters nor start or end with spaces"
    return None


def build_rows(
    request: ingest_pb2.IngestEventsRequest,
    received_at: datetime,
    violations: list[FieldViolation],
    retention: timedelta | None = None,
    redact_params: frozenset[str] = frozenset(),
    ip_mode: str = "full",
    enrich: bool = True,
    visitor_required: bool = False,
) -> list[Row]:
    """Validate every event, appending each problem to `violations`; return the valid rows.

    Each row is enriched (apex_ingest/server/enrichment.py, docs/enrichment.md): its time is
    corrected by the client's clock skew when the request has `sent_at` (the client's own
    time kept in `client_occurred_at`, the skew in `clock_skew_ms`), the User-Agent, the
    country, the campaign and the referrer are parsed, and the IP is kept as `ip_mode` says
    (`full`, `truncated`, `none`), after the country was looked up. `enrich=False` derives
    nothing: for rows built only to name violations (an unauthenticated request must not
    make the server parse its User-Agent).

    `retention` (APEX_RETENTION_DAYS): an event whose stored time (its timestamp, or the time
    of receipt) is older than `received_at - retention` is refused, since the next
    `db retention` would remove it. The rows' `url` and `referrer` are redacted (secret
    query parameters, plus `redact_params`) once the event is valid: the limits apply to what
    the client sent. `visitor_required`: an event without `visitor_id` is refused (a
    browser event of a project that is not cookieless: IngestEventsRequest.derive_visitor_id).
    """
    latest = received_at + MAX_FUTURE
    latest_seconds = (latest - _EPOCH).total_seconds()
    earliest = received_at - retention if retention is not None else None
    context = request.context
    skew = _clock_skew(request, received_at, violations)
    skew_ms = None if skew is None else round(skew.total_seconds() * 1000)
    skew_seconds = 0.0 if skew is None else skew.total_seconds()
    # What every event of the request shares, computed once: the IP as the project keeps it,
    # the parsed User-Agent, the country (from the full IP, before it is reduced).
    user_agent = clean_user_agent(context.user_agent)
    user_id = request.user_id or None
    shared: Row = {
        "user_id": user_id,
        "received_at": received_at,
        "user_agent": user_agent,
        "clock_skew_ms": skew_ms,
        **enrichment.request_columns(normalized_ip(context.client_ip), user_agent, ip_mode, enrich),
    }
    rows: list[Row] = []
    for index, event in enumerate(request.events[:MAX_EVENTS]):
        prefix = f"events[{index}]."
        before = len(violations)
        # Each field read once: a read of a protobuf string field builds a new str.
        event_id, event_type, visitor_id = event.id, event.type, event.visitor_id
        url, referrer = event.url, event.referrer

        if event_id:
            problem = _id_problem(event_id, MAX_EVENT_ID_CHARS)
            if problem:
                violations.append(FieldViolation(prefix + "id", problem))
        else:
            event_id = new_event_ids(1)[0]

        problem = _type_problem(event_type)
        if problem:
            violations.append(FieldViolation(prefix + "type", problem))
        if visitor_id:
            problem = _id_problem(visitor_id, MAX_ID_CHARS)
            if problem:
                violations.append(FieldViolation(prefix + "visitor_id", problem))
        elif visitor_required:
            violations.append(FieldViolation(prefix + "visitor_id", "is required"))
        event_user_id = user_id
        own_user_id = event.user_id
        if own_user_id:
            problem = _id_problem(own_user_id, MAX_ID_CHARS)
            if problem:
                violations.append(FieldViolation(prefix + "user_id", problem))
            event_user_id = own_user_id
        previous_id = event.previous_id
        if previous_id or event_type in IDENTITY_TYPES:
            _check_identity(event_type, previous_id, event_user_id, prefix, violations)
        # identify and alias say who someone is, not where: their url is optional.
        if url or event_type not in IDENTITY_TYPES:
            problem = _url_problem(url)
            if problem:
                violations.append(FieldViolation(prefix + "url", problem))
        if referrer:
            if len(referrer) > MAX_URL_CHARS:
                violations.append(
                    FieldViolation(
                        prefix + "referrer", f"must be at most {MAX_URL_CHARS} characters"
                    )
                )
            elif has_control(referrer):
                violations.append(
                    FieldViolation(prefix + "referrer", "must not contain control characters")
                )
        data = event.data or "{}"
        problem = data_problem(data)
        if problem:
            violations.append(FieldViolation(prefix + "data", problem))

        occurred_at = received_at
        client_occurred_at = None
        if event.HasField("timestamp"):
            ts = event.timestamp
            seconds, nanos = ts.seconds, ts.nanos
            too_late = "must not be more than one day after the time of receipt"
            if skew:
                too_late += (
                    " (once corrected by the client's clock skew, measured with the request's"
                    " send time: sentAt, or sent_at over gRPC)"
                )
            if not 0 <= nanos <= 999_999_999:
                problem = "has invalid nanos"
            elif seconds < 0:
                problem = "must not be before 1970-01-01T00:00:00Z"
            elif seconds - skew_seconds > latest_seconds:
                # Checked before building a datetime: seconds near 2**63 overflow it.
                problem = too_late
            elif seconds > _MAX_SECONDS:
                problem = "must be before year 10000"
            elif seconds - skew_seconds < 0:
                problem = _BEFORE_EPOCH_CORRECTED
            else:
                client_occurred_at = _EPOCH + timedelta(0, seconds, nanos // 1000)
                occurred_at = client_occurred_at if not skew else client_occurred_at - skew
                if skew is not None and received_at < occurred_at <= latest:
                    # Still after the receipt once corrected: clamped (PostHog does the same),
                    # since nothing can have happened after the request arrived.
                    occurred_at = received_at
                if occurred_at > latest:
                    problem = too_late
                elif occurred_at < _EPOCH:
                    problem = _BEFORE_EPOCH_CORRECTED
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
            url = redact_url(url, redact_params)
            stored_referrer = redact_url(referrer, redact_params) or None
            row = {
                "event_id": event_id,
                "type": event_type,
                "visitor_id": visitor_id or None,
                "url": url,
                "referrer": stored_referrer,
                "data": data,
                "occurred_at": occurred_at,
                "client_occurred_at": client_occurred_at,
                **shared,
                "user_id": event_user_id,
                **enrichment.event_columns(url, stored_referrer, enrich),
            }
            if previous_id:
                # Not a column of `events`: storage.py turns it into an identity link.
                row[PREVIOUS_ID] = previous_id
            rows.append(row)
    return rows


#: Event types with a meaning of their own (proto/apex_ingest/v1/ingest.proto).
IDENTIFY, ALIAS = "identify", "alias"
IDENTITY_TYPES = frozenset({IDENTIFY, ALIAS})
#: The row key carrying an alias's previous id (never a column of `events`).
PREVIOUS_ID = "previous_id"


def _check_identity(
    event_type: str,
    previous_id: str,
    user_id: str | None,
    prefix: str,
    violations: list[FieldViolation],
) -> None:
    """identify needs a user id; alias a user id and a previous id; no other type takes one."""
    if previous_id:
        problem = _id_problem(previous_id, MAX_ID_CHARS)
        if problem:
            violations.append(FieldViolation(prefix + "previous_id", problem))
        elif event_type != ALIAS:
            violations.append(
                FieldViolation(prefix + "previous_id", 'is only for events of type "alias"')
            )
    elif event_type == ALIAS:
        violations.append(FieldViolation(prefix + "previous_id", "is required for an alias"))
    if event_type in IDENTITY_TYPES and not user_id:
        violations.append(
            FieldViolation(
                prefix + "user_id",
                f"is required for an {event_type} (the event's or the request's)",
            )
        )


def _clock_skew(
    request: ingest_pb2.IngestEventsRequest,
    received_at: datetime,
    violations: list[FieldViolation],
) -> timedelta | None:
    """The client's clock minus the server's, measured with the request's `sent_at`: None
    without one (or an invalid one, reported), zero when under SKEW_THRESHOLD."""
    if not request.HasField("sent_at"):
        return None
    sent = request.sent_at
    if not 0 <= sent.nanos <= 999_999_999:
        violations.append(FieldViolation("sent_at", "has invalid nanos"))
        return None
    if not 0 <= sent.seconds <= _MAX_SECONDS:
        violations.append(
            FieldViolation("sent_at", "must be between 1970-01-01 and 9999-12-31 (UTC)")
        )
        return None
    sent_at = _EPOCH + timedelta(seconds=sent.seconds, microseconds=sent.nanos // 1000)
    skew = sent_at - received_at
    return skew if abs(skew) >= SKEW_THRESHOLD else timedelta(0)


def clean_user_agent(user_agent: str) -> str | None:
    """The User-Agent as stored: without control characters, cut to 1024 characters."""
    return _CONTROL.sub("", user_agent)[:MAX_USER_AGENT_CHARS] or None


# Every request is checked and then stored with its client's IP: one parse serves both (a few
# µs each, ~1 % of a snippet request's CPU in the gRPC process); bounded, as clients choose it.
@lru_cache(maxsize=4096)
def normalized_ip(text: str) -> str | None:
    """`text` as stored, or None if it is not an IP address (check_request_shape reports it)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # "fe80::1%eth0": the zone names an interface of the proxy's host, meaningless here.
    return str(address).partition("%")[0]


def _id_problem(value: str, max_chars: int) -> str | None:
    if len(value) > max_chars:
        return f"must be 1-{max_chars} characters"
    if has_control(value):
        return "must not contain control characters"
    return None


def _type_problem(value: str) -> str | None:
    if not value:
        return "is required"
    if len(value) > MAX_TYPE_CHARS:
        return f"must be 1-{MAX_TYPE_CHARS} characters"
    if has_control(value):
        return "must not contain control characters"
    return None


def _url_problem(url: str) -> str | None:
    if not url:
        return "is required"
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    return _url_form_problem(url) if len(url) <= CACHED_URL_CHARS else _url_form(url)


def _url_form(url: str) -> str | None:
    if has_control(url):
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


# A site's pages repeat from one event to the next: each URL's form is judged once (as each is
# redacted once: redaction.CACHED_URL_CHARS).
_url_form_problem = lru_cache(maxsize=2048)(_url_form)


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
    at_risk = _has_long_exponent(data) or (len(data) >= _LONG_DIGITS and _DIGIT_RUN.search(data))
    if at_risk and not _numbers_storable(data):
        return (
            "holds a number that cannot be stored (at most "
            f"{MAX_NUMBER_SCALE} digits after the decimal point, exponent included)"
        )
    return None


def _has_long_exponent(data: str) -> bool:
    form = data.encode("utf-8", "surrogatepass").translate(_EXPONENT_FORM)
    return b"0e0000" in form or b"0e+0000" in form or b"0e-0000" in form


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
