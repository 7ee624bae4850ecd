"""The gateway's settings on its Flask app (read by apex_ingest.common.settings)."""

from __future__ import annotations

from flask import Flask, current_app

from apex_ingest.common.settings import GatewaySettings, IPNetwork

__all__ = ["GatewaySettings", "IPNetwork", "get_settings", "install"]

_EXTENSION_KEY = "apex_gateway.settings"


def install(app: Flask, settings: GatewaySettings) -> None:
    app.extensions[_EXTENSION_KEY] = settings


def get_settings(app: Flask | None = None) -> GatewaySettings:
    """The settings of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    settings: GatewaySettings = target.extensions[_EXTENSION_KEY]
    return settings
