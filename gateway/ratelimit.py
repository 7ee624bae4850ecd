"""Per-project rate limits, with the `limits` library (fixed windows).

A request counts once whatever the number of events it carries. It counts under its project,
all the project's keys together, against the project's own limit (`projects update
--rate-limit`) or APEX_RATE_LIMIT: the server names the project of each key it accepts
(gateway.known_keys). A key this worker has not seen accepted yet counts under the key itself.
The key function needs the parsed body: it reuses the one parse of the request (cached on
flask.g by gateway.request_state). Bodies without a usable projectKey are limited by client IP.

Only POST /api/events counts: its view calls check() after parsing the body (CORS preflights and
other endpoints never use up the budget). Every counted answer carries
X-RateLimit-Limit/-Remaining/-Reset (add_headers), so clients can pace themselves; a refused one
is a 429 with Retry-After; a refused request whose project's limit this worker has not heard
confirmed for a while asks the server for it first (`_limit_changed`). With memory://, the
worker processes of one `apex-ingest gateway`/`serve` count in one table
(gateway/shared_windows.py). If the shared
storage (Redis) fails, the gateway keeps serving with this machine's limits and tries the
storage again a few seconds later: losing events is worse than a looser limit for a while.

(This used to be Flask-Limiter. Working out on every request which of its many kinds of limits
apply cost about as much as all the rest of the gateway's own work for a 1-event request; the
one thing used here takes a few lines.)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import grpc
from flask import Flask, Response, current_app
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from apex_ingest.common.settings import GatewaySettings, Internal
from apex_ingest.v1 import ingest_pb2
from gateway import request_state
from gateway.errors import ApiError
from gateway.grpc_client import get_client
from gateway.grpc_errors import to_api_error
from gateway.shared_windows import SharedWindows

log = logging.getLogger(__name__)

#: A projectKey longer than this cannot be real; don't let it become a storage key.
_MAX_KEY_LENGTH = 256
_KEY_PREFIX = "apex"
#: After a storage error, limits are kept per process for this long before the storage is tried.
STORAGE_RETRY_SECONDS = 5.0
#: Past this many per-process windows, expired ones are dropped (floods of random keys).
_MAX_LOCAL_WINDOWS = 100_000


def rate_limit_keys() -> list[tuple[str, str]]:
    """What to count the request under: (name, the project's own limit or "" for the default).

    A key the server said belongs to project N counts under `project:UID` (N's first public
    key, which never changes: apex_ingest.common.key_projects), all the project's keys
    together (gateway.known_keys), and under `key:KEY` against the same limit; a key not known
    yet only under `key:KEY` (the default limit); no usable key: the client's IP. Counting every
    key under itself too keeps a project with one key exact: its first request, counted before
    the server named the project, is in the key's window.
    """
    project_key = request_state.parsed_body().project_key
    if project_key and len(project_key) <= _MAX_KEY_LENGTH:
        known = get_client().known_keys.project_of(project_key)
        if known is not None:
            return [
                (f"project:{known.uid or known.project_id}", known.rate_limit),
                (f"key:{project_key}", known.rate_limit),
            ]
        return [(f"key:{project_key}", "")]
    return [(f"ip:{request_state.client_ip()}", "")]


@dataclass(frozen=True, slots=True)
class _Outcome:
    limit: RateLimitItem
    remaining: int
    reset_at: float
    allowed: bool


#: A request's outcome in each window it was counted in, by window name.
Seen = dict[str, _Outcome]


class RateLimiter:
    """Counts hits per key against every configured limit (e.g. "100/second;5000/hour")."""

    def __init__(self, limits: str, storage_uri: str, shared_file: str = "") -> None:
        self.limits = parse_many(limits)
        if not self.limits:
            raise ValueError(f"no rate limit in {limits!r}")
        storage = storage_from_string(storage_uri)
        # memory:// is counted here, by _hit_local: limits' MemoryStorage starts a timer thread
        # every few hits to expire keys, a visible cost per request.
        self._shared = (
            None if isinstance(storage, MemoryStorage) else FixedWindowRateLimiter(storage)
        )
        self._shared_down_until = 0.0
        # memory:// (and the fallback): one table for all of this machine's gateway workers
        # when `apex-ingest gateway`/`serve` made one, else this process's own dict.
        self._machine = SharedWindows(shared_file) if shared_file else None
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # key -> [expires at, hits]
        #: Projects' own limits, parsed once per text ("" and unparsable: the default).
        self._parsed: dict[str, list[RateLimitItem]] = {"": self.limits}

    def limits_for(self, text: str) -> list[RateLimitItem]:
        """A project's own limit (text as the server sent it), or the default."""
        parsed = self._parsed.get(text)
        if parsed is None:
            try:
                parsed = parse_many(text) or self.limits
            except ValueError:
                log.warning("a project's rate limit %r cannot be parsed; using the default", text)
                parsed = self.limits
            with self._lock:
                if len(self._parsed) > 1000:  # a few distinct limits in practice
                    self._parsed = {"": self.limits}
                self._parsed[text] = parsed
        return parsed

    def hit(self, key: str, own_limit: str = "", seen: Seen | None = None) -> _Outcome:
        """Count one hit under `key` against `own_limit` (a project's) or the default. A window
        in `seen` (this request counted in it already) is not counted again: its outcome then
        is the one recorded there; each window counted is recorded in `seen`."""
        limits = self.limits_for(own_limit) if own_limit else self.limits
        seen = {} if seen is None else seen
        if self._shared is None or (
            self._shared_down_until and time.monotonic() < self._shared_down_until
        ):
            return self._hit_local(key, limits, seen)
        try:
            return self._hit(self._shared, key, limits, seen)
        except Exception as error:
            with self._lock:
                if time.monotonic() >= self._shared_down_until:
                    log.warning("rate-limit storage failed (%r); limiting per process", error)
                self._shared_down_until = time.monotonic() + STORAGE_RETRY_SECONDS
            return self._hit_local(key, limits, seen)

    def _hit_local(self, key: str, limits: list[RateLimitItem], seen: Seen) -> _Outcome:
        now = time.time()
        reported: _Outcome | None = None
        for limit in limits:
            name = limit.key_for(_KEY_PREFIX, key)
            outcome = seen.get(name)
            if outcome is None:
                counted = None
                if self._machine is not None:
                    counted = self._machine.hit(name, limit.get_expiry(), now)
                window_end, hits = counted or self._hit_process(name, limit.get_expiry(), now)
                allowed = hits <= limit.amount
                outcome = seen[name] = _Outcome(
                    limit, max(0, limit.amount - hits), window_end, allowed
                )
            if not outcome.allowed:
                return outcome
            if reported is None or outcome.remaining < reported.remaining:
                reported = outcome
        assert reported is not None
        return reported

    def _hit_process(self, name: str, seconds: float, now: float) -> tuple[float, int]:
        with self._lock:
            if len(self._windows) > _MAX_LOCAL_WINDOWS:
                self._windows = {k: w for k, w in self._windows.items() if w[0] > now}
            window = self._windows.get(name)
            if window is None or window[0] <= now:
                window = self._windows[name] = [now + seconds, 0]
            window[1] += 1
            return window[0], int(window[1])

    def _hit(
        self, strategy: FixedWindowRateLimiter, key: str, limits: list[RateLimitItem], seen: Seen
    ) -> _Outcome:
        reported: _Outcome | None = None
        for limit in limits:
            name = limit.key_for(_KEY_PREFIX, key)
            outcome = seen.get(name)
            if outcome is None:
                allowed = strategy.hit(limit, _KEY_PREFIX, key)
                stats = strategy.get_window_stats(limit, _KEY_PREFIX, key)
                outcome = seen[name] = _Outcome(
                    limit, max(0, stats.remaining), stats.reset_time, allowed
                )
            if not outcome.allowed:
                return outcome
            if reported is None or outcome.remaining < reported.remaining:
                reported = outcome
        assert reported is not None
        return reported


_EXTENSION_KEY = "apex_gateway.ratelimit"


def install(app: Flask, settings: GatewaySettings) -> RateLimiter:
    limiter = RateLimiter(
        settings.rate_limit, settings.rate_limit_storage, Internal.get(Internal.RATE_LIMIT_TABLE)
    )
    app.extensions[_EXTENSION_KEY] = limiter
    return limiter


def check() -> _Outcome:
    """Count the current request (a POST to /api/events, called by its view); ApiError 429
    with Retry-After if over a limit. The outcome goes on every answer (add_headers)."""
    seen: Seen = {}
    try:
        return _count(seen)
    except RateLimited:
        if not _limit_changed():
            raise
        # Against the project's limit as it is now: its new windows are counted, those it
        # keeps (an unchanged part, "5/minute" of "5/minute;2/hour") are not counted twice.
        return _count(seen)


#: A probe's refusals that are the request's own answer (401, 403), not the rate limit's.
_REFUSED_WHATEVER_THE_RATE = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)


