"""Gateway settings: environment variables, overridable by create_app's test_config."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask, current_app

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The configuration keys the gateway reads; each is also the environment variable's name.
KEYS = (
    "APEX_GRPC_TARGET",
    "APEX_GRPC_TIMEOUT",
    "APEX_MAX_BODY_BYTES",
    "APEX_RATE_LIMIT",
    "APEX_RATE_LIMIT_STORAGE",
    "APEX_RATE_LIMIT_SHARED_FILE",
    "APEX_TRUSTED_PROXIES",
    "APEX_CORS_MAX_AGE",
)

DEFAULT_GRPC_PORT = 50051
DEFAULT_GRPC_TIMEOUT = 5.0
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_RATE_LIMIT = "100/second"
DEFAULT_RATE_LIMIT_STORAGE = "memory://"
DEFAULT_CORS_MAX_AGE = 86400

_EXTENSION_KEY = "apex_gateway.settings"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The parsed, validated gateway configuration of one app."""

    grpc_target: str
    grpc_timeout: float
    max_body_bytes: int
    rate_limit: str
    rate_limit_storage: str
    #: Set by `apex-ingest gateway`/`serve` for their workers (gateway/shared_windows.py).
    rate_limit_shared_file: str
    trusted_proxies: tuple[IPNetwork, ...]
    cors_max_age: int

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> GatewaySettings:
        """Build settings from config values (strings from the environment, or typed values).

        Raises ValueError naming the key on a bad value, so a misconfigured gateway fails at
        start-up rather than on its first request.
        """
        target = str(values.get("APEX_GRPC_TARGET") or "").strip() or default_grpc_target(
            os.environ
        )
        timeout = _number(values, "APEX_GRPC_TIMEOUT", DEFAULT_GRPC_TIMEOUT)
        max_body = _integer(values, "APEX_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
        max_age = _integer(values, "APEX_CORS_MAX_AGE", DEFAULT_CORS_MAX_AGE)
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError("APEX_GRPC_TIMEOUT must be a positive number of seconds")
        if max_body <= 0:
            raise ValueError("APEX_MAX_BODY_BYTES must be a positive number of bytes")
        if max_age < 0:
            raise ValueError("APEX_CORS_MAX_AGE must not be negative")
        rate_limit = str(values.get("APEX_RATE_LIMIT") or DEFAULT_RATE_LIMIT).strip()
        rate_limit_storage = str(
            values.get("APEX_RATE_LIMIT_STORAGE") or DEFAULT_RATE_LIMIT_STORAGE
        ).strip()
        _check_rate_limit(rate_limit, rate_limit_storage)
        return cls(
            grpc_target=target,
            grpc_timeout=timeout,
            max_body_bytes=max_body,
            rate_limit=rate_limit,
            rate_limit_storage=rate_limit_storage,
            rate_limit_shared_file=str(values.get("APEX_RATE_LIMIT_SHARED_FILE") or "").strip(),
            trusted_proxies=parse_networks(values.get("APEX_TRUSTED_PROXIES")),
            cors_max_age=max_age,
        )


def _check_rate_limit(limit: str, storage: str) -> None:
    # Imported here: `limits` is only needed once settings are read.
    from limits import parse_many
    from limits.errors import ConfigurationError
    from limits.storage import storage_from_string

    try:
        parse_many(limit)
    except ValueError:
        raise ValueError(
            f"APEX_RATE_LIMIT must be like 100/second or 100/second;5000/hour, got {limit!r}"
        ) from None
    try:
        storage_from_string(storage)  # builds a client; connects only when first used
    except ConfigurationError as exc:
        raise ValueError(f"APEX_RATE_LIMIT_STORAGE: {exc} ({storage!r})") from None


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The gateway's keys that are set in ``environ``."""
    return {key: environ[key] for key in KEYS if environ.get(key)}


def default_grpc_target(environ: Mapping[str, str]) -> str:
    """Where ``apex-ingest serve`` puts the gRPC server: APEX_HOST (loopback if unset) and port."""
    port = environ.get("APEX_GRPC_PORT") or str(DEFAULT_GRPC_PORT)
    host = environ.get("APEX_HOST", "").strip()
    # A wildcard bind address is not something to connect to.
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_networks(value: object) -> tuple[IPNetwork, ...]:
    """Parse a comma-separated string (or a sequence) of IP addresses and CIDR blocks."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    networks: list[IPNetwork] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ValueError(
                f"APEX_TRUSTED_PROXIES: {text!r} is not an IP address or CIDR"
            ) from exc
    return tuple(networks)


def _number(values: Mapping[str, object], key: str, default: float) -> float:
    value = values.get(key)
    if value is None or value == "":
        return default
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key}: {value!r} is not a number") from exc


def _integer(values: Mapping[str, object], key: str, default: int) -> int:
    value = values.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError as exc:
        raise ValueError(f"{key}: {value!r} is not a whole number") from exc


def positive_int_env(name: str) -> int | None:
    """A whole number of at least 1 from the environment; None if unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive whole number, got {raw!r}")
    return int(raw)


def install(app: Flask, settings: GatewaySettings) -> None:
    app.extensions[_EXTENSION_KEY] = settings


def get_settings(app: Flask | None = None) -> GatewaySettings:
    """The settings of ``app`` (default: the current app)."""
    target = app if app is not None else current_app
    settings: GatewaySettings = target.extensions[_EXTENSION_KEY]
    return settings
