"""The public API: POST /api/events, and its OpenAPI document."""

from __future__ import annotations

from functools import cache
from importlib import resources

import grpc
from flask import Blueprint, Response

from gateway.errors import FieldViolation, invalid
from gateway.grpc_client import get_client
from gateway.grpc_errors import to_api_error
from gateway.json_codec import json_response
from gateway.payload import Payload
from gateway.request_state import parsed_body, request_context

bp = Blueprint("api", __name__)


@bp.post("/api/events")
def ingest_events() -> Response:
    parsed = parsed_body()
    if parsed.error is not None:
        raise parsed.error
    assert parsed.payload is not None
    request = parsed.payload.request
    request.context.CopyFrom(request_context())
    if parsed.payload.violations:
        raise invalid(_every_violation(parsed.payload))
    try:
        received = get_client().ingest(request)
    except grpc.RpcError as exc:
        raise to_api_error(exc, parsed.payload.snippet) from None
    return json_response({"received": received})


def _every_violation(payload: Payload) -> list[FieldViolation]:
    """The body's type errors, and the value errors the server finds in its other fields.

    If the server cannot say (unknown key, server down), the type errors alone are the answer.
    """
    payload.request.validate_only = True
    # A server older than validate_only ignores it (an unknown field) and would store the
    # well-typed events; an address that is not one makes every server refuse the request.
    payload.request.context.client_ip = _NOT_AN_ADDRESS
    try:
        get_client().ingest(payload.request)
        found: tuple[FieldViolation, ...] = ()
    except grpc.RpcError as exc:
        error = to_api_error(exc, payload.snippet)
        found = error.details if error.code == 400 else ()
    reported = [v.field for v in payload.violations] + ["context.client_ip"]
    # A field with a type error went to the server empty: its "is required" is no news.
    return [
        *payload.violations,
        *(v for v in found if not any(_within(v.field, field) for field in reported)),
    ]


_NOT_AN_ADDRESS = "validate-only"


def _within(field: str, reported: str) -> bool:
    return field == reported or field.startswith((reported + ".", reported + "["))


@bp.get("/api/openapi.json")
def openapi_document() -> Response:
    return Response(_openapi_bytes(), mimetype="application/json")


@cache
def _openapi_bytes() -> bytes:
    return resources.files("gateway").joinpath("openapi.json").read_bytes()
