"""Which project each projectKey belongs to, as the server said (for per-project rate limits).

The server names the project (and its own rate limit) of every key it accepts, in the trailing
metadata of its ingest answers (apex_ingest.common.key_projects). Each gateway worker keeps what
it was told here; gateway.ratelimit then counts a known key's requests under its project, all
the project's keys together, in the storage every worker shares. A key not known yet (its first
request through this worker, or a key the server never accepted) is counted under the key
itself, as before, and failed authentication per client IP (gateway.auth_guard).

A key belongs to one project for ever, so an entry stays right; its rate limit is refreshed by
every answer (the server's own cache: within APEX_PROJECT_CACHE_TTL of a change). A key the
server refuses (401: revoked) is forgotten at once, so that requests with a revoked key do not
use up the budget of the project's live keys.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from apex_ingest.common.key_projects import KeyProject

#: Keys remembered per worker; beyond this, the oldest half is forgotten.
MAX_KEYS = 50_000


class KnownKeys:
    def __init__(self) -> None:
        self._known: dict[str, KeyProject] = {}
        self._lock = threading.Lock()

    def project_of(self, key: str) -> KeyProject | None:
        return self._known.get(key)

    def learn(self, keys: Sequence[str], entries: Sequence[KeyProject | None]) -> None:
        """What an answer said about its requests' keys (entries in the requests' order)."""
        if len(entries) != len(keys):
            return  # an older server (no metadata) or a malformed answer: learn nothing
        for key, entry in zip(keys, entries, strict=True):
            if entry is None or self._known.get(key) == entry:
                continue
            with self._lock:
                if len(self._known) >= MAX_KEYS:
                    for old in list(self._known)[: MAX_KEYS // 2]:  # insertion order: oldest
                        del self._known[old]
                self._known[key] = entry

    def forget(self, key: str) -> None:
        """The server refused `key` (401): count its requests under the key again."""
        with self._lock:
            self._known.pop(key, None)
