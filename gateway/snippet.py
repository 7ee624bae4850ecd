"""``GET /apex.js``: the browser snippet, served with a strong ETag and an hour of caching.

The file ships inside the package and never changes while the process runs, so it is read,
hashed and gzipped once, at import. Sites load it with
``<script async src="https://HOST/apex.js" data-project-key="pk_live_..."></script>``
(see docs/snippet.md).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from flask import Blueprint, Response, request

__all__ = ["SNIPPET", "SNIPPET_ETAG", "SNIPPET_GZIP", "snippet_bp"]

#: The snippet as it ships: gateway/static/apex.js.
SNIPPET: bytes = (Path(__file__).parent / "static" / "apex.js").read_bytes()
#: Its gzip encoding; mtime=0 keeps the bytes (and so the ETag) the same on every start.
SNIPPET_GZIP: bytes = gzip.compress(SNIPPET, compresslevel=9, mtime=0)
#: A strong validator: the content hash. The gzip encoding is another representation of the
#: resource, so it gets its own tag (RFC 9110, section 8.8.3.3).
SNIPPET_ETAG: str = hashlib.sha256(SNIPPET).hexdigest()[:32]
_ETAG_GZIP = SNIPPET_ETAG + "-gz"

CACHE_CONTROL = "public, max-age=3600"
CONTENT_TYPE = "application/javascript; charset=utf-8"

snippet_bp = Blueprint("snippet", __name__)


@snippet_bp.get("/apex.js")
def apex_js() -> Response:
    """The snippet; ``304 Not Modified`` when ``If-None-Match`` names the current version."""
    use_gzip = request.accept_encodings["gzip"] > 0
    etag = _ETAG_GZIP if use_gzip else SNIPPET_ETAG
    # If-None-Match uses the weak comparison: W/"x" matches "x"; "*" matches anything.
    if request.if_none_match.contains_weak(etag):
        response = Response(status=304)
    else:
        response = Response(SNIPPET_GZIP if use_gzip else SNIPPET, content_type=CONTENT_TYPE)
        if use_gzip:
            response.headers["Content-Encoding"] = "gzip"
    response.set_etag(etag)
    response.headers["Cache-Control"] = CACHE_CONTROL
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # A public script: lets a site load it with crossorigin="anonymous" (e.g. for SRI).
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response
