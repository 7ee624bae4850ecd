"""``ApexError``: why events were not delivered, as handed to ``on_error``."""

from __future__ import annotations

import email.utils
import http.client
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["CLIENT_CODES", "SERVER_CODES", "ApexError", "ErrorCallback"]

#: The gateway's error codes, one per HTTP status (its ``gateway/errors.py`` ``CODES``, copied;
#: the repository's tests check the copy). An answer that does not carry the gateway's JSON
#: error body (a proxy's HTML page, say) gets the code of its status from this table, or
#: ``"http_<status>"`` for a status the gateway never sends (a redirect, for instance).
SERVER_CODES: Final[Mapping[int, str]] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}

#: The client's own codes, for failures that got no answer from the server (``status`` None).
CLIENT_CODES: Final = (
    "queue_full",
    "closed",
    "network_error",
    "not_a_gateway",
    "shutdown",
    "internal_error",
)


class ApexError(Exception):
    """Why events were not delivered; handed to ``on_error`` together with those events.

    ``code`` is the gateway's error code (``"invalid_request"``, ``"unauthorized"``,
    ``"forbidden"``, ``"payload_too_large"``, ``"unsupported_media_type"``, ``"rate_limited"``,
    ``"unavailable"``, ``"timeout"``, ...: see ``SERVER_CODES``) or, for failures that never got
    an answer (``status`` None), one of the client's own: ``"queue_full"``, ``"closed"``
    (tracked after ``close()``), ``"network_error"``, ``"not_a_gateway"`` (the host answered in
    another protocol, e.g. a gRPC port: never retried), ``"shutdown"`` (``close()`` gave up
    waiting) and ``"internal_error"`` (a bug in the client). With ``Apex(partial=True)``,
    ``"rejected"`` (status 200): the server stored the batch's other events, not these.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: HTTP status of the final answer; None when no answer was received.
        self.status = status
        #: ``(field, description)`` pairs from the server's error details. Field paths such as
        #: ``events[2].url`` index the ``events`` list handed to ``on_error`` with this error.
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        #: Seconds from the answer's ``Retry-After`` header, if it had one.
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        text = f"{where}{self.code}: {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text

    def __repr__(self) -> str:
        return f"ApexError({self.message!r}, code={self.code!r}, status={self.status!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling (multiprocessing queues).
        return (
            _rebuild,
            (self.message, self.code, self.status, self.field_violations, self.retry_after),
        )


def _rebuild(
    message: str,
    code: str,
    status: int | None,
    violations: list[tuple[str, str]],
    retry_after: float | None,
) -> ApexError:
    return ApexError(
        message, code=code, status=status, field_violations=violations, retry_after=retry_after
    )


#: ``on_error(error, events)``: ``events`` are the undelivered events as JSON objects, as they
#: were (or would have been) sent: ``"userId"`` included, when the event had one.
ErrorCallback = Callable[[ApexError, list[dict[str, Any]]], None]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(status: int, retry_after_header: str | None, body: bytes) -> ApexError:
    """The ``ApexError`` for a non-2xx answer: the gateway's JSON error body when it is one."""
    retry_after = parse_retry_after(retry_after_header)
    fallback_code = SERVER_CODES.get(status, f"http_{status}")
    try:
        payload = json.loads(body)
        error = payload["error"]
        code = str(error.get("code") or fallback_code)
        message = str(error.get("message") or "")
        violations = [
            (str(d.get("field", "")), str(d.get("description", "")))
            for d in error.get("details") or []
            if isinstance(d, dict)
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        # Not the gateway's JSON (a proxy's HTML page, say): keep a readable excerpt.
        code = fallback_code
        message = body[:500].decode("utf-8", "replace").strip()
        violations = []
    return ApexError(
        message or http.client.responses.get(status, "error"),
        code=code,
        status=status,
        field_violations=violations,
        retry_after=retry_after,
    )
