"""Failed authentication is cheap to refuse (issue #14 item 7).

Without this, every request with a made-up projectKey reached the gRPC server (200 random keys
in a second all did): key guessing and junk floods cost a gRPC call and a database lookup each.

- A key the server refused (401) is remembered for `unknown_ttl` seconds (the server's own
  cache time, APEX_PROJECT_CACHE_TTL): the same key is refused again without a call.
- Requests whose key this worker has not seen accepted are limited per client IP
  (APEX_AUTH_RATE_LIMIT, e.g. 60/minute): past it, a 429 with Retry-After, without a call. A key
  the server accepted once is "verified" and never counted, so a site's real traffic is not
  limited here, only its first request per gateway worker.

The counts use the same storage as the per-project limits (shared by a machine's workers, or
Redis).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from flask import Flask, current_app

from apex_ingest.common.settings import GatewaySettings, Internal
from gateway.errors import ApiError, unauthorized
from gateway.ratelimit import RateLimited, RateLimiter

#: Keys remembered per worker (verified or unknown); beyond this, the oldest half is forgotten.
MAX_REMEMBERED = 50_000


class AuthGuard:
    def __init__(self, limiter: RateLimiter, unknown_ttl: float) -> None:
        self._limiter = limiter
        self._unknown_ttl = unknown_ttl
        self._verified: dict[str, None] = {}
        self._unknown: dict[str, float] = {}  # key -> remembered until (time.monotonic())
        self._lock = threading.Lock()

    def check(self, key: str, client_ip: str) -> ApiError | None:
        """The answer to give without calling the server, or None to call it."""
        if key in self._verified:
            return None
        until = self._unknown.get(key)
        if until is not None and until > time.monotonic():
            return unauthorized("Unknown or revoked project key.")
        outcome = self._limiter.hit(f"unverified:{client_ip}")
        if outcome.allowed:
            return None
        retry_after = max(1, math.ceil(outcome.reset_at - time.time()))
        return RateLimited(  # its headers: this limit's, not the project's or the address's
            outcome,
            retry_after,
            "Too many requests with keys not known here from this address; "
            "retry after the number of seconds in Retry-After.",
        )

    def accepted(self, key: str) -> None:
        """The server accepted `key` (any answer but 401)."""
        if key in self._verified:
            return
        with self._lock:
            _bound(self._verified)
            self._verified[key] = None
            self._unknown.pop(key, None)

    def refused(self, key: str) -> None:
        """The server answered 401 for `key`."""
        with self._lock:
            self._verified.pop(key, None)
            _bound(self._unknown)
            self._unknown[key] = time.monotonic() + self._unknown_ttl


_EXTENSION_KEY = "apex_gateway.auth_guard"


def install(app: Flask, settings: GatewaySettings) -> AuthGuard:
    limiter = RateLimiter(
        settings.auth_rate_limit,
        settings.rate_limit_storage,
        Internal.get(Internal.RATE_LIMIT_TABLE),
    )
    guard = AuthGuard(limiter, settings.unknown_key_ttl)
    app.extensions[_EXTENSION_KEY] = guard
    return guard


def get_guard() -> AuthGuard:
    guard: AuthGuard = current_app.extensions[_EXTENSION_KEY]
    return guard


def _bound(remembered: dict[str, Any]) -> None:
    if len(remembered) >= MAX_REMEMBERED:
        for key in list(remembered)[: MAX_REMEMBERED // 2]:  # insertion order: oldest first
            del remembered[key]
