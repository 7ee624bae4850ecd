"""The gateway's Flask app: `create_app(test_config)` (gateway.wsgi:app is `create_app()`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from gateway import (
    api,
    auth_guard,
    coalescer,
    config,
    cors,
    debugger,
    errors,
    grpc_client,
    health,
    observability,
    ratelimit,
    shutdown,
)
from gateway.json_codec import OrjsonProvider
from gateway.sessions import NoSessions


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the gateway app; configuration comes from the environment, then ``test_config``."""
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.session_interface = NoSessions()
    if test_config is not None:
        app.config.from_mapping(test_config)
    # The environment, overridden by test_config's APEX_* keys; ConfigError names a bad one.
    settings = config.GatewaySettings.from_config(app.config)
    config.install(app, settings)
    # First: its hooks then see every request (request id, timing), even those refused early.
    observability.install(app)

    errors.register_error_handlers(app)

    coalescer.install(app, grpc_client.install(app))
    shutdown.install(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(debugger.bp)
    _register_snippet(app)
    auth_guard.install(app, settings)
    ratelimit.install(app, settings)
    cors.install(app, settings.cors_max_age)
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
