"""Which project each projectKey belongs to, as the server said (for per-project rate limits).

The server names the project (and its own rate limit) of every key it accepts, in the trailing
metadata of its ingest answers (apex_ingest.common.key_projects). Each gateway worker keeps what
it was told here; gateway.ratelimit then counts a known key's requests under its project, all
the project's keys together, in the storage every worker shares. A key not known yet (its first
request through this worker, or a key the server never accepted) is counted under the key
itself, as before, and failed authentication per client IP (gateway.auth_guard).

A key belongs to one project for ever, so an entry stays right; its rate limit is refreshed by
every answer (the server's own cache: within APEX_PROJECT_CACHE_TTL of a change). A project
refused with 429 gets no answers, so its limit would never be refreshed (a project throttled
to 0/second, for ever): `due_for_refresh` says when an entry has not been for REFRESH_SECONDS,
and the rate limiter then asks the server (gateway.ratelimit). A key the server refuses (401:
revoked) is forgotten at once, so that requests with a revoked key do not use up the budget of
the project's live keys.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from apex_ingest.common.key_projects import KeyProject

#: Keys remembered per worker; beyond this, the oldest half is forgotten.
MAX_KEYS = 50_000
#: An entry no answer has confirmed for this long may hold a rate limit changed since (the
#: server's APEX_PROJECT_CACHE_TTL is 5 s by default).
REFRESH_SECONDS = 5.0


class KnownKeys:
    def __init__(self) -> None:
        self._known: dict[str, KeyProject] = {}
        self._confirmed: dict[str, float] = {}  # key -> time.monotonic() of its last answer
        self._lock = threading.Lock()

    def project_of(self, key: str) -> KeyProject | None:
        return self._known.get(key)

    def due_for_refresh(self, key: str) -> bool:
        """Whether `key` is known and its entry has gone unconfirmed by any answer for
        REFRESH_SECONDS; if so, the caller is to ask the server (once: others are told no
        until REFRESH_SECONDS later, whatever the answer)."""
        now = time.monotonic()
        if key not in self._known or now - self._confirmed.get(key, 0.0) < REFRESH_SECONDS:
            return False
        with self._lock:
            if now - self._confirmed.get(key, 0.0) < REFRESH_SECONDS:
                return False
            self._confirmed[key] = now
            return True

    def learn(self, keys: Sequence[str], entries: Sequence[KeyProject | None]) -> None:
        """What an answer said about its requests' keys (entries in the requests' order)."""
        if len(entries) != len(keys):
            return  # an older server (no metadata) or a malformed answer: learn nothing
        now = time.monotonic()
        for key, entry in zip(keys, entries, strict=True):
            if entry is None:
                continue
            if self._known.get(key) == entry:
                self._confirmed[key] = now
                continue
            with self._lock:
                if len(self._known) >= MAX_KEYS:
                    for old in list(self._known)[: MAX_KEYS // 2]:  # insertion order: oldest
                        del self._known[old]
                        self._confirmed.pop(old, None)
                self._known[key] = entry
                self._confirmed[key] = now

    def forget(self, key: str) -> None:
        """The server refused `key` (401): count its requests under the key again."""
        with self._lock:
            self._known.pop(key, None)
            self._confirmed.pop(key, None)
