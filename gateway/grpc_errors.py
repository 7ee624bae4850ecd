"""gRPC status to HTTP: the status code, the contract's error body, and Retry-After."""

from __future__ import annotations

import logging

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from apex_ingest.common.rpc import field_violations, retry_delay, violation_count
from gateway.errors import (
    ApiError,
    FieldViolation,
    body_error,
    header_error,
    invalid,
    unauthorized,
)
from gateway.payload import public_field

log = logging.getLogger(__name__)

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    # Transient server-side conditions where nothing was stored: come back later.
    grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: The server writes these messages for its callers; pass them on. Other statuses get the
#: gateway's generic message so that no internal detail reaches the public.
_FORWARD_MESSAGE = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_MAX_MESSAGE = 300


def to_api_error(error: grpc.RpcError, snippet: bool) -> ApiError:
    """The HTTP answer for a failed IngestEvents call."""
    code: grpc.StatusCode = error.code()
    status = _HTTP_STATUS.get(code, 502)
    rich = _rich_status(error)
    if status >= 500:
        log.warning("IngestEvents failed: %s %r", code.name, error.details())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = [
            FieldViolation(public_field(field, snippet), description)
            for field, description in field_violations(rich)
        ]
        return invalid(violations, violation_count(rich))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay(rich) is None:
        # Not the server saying "come back later" (that carries RetryInfo) but a transport
        # limit: waiting cannot help, so it must never read as a rate limit.
        text = error.details() or ""
        log.warning("IngestEvents hit a transport limit: %r", text)
        if "message larger than max" in text:
            return body_error(
                413,
                "The request is too large for the ingest server.",
                "is too large for the ingest server",
            )
        return ApiError(502, "The ingest server's answer exceeded a transport limit.")
    message = None
    if code in _FORWARD_MESSAGE:
        message = (error.details() or "")[:_MAX_MESSAGE] or None
    if status == 401:
        return unauthorized(message)
    if status == 403:  # the only refusal for PERMISSION_DENIED: the project's origin allowlist
        return header_error(403, "Origin", message or "", "is not allowed for this project")
    retry_after = retry_delay(rich) if status in (429, 503) else None
    return ApiError(status, message, retry_after=retry_after)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        # Details that disagree with the call's own status: trust the status, drop the details.
        return None
    return status
