"""The contract's error body, and JSON error handlers for every HTTP error."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException, InternalServerError

from apex_ingest.common.rpc import listed_count
from gateway.json_codec import json_response

log = logging.getLogger(__name__)

#: Stable machine-readable codes, one per HTTP status the gateway answers with.
#: Documented in openapi.json; clients may branch on them, so never rename one.
CODES: dict[int, str] = {
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

MESSAGES: dict[int, str] = {
    400: "The request is invalid.",
    401: "Unknown or revoked project key.",
    403: "This request is not allowed for the project.",
    404: "No such endpoint.",
    405: "Method not allowed.",
    408: "The request body was not received in time.",
    413: "The request body is too large.",
    415: "Unsupported content type or encoding.",
    429: "Too many requests; retry after the number of seconds in Retry-After.",
    500: "Internal error.",
    502: "The ingest server gave an unexpected answer.",
    503: "The service is temporarily unavailable; retry after Retry-After seconds.",
    504: "The ingest server did not answer in time.",
}

#: Statuses that tell the client to come back later; they always carry Retry-After.
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending field, named by its public JSON path (e.g. ``events[2].visitorId``)."""

    field: str
    description: str


class ApiError(HTTPException):
    """An HTTP error with the contract's body: a stable code, a message and field details."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        details: Iterable[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(description=message or MESSAGES.get(status, ""))
        self.code = status
        self.details: tuple[FieldViolation, ...] = tuple(details)
        #: How many violations there are in all (`invalid`: more than `details` may list).
        self.total = len(self.details)
        self.retry_after = retry_after


def invalid(details: Sequence[FieldViolation], total: int | None = None) -> ApiError:
    """400 listing the violations, as many as fit in the budget the server's answers keep
    (rpc.listed_count: about 4 KiB); its message counts them all, `total` if more exist than
    `details` holds (the server listed only some of its own)."""
    count = max(total or 0, len(details))
    listed = details[: listed_count((d.field, d.description) for d in details)]
    if count > len(listed):
        message = f"The request has {count} invalid fields; the first {len(listed)} are listed."
    else:
        message = f"The request has {count} invalid field{'s' if count != 1 else ''}."
    error = ApiError(400, message, listed)
    error.total = count
    return error


#: The `field` of a violation of the body as a whole (not JSON, too large, late, corrupt gzip).
#: A header at fault is named by the header (`Content-Type`, `Content-Encoding`, `Origin`).
BODY = "body"


def body_error(status: int, message: str, description: str) -> ApiError:
    """A refusal of the body as a whole, its one violation naming `body`."""
    return ApiError(status, message, [FieldViolation(BODY, description)])


def header_error(status: int, header: str, message: str, description: str) -> ApiError:
    """A refusal for one request header, its one violation naming the header."""
    return ApiError(status, message, [FieldViolation(header, description)])


def unauthorized(message: str | None = None) -> ApiError:
    """401: the body's projectKey is unknown or revoked, named as the offending field."""
    return ApiError(401, message, [FieldViolation("projectKey", "is unknown or revoked")])


def error_body(status: int, message: str, details: Iterable[FieldViolation] = ()) -> object:
    return {
        "error": {
            "code": error_code(status),
            "message": message,
            "details": [{"field": d.field, "description": d.description} for d in details],
        }
    }


def error_code(status: int) -> str:
    if status in CODES:
        return CODES[status]
    return "invalid_request" if status < 500 else "internal_error"


def retry_after_seconds(seconds: float | None) -> int:
    """Retry-After is whole seconds; round up so clients never come back too early."""
    if seconds is None or not math.isfinite(seconds):
        return 1
    return max(1, math.ceil(seconds))


def wait_for_pending_read(response: Response, error: BaseException | None) -> None:
    """If `error` left a body read pending (gateway.body.BodyTimeout), `response` waits for the
    reader when the server closes it, and closes the connection: a request that ends while its
    read is pending stalls granian's worker."""
    wait_for_reader = getattr(error, "wait_for_reader", None)
    if wait_for_reader is not None:
        response.direct_passthrough = False  # so that the server calls close()
        response.call_on_close(wait_for_reader)
        response.headers["Connection"] = "close"


def handle_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    if isinstance(exc, ApiError):
        message, details = exc.description or MESSAGES.get(status, ""), exc.details
    else:
        # werkzeug's own descriptions are written for HTML pages and name no fields.
        message, details = MESSAGES.get(status, exc.name), ()
    response = json_response(error_body(status, message, details), status)
    wait_for_pending_read(response, exc)
    # Keep what werkzeug puts in headers (Allow on 405, Retry-After on 429/503).
    for name, value in exc.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    if status in RETRY_STATUSES:
        if isinstance(exc, ApiError):
            # The server said when to come back (RetryInfo); that, not the rate-limit window.
            g.apex_retry_after = retry_after_seconds(exc.retry_after)
            response.headers["Retry-After"] = str(g.apex_retry_after)
        elif "Retry-After" not in response.headers:
            response.headers["Retry-After"] = "1"
    return response


def handle_unexpected(exc: Exception) -> Response:
    # Reached only by a bug: log it with the traceback, answer with the contract's shape.
    log.exception("unhandled error in the gateway", exc_info=exc)
    return handle_http_exception(InternalServerError())


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
