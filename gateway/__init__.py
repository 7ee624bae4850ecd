"""Apex Ingest's JSON gateway: the public POST /api/events in front of the gRPC server.

It talks to the server only through the generated stubs in apex_ingest.v1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_cors import CORS

from gateway import (
    api,
    config,
    debugger,
    errors,
    grpc_client,
    health,
    observability,
    ratelimit,
    shutdown,
)
from gateway.json_codec import OrjsonProvider

#: Headers a browser script may read from our answers, to pace itself.
EXPOSED_HEADERS = ["Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"]


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the gateway app; configuration comes from the environment, then ``test_config``."""
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    if test_config is not None:
        app.config.from_mapping(test_config)
    # The environment, overridden by test_config's APEX_* keys; ConfigError names a bad one.
    settings = config.GatewaySettings.from_config(app.config)
    config.install(app, settings)
    # First: its hooks then see every request (request id, timing), even those refused early.
    observability.install(app)

    errors.register_error_handlers(app)
    # Registered before the limiter so it runs after the limiter's header hook (Flask runs
    # after_request functions in reverse order).
    app.after_request(errors.fix_retry_after)

    grpc_client.install(app)
    shutdown.install(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(debugger.bp)
    _register_snippet(app)
    ratelimit.install(app, settings, limited=api.bp)
    CORS(
        app,
        resources={r"/api/*": {"origins": "*"}},
        methods=["POST", "GET", "OPTIONS"],
        allow_headers=["Content-Type", "Content-Encoding", "X-Request-ID"],
        expose_headers=EXPOSED_HEADERS,
        max_age=settings.cors_max_age,
        # "*" rather than echoing the Origin: the answer is the same for every site (any
        # per-project allowlist is enforced by the server with a 403), so caches can share it.
        send_wildcard=True,
        vary_header=False,
    )
    return app


def _register_snippet(app: Flask) -> None:
    try:
        from gateway.snippet import snippet_bp  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as missing:
        if missing.name != "gateway.snippet":
            raise
        # The browser snippet lands separately; the API works without it.
        return
    app.register_blueprint(snippet_bp)
