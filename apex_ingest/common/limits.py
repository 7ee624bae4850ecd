"""The limits of the contract, in one place for the server, the gateway and the docs.

The server enforces them (apex_ingest.server.validation); the gateway uses them to refuse early
and to size its calls; gateway/openapi.json states them (tests/test_limits_docs.py checks it),
and the SDK, which must not import this package, keeps copies that a test compares with these.
"""

from __future__ import annotations

from datetime import timedelta

#: Events in one request (a batch); the snippet format is one event.
MAX_EVENTS = 500
#: A rejected event of a partial request lists at most this many of its violations.
MAX_VIOLATIONS_PER_EVENT = 20
#: Default HTTP body limit after decompression (APEX_MAX_BODY_BYTES changes it).
MAX_BODY_BYTES = 1024 * 1024
#: `type`: 1-100 characters.
MAX_TYPE_CHARS = 100
#: `visitorId`, `userId`, a project key: 1-128 characters.
MAX_ID_CHARS = 128
#: An event's `id`: 1-64 characters.
MAX_EVENT_ID_CHARS = 64
#: `url` and `referrer`: at most 4096 characters.
MAX_URL_CHARS = 4096
#: `data`: at most 32 KiB of JSON (UTF-8 bytes).
MAX_DATA_BYTES = 32 * 1024
#: `data`: nesting depth at most 16.
MAX_DATA_DEPTH = 16
#: The stored User-Agent is cut to this many characters.
MAX_USER_AGENT_CHARS = 1024
#: A timestamp may lie this far after the time of receipt (clocks differ).
MAX_FUTURE = timedelta(days=1)
