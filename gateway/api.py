"""The public API: POST /api/events, and its OpenAPI document.

POST /api/events is one explicit pipeline: parse the body, count it against the rate limit,
send it to the ingest server (through this worker's coalescer), answer. Flask's hooks do only
what every request needs: request id, metrics and access log (gateway.observability) and
Connection: close while draining (gateway.shutdown).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import grpc
from flask import Blueprint, Response, g

from apex_ingest.common.rpc import within
from apex_ingest.v1 import ingest_pb2
from gateway import partial, ratelimit
from gateway.auth_guard import get_guard
from gateway.coalescer import Coalescer, get_coalescer
from gateway.errors import (
    ApiError,
    FieldViolation,
    handle_http_exception,
    invalid,
    wait_for_pending_read,
)
from gateway.grpc_client import get_client
from gateway.grpc_errors import to_api_error
from gateway.json_codec import json_response
from gateway.payload import Payload, refused_request
from gateway.request_state import ParsedBody, parsed_body, request_context

bp = Blueprint("api", __name__)


@bp.post("/api/events")
def ingest_events() -> Response:
    coalescer = get_coalescer()
    # While it is in the view, a call about to leave may wait a moment for requests like it
    # (APEX_COALESCE_LINGER_MS at most).
    arrival = coalescer.announce()
    try:
        parsed = parsed_body()  # read and parse, once; an error is answered after the rate limit
        return _ingest(parsed, coalescer)
    finally:
        arrival.leave()


#: A body refused for these (timeout, size, type or encoding) is refused for them even past a
#: rate limit: "a transport or size limit never reads as a rate limit" (CONTRACT.md), or a
#: client would retry, after Retry-After, a body that can never be accepted. It still counts.
_NEVER_RATE_LIMITED = frozenset({408, 413, 415})


def _ingest(parsed: ParsedBody, coalescer: Coalescer) -> Response:
    outcome = None
    try:
        try:
            outcome = ratelimit.check()  # keyed by the key's project (or key), else the client's IP
        except ratelimit.RateLimited:
            if parsed.error is None or parsed.error.code not in _NEVER_RATE_LIMITED:
                raise
        if parsed.error is not None:
            raise parsed.error
        assert parsed.payload is not None
        request = parsed.payload.request
        context = request_context()
        request.context.CopyFrom(context)
        request.context.request_id = g.get("apex_request_id", "")
        guard = get_guard()
        refusal = guard.check(request.project_key, context.client_ip)
        if refusal is not None:
            raise refusal  # a key refused a moment ago, or too many unknown keys from here
        prepared = partial.prepare(parsed.payload)
        if prepared is not None:  # a partial batch: one call of its own (its answer has more)
            response = _partial(prepared)
            if outcome is not None:
                ratelimit.add_headers(response, outcome)
            return response
        if parsed.payload.violations:
            raise _every_violation(parsed.payload)
        try:
            received = coalescer.ingest(request)
        except grpc.RpcError as exc:
            error = to_api_error(exc, parsed.payload.snippet)
            if error.code == 401:
                guard.refused(request.project_key)
                get_client().known_keys.forget(request.project_key)  # revoked: not the project's
            elif error.code in (400, 403):  # the key was known: only the content was refused
                guard.accepted(request.project_key)
            raise error from None
        guard.accepted(request.project_key)
        response = json_response({"received": received})
    except ApiError as error:
        if isinstance(error, ratelimit.RateLimited):
            outcome = error.outcome
        response = handle_http_exception(error)
        if error is not parsed.error:  # e.g. a 429 for a body whose read is still pending
            wait_for_pending_read(response, parsed.error)
    if outcome is not None:
        ratelimit.add_headers(response, outcome)
    return response


def _partial(prepared: partial.PartialRequest) -> Response:
    request = prepared.request
    request.context.request_id = g.get("apex_request_id", "")
    try:
        answer = get_client().ingest_response(request)
    except grpc.RpcError as exc:
        error = to_api_error(exc, prepared.snippet)
        if error.code == 401:  # revoked: its requests no longer count under the project
            get_client().known_keys.forget(request.project_key)
        raise error from None
    refused = prepared.refused()
    if refused is not None:  # its events with type errors: kept too, as dead letters
        found = _record_refused(refused, prepared.snippet)
        prepared.found(found[0] if found is not None else ())
    return json_response(prepared.answer(answer.received, answer.rejected))


def _record_refused(
    refused: ingest_pb2.RecordRefusedRequest, snippet: bool
) -> tuple[tuple[FieldViolation, ...], int] | None:
    """Have the server keep the events of a request refused for type errors as dead letters.
    Its own violations as it listed them, and how many it found in all (none if it cannot say:
    unknown key, server down); None from a server older than RecordRefused, which keeps
    nothing."""
    try:
        get_client().record_refused(refused)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        error = to_api_error(exc, snippet)
        return (error.details, error.total) if error.code == 400 else ((), 0)
    return (), 0


def _every_violation(payload: Payload) -> ApiError:
    """The body's type errors, and the value errors the server finds in its other fields.

    The server keeps the events as dead letters, with every violation (RecordRefused), and
    answers only its violations outside the fields reported here; one older than that RPC is
    asked with validate_only instead (nothing kept). If the server cannot say (unknown key,
    server down), the type errors alone are the answer.
    """
    refused = refused_request(payload.request, payload.violations, payload.snippet)
    found = _record_refused(refused, payload.snippet)
    if found is None:
        older = _validate_only(payload)
        found = older, len(older)
    details, count = found
    return invalid([*payload.violations, *details], len(payload.violations) + count)


def _validate_only(payload: Payload) -> tuple[FieldViolation, ...]:
    """The value errors a server older than RecordRefused finds (validate_only), outside the
    fields with type errors (which went to it empty: their "is required" is no news) and the
    address that made it refuse."""
    payload.request.validate_only = True
    # A server older than validate_only ignores it (an unknown field) and would store the
    # well-typed events; an address that is not one makes every server refuse the request.
    payload.request.context.client_ip = _NOT_AN_ADDRESS
    try:
        get_client().ingest(payload.request)
    except grpc.RpcError as exc:
        error = to_api_error(exc, payload.snippet)
        if error.code != 400:
            return ()
        reported = [v.field for v in payload.violations] + ["context.client_ip"]
        return tuple(
            v for v in error.details if not any(within(v.field, field) for field in reported)
        )
    return ()


_NOT_AN_ADDRESS = "validate-only"


@bp.get("/api/openapi.json")
def openapi_document() -> Response:
    return Response(_openapi_bytes(), mimetype="application/json")


@cache
def _openapi_bytes() -> bytes:
    return resources.files("gateway").joinpath("openapi.json").read_bytes()
