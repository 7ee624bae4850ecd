"""How a batch reaches the gateway: the ``Transport`` protocol and its urllib implementation.

``Apex(..., transport=...)`` takes any object with a ``send`` method of this shape, e.g. to
reuse an application's HTTP connection pool or to record requests in tests.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["NotAGateway", "Response", "Transport", "UrllibTransport"]


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer, whatever its status."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """A header's value, looked up without regard to case; None if absent."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@runtime_checkable
class Transport(Protocol):
    """Sends one POST and returns the answer.

    Any HTTP status is an answer (``Response``), redirects included: they must not be followed
    (a redirected POST is replayed as a body-less GET). A failure that got no answer (refused,
    reset, timed out, TLS) raises ``OSError``, which the sender reports as ``network_error`` and
    retries; ``NotAGateway`` (an ``OSError``) for an answer in another protocol, which no retry
    changes. Called from the sender thread only, one request at a time.
    """

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response: ...


class NotAGateway(OSError):
    """The host answered, but not in HTTP/1.1: e.g. HTTP/2 frames from a gRPC port."""


#: How an HTTP/2 server's first frame (SETTINGS: a 3-byte length, type 4, flags, stream 0) reads
#: when parsed as an HTTP/1.1 status line: what a gRPC port answers to a plain POST.
_HTTP2_SETTINGS = re.compile("^[\x00-\xff]{3}\x04\x00\x00\x00\x00\x00", re.DOTALL)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would replay a redirected POST as a body-less GET; an ingest endpoint that redirects
    # is misconfigured, and that should surface as an error rather than as lost events.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class UrllibTransport:
    """The default transport: ``urllib.request``, standard library only.

    Proxies from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are used, TLS certificates are
    verified (pass an ``ssl.SSLContext`` to change that) and redirects are not followed.
    """

    def __init__(self, ssl_context: Any = None) -> None:
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as answer:
                return Response(answer.status, dict(answer.headers.items()), answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, dict(exc.headers.items()), exc.read())
        except urllib.error.URLError as exc:
            # URLError is an OSError already; keep the reason (refused, DNS, TLS) readable.
            raise OSError(f"{exc.reason}") from exc
        except http.client.HTTPException as exc:
            if isinstance(exc, http.client.BadStatusLine) and _HTTP2_SETTINGS.match(
                str(exc.args[0]) if exc.args else ""
            ):
                raise NotAGateway(
                    "the host answered in HTTP/2 only: a gRPC port (the gateway's is its HTTP "
                    "port, 8080 by default)?"
                ) from exc
            # A broken answer (e.g. the connection closed mid-headers): no answer at all.
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
