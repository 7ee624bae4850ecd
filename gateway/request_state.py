"""What the gateway works out about the current request, once, cached on flask.g.

The view parses the body first (gateway.api); the rate limiter's key (the body's projectKey) and
the metrics read the same parse through parsed_body(), so the body is read and parsed once.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import g, request

from apex_ingest.v1 import ingest_pb2
from gateway import json_codec
from gateway.body import read_body
from gateway.client_ip import client_ip as resolve_client_ip
from gateway.config import get_settings
from gateway.errors import ApiError, body_error, invalid
from gateway.payload import Payload, parse_request, too_deep


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """The outcome of reading and translating the body: a payload, or the error to answer."""

    #: The body's projectKey if it has a string one (even when the body is otherwise invalid).
    project_key: str
    payload: Payload | None
    error: ApiError | None


def parsed_body() -> ParsedBody:
    parsed: ParsedBody | None = g.get("apex_parsed_body")
    if parsed is None:
        parsed = _parse_body()
        g.apex_parsed_body = parsed
    return parsed


def _parse_body() -> ParsedBody:
    try:
        settings = get_settings()
        raw = read_body(request, settings.max_body_bytes, settings.body_timeout or None)
        payload = parse_request(raw)
    except ApiError as exc:
        return ParsedBody("", None, exc)
    except json_codec.JSONSyntaxError as exc:
        deep = too_deep(raw) if isinstance(exc, json_codec.JSONTooDeep) else None
        if deep is not None:  # valid JSON, too deep to read: name where (CONTRACT: each field)
            return ParsedBody("", None, invalid([deep]))
        refused = body_error(400, f"The body is not valid JSON: {exc}", f"is not valid JSON: {exc}")
        return ParsedBody("", None, refused)
    return ParsedBody(payload.request.project_key, payload, None)


def client_ip() -> str:
    ip: str | None = g.get("apex_client_ip")
    if ip is None:
        ip = resolve_client_ip(request.environ, get_settings().trusted_proxies)
        g.apex_client_ip = ip
    return ip


def request_context() -> ingest_pb2.RequestContext:
    """Who sent the request, as the server should record and check it."""
    return ingest_pb2.RequestContext(
        client_ip=client_ip(),
        user_agent=request.headers.get("User-Agent", ""),
        origin=request.headers.get("Origin", ""),
    )
