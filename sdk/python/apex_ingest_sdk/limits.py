"""The SDK's copies of the server's limits for one request (``POST /api/events`` and
``IngestService/IngestEvents``).

Copies, not imports: the SDK must not depend on the server package. The repository's tests check
that they equal the server's (``tests/client/test_sdk_limits.py``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EVENT_ID_HEX_CHARS",
    "MAX_BODY_BYTES",
    "MAX_DATA_BYTES",
    "MAX_DATA_DEPTH",
    "MAX_EVENTS",
    "MAX_EVENT_ID_CHARS",
    "MAX_ID_CHARS",
    "MAX_TYPE_CHARS",
    "MAX_URL_CHARS",
]

#: Events in one request.
MAX_EVENTS: Final = 500
#: The gateway's default limit for a request body, counted after decompression.
MAX_BODY_BYTES: Final = 1024 * 1024
#: ``projectKey``, ``userId`` and ``visitorId``: 1-128 characters.
MAX_ID_CHARS: Final = 128
#: An event's ``id``: 1-64 characters.
MAX_EVENT_ID_CHARS: Final = 64
#: An event's ``type``: 1-100 characters.
MAX_TYPE_CHARS: Final = 100
#: ``url`` and ``referrer``: at most 4096 characters.
MAX_URL_CHARS: Final = 4096
#: ``data``: at most 32 KiB of JSON, nested at most 16 levels deep.
MAX_DATA_BYTES: Final = 32 * 1024
MAX_DATA_DEPTH: Final = 16
#: The ids the SDK generates: 32 lowercase hex characters (``uuid4().hex``), as apex.js and the
#: server do.
EVENT_ID_HEX_CHARS: Final = 32
