"""The project behind each key, as the server tells its ingest callers (the gateway).

Rate limits count per project, all its keys together (CONTRACT section 4), but the gateway sees
only the body's projectKey. So every IngestEvents / IngestMany answer carries, in its trailing
metadata `x-apex-projects`, a JSON list with one entry per request of the call, in order:
`[project_id, rate_limit, uid]` for a request the server accepted (`rate_limit`: the project's
own, e.g. "100/second;5000/hour", or "" for the gateway's APEX_RATE_LIMIT; `uid`: the project's
first public key, `projects.key`, which never changes and is unique beyond one database, unlike
the id: a rate-limit window in a shared Redis outlives a test database), `null` for one it
refused.
The gateway remembers key -> (project, limit) and counts later requests of that key under the
project. Metadata, not proto fields: older callers ignore it, and the messages stay as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Trailing metadata key of IngestEvents / IngestMany answers.
PROJECTS_METADATA = "x-apex-projects"


@dataclass(frozen=True, slots=True)
class KeyProject:
    """The project a key belongs to, its own rate limit ("" for the default), its uid."""

    project_id: int
    rate_limit: str = ""
    uid: str = ""


def encode(entries: Sequence[KeyProject | None]) -> str:
    """The metadata value for a call's requests (ASCII: rate limits are ASCII)."""
    return json.dumps(
        [None if e is None else [e.project_id, e.rate_limit, e.uid] for e in entries],
        separators=(",", ":"),
    )


def decode(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[KeyProject | None]:
    """The entries of an answer's trailing metadata; [] when absent or malformed (an older
    server, or something in between that changed it: the caller then limits by key)."""
    for key, value in metadata or ():
        if key != PROJECTS_METADATA or not isinstance(value, str):
            continue
        try:
            items = json.loads(value)
        except ValueError:
            return []
        if not isinstance(items, list):
            return []
        entries: list[KeyProject | None] = []
        for item in items:
            if (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], int)
                and isinstance(item[1], str)
                and isinstance(item[2], str)
            ):
                entries.append(KeyProject(item[0], item[1], item[2]))
            else:
                entries.append(None)
        return entries
    return []
