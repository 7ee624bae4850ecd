"""The public API: POST /api/events, and its OpenAPI document."""

from __future__ import annotations

from functools import cache
from importlib import resources

import grpc
from flask import Blueprint, Response

from gateway.grpc_client import get_client
from gateway.grpc_errors import to_api_error
from gateway.json_codec import json_response
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
    try:
        received = get_client().ingest(request)
    except grpc.RpcError as exc:
        raise to_api_error(exc, parsed.payload.snippet) from None
    return json_response({"received": received})


@bp.get("/api/openapi.json")
def openapi_document() -> Response:
    return Response(_openapi_bytes(), mimetype="application/json")


@cache
def _openapi_bytes() -> bytes:
    return resources.files("gateway").joinpath("openapi.json").read_bytes()