def _limit_changed() -> bool:
    """Whether the server now gives the current request's project another rate limit than this
    worker last heard, asked when that was REFRESH_SECONDS ago or more (gateway.known_keys): a
    refused project gets no answers to hear it from, so a limit lifted or raised would never
    reach the gateway. Asked with a validate_only copy of the request (nothing is stored), at
    most once per key and REFRESH_SECONDS."""
    payload = request_state.parsed_body().payload
    if payload is None or payload.violations:
        return False
    key = payload.request.project_key
    client = get_client()
    before = client.known_keys.project_of(key)
    if before is None or not client.known_keys.due_for_refresh(key):
        return False
    probe = ingest_pb2.IngestEventsRequest()
    probe.CopyFrom(payload.request)
    probe.validate_only = True
    probe.partial = True  # OK (with the key's project) even if some event breaks a rule
    probe.context.CopyFrom(request_state.request_context())
    try:
        client.ingest_response(probe)  # its answer's metadata updates known_keys
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            client.known_keys.forget(key)  # revoked: no longer counted under the project
        if code in _REFUSED_WHATEVER_THE_RATE:
            # The request itself is refused now (its key revoked, its origin no longer
            # allowed): that is its answer, not a wait that could never help.
            raise to_api_error(error, payload.snippet) from None
        return False
    return client.known_keys.project_of(key) != before


def _count(seen: Seen) -> _Outcome:
    limiter: RateLimiter = current_app.extensions[_EXTENSION_KEY]
    reported: _Outcome | None = None
    for key, own_limit in rate_limit_keys():
        outcome = limiter.hit(key, own_limit, seen)
        if not outcome.allowed:
            retry_after = max(1, math.ceil(outcome.reset_at - time.time()))
            raise RateLimited(outcome, retry_after)
        if reported is None or outcome.remaining < reported.remaining:
            reported = outcome
    assert reported is not None
    return reported


class RateLimited(ApiError):
    """429 past a limit; its X-RateLimit-* headers describe that limit (`outcome`)."""

    def __init__(self, outcome: _Outcome, retry_after: int, message: str | None = None) -> None:
        super().__init__(429, message, retry_after=retry_after)
        self.outcome = outcome


def add_headers(response: Response, outcome: _Outcome) -> None:
    headers = response.headers
    headers["X-RateLimit-Limit"] = str(outcome.limit.amount)
    headers["X-RateLimit-Remaining"] = str(outcome.remaining)
    headers["X-RateLimit-Reset"] = str(int(outcome.reset_at))
