"""Per-project rate limits with Flask-Limiter.

A request counts once whatever the number of events it carries. The key is the body's
projectKey, so the key function needs the parsed body: it reuses the one parse of the request
(cached on flask.g by gateway.api). Bodies without a usable projectKey are limited by client IP.
"""

from __future__ import annotations

from flask import Blueprint, Flask
from flask_limiter import Limiter

from gateway import request_state
from gateway.config import GatewaySettings

#: A projectKey longer than this cannot be real; don't let it become a storage key.
_MAX_KEY_LENGTH = 256


def rate_limit_key() -> str:
    project_key = request_state.parsed_body().project_key
    if project_key and len(project_key) <= _MAX_KEY_LENGTH:
        return f"project:{project_key}"
    return f"ip:{request_state.client_ip()}"


def install(app: Flask, settings: GatewaySettings, limited: Blueprint) -> Limiter:
    limiter = Limiter(
        key_func=rate_limit_key,
        storage_uri=settings.rate_limit_storage,
        strategy="fixed-window",
        key_prefix="apex",
        # X-RateLimit-Limit/-Remaining/-Reset on every counted answer, so clients can pace
        # themselves before they are refused.
        headers_enabled=True,
        # If Redis is unreachable, keep serving and limit per process instead of failing every
        # request: losing events is worse than a looser limit for a while.
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.init_app(app)
    # Only POST: CORS preflights must not use up the budget (nor be refused).
    limiter.limit(settings.rate_limit, methods=["POST"])(limited)
    return limiter
