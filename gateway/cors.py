"""CORS for /api/*: any origin may POST (a project's allowlist is enforced by the server, 403).

Answered by our own code, and only for requests that carry an `Origin` (browsers send it on
every cross-origin request): the rest, server SDKs and curl, cost one header lookup. flask-cors
did the same job on every response, Origin or not, at ~15 µs each (docs/gateway-performance.md).

The answer is "*" rather than the Origin echoed: the same for every site, so caches can share
it (hence no `Vary: Origin`).
"""

from __future__ import annotations

from flask import Flask, Response, request

#: Headers a browser script may read from our answers, to pace itself.
EXPOSED_HEADERS = ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
ALLOWED_METHODS = "GET, OPTIONS, POST"
ALLOWED_HEADERS = frozenset({"content-type", "content-encoding", "x-request-id"})
_EXPOSED = ", ".join(EXPOSED_HEADERS)


def install(app: Flask, max_age: int) -> None:
    max_age_text = str(max_age)

    def add_cors_headers(response: Response) -> Response:
        environ = request.environ
        if "HTTP_ORIGIN" not in environ or not environ.get("PATH_INFO", "").startswith("/api/"):
            return response
        headers = response.headers
        headers["Access-Control-Allow-Origin"] = "*"
        if environ.get("REQUEST_METHOD") == "OPTIONS" and (
            "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
        ):
            # A preflight: what the real request may use, and for how long to remember it.
            headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
            allowed = [
                name.strip()
                for name in requested.split(",")
                if name.strip().lower() in ALLOWED_HEADERS
            ]
            if allowed:
                headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
            headers["Access-Control-Max-Age"] = max_age_text
        else:
            headers["Access-Control-Expose-Headers"] = _EXPOSED
        return response

    app.after_request(add_cors_headers)
