"""GET /healthz for load balancers, and GET / describing the service."""

from __future__ import annotations

from flask import Blueprint, Response

from gateway import shutdown
from gateway.grpc_client import get_client
from gateway.json_codec import json_response

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    # The gateway is only as healthy as the server behind it: with the server NOT_SERVING
    # (storage down) or unreachable, a load balancer should send traffic elsewhere; and so
    # while this worker drains before it stops.
    status = "DRAINING" if shutdown.draining() else get_client().health()
    if status == "SERVING":
        return json_response({"status": status})
    response = json_response({"status": status}, 503)
    response.headers["Retry-After"] = "1"  # every 503 says when to come back
    return response


@bp.get("/")
def index() -> Response:
    return json_response(
        {
            "name": "Apex Ingest",
            "description": (
                "Event ingestion. POST events (one browser event, or a batch from a server) "
                'as JSON to /api/events; the answer is {"received": N}.'
            ),
            "links": {
                "events": "/api/events",
                "openapi": "/api/openapi.json",
                "health": "/healthz",
                "snippet": "/apex.js",
            },
        }
    )
