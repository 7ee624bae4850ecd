"""A fake of the gateway's ``POST /api/events`` for the SDK's tests (standard library only).

``FakeIngest`` records every request (headers and decompressed JSON) and answers through a
replaceable ``responder``, so a test can script 503s, 429s, 400s or a hang. It is reachable two
ways: in process, as a ``Transport`` (``fake.transport``), or over HTTP (``fake_ingest()``).

Answers are built with ``ok`` and ``refuse``, which give only what the real gateway can give:
the status, its error code, ``Retry-After`` on 429 and 503 only. The repository's
``tests/client/test_sdk_fake_contract.py`` validates every answer they can build against the
gateway's ``openapi.json``. ``foreign`` builds the answers of something that is not the gateway
(a proxy's HTML page, a redirect) and is exempt.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from apex_ingest_sdk import ApexError, Response

#: The gateway's error code for each status it can answer ``POST /api/events`` with (404: a
#: wrong path). Checked against gateway/errors.py and openapi.json by the repository's tests.
CODES: dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}
#: The statuses that always carry Retry-After (whole seconds, at least 1); no other does.
RETRY_STATUSES = frozenset({429, 503})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    from_gateway: bool = True  # False: a proxy's or a redirect's answer, not the contract's

    def json(self) -> Any:
        return json.loads(self.body)


def ok(request: Received, n: int = 0) -> Answer:
    """The gateway's 200: every event of the request is committed."""
    return Answer(
        200,
        {"Content-Type": "application/json"},
        json.dumps({"received": len(request.json["events"])}).encode(),
    )


def refuse(
    status: int,
    message: str = "refused",
    *details: tuple[str, str],
    retry_after: int | None = None,
) -> Answer:
    """An error answer as the gateway gives it: its code, JSON body and Retry-After rules."""
    if status not in CODES:
        raise ValueError(f"the gateway never answers {status}")
    headers = {"Content-Type": "application/json"}
    if status in RETRY_STATUSES:
        seconds = 1 if retry_after is None else retry_after
        if not isinstance(seconds, int) or seconds < 1:
            raise ValueError("the gateway's Retry-After is a whole number of seconds, at least 1")
        headers["Retry-After"] = str(seconds)
    elif retry_after is not None:
        raise ValueError(f"the gateway sends Retry-After on {sorted(RETRY_STATUSES)} only")
    body = {
        "error": {
            "code": CODES[status],
            "message": message,
            "details": [{"field": f, "description": d} for f, d in details],
        }
    }
    return Answer(status, headers, json.dumps(body).encode())


def foreign(status: int, headers: Mapping[str, str] | None = None, body: bytes = b"") -> Answer:
    """An answer from something that is not the gateway: a proxy, a redirect, another server."""
    return Answer(status, {"Content-Type": "text/html", **(headers or {})}, body, False)


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes  # the body as sent on the wire
    body: bytes  # decompressed
    json: dict[str, Any]
    url: str = ""
    timeout: float | None = None
    status: int = 0  # what the fake answered

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.json["events"]]


Responder = Callable[[Received, int], Answer]  # (request, 0-based request number)


@dataclass
class FakeIngest:
    url: str = "http://fake.invalid"
    requests: list[Received] = field(default_factory=list)
    responder: Responder = ok
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)

    @property
    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.status == 200]

    def accepted_ids(self) -> list[str]:
        return [i for r in self.accepted for i in r.ids]

    @property
    def statuses(self) -> list[int]:
        with self.lock:
            return [r.status for r in self.requests]

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)

    def handle(
        self, headers: Mapping[str, str], raw: bytes, url: str = "", timeout: float | None = None
    ) -> Answer:
        """Record one request and answer it (shared by the HTTP server and the transport)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        encoding = lowered.get("content-encoding", "")
        body = gzip.decompress(raw) if encoding == "gzip" else raw
        request = Received(dict(headers), raw, body, json.loads(body), url, timeout)
        with self.lock:
            number = len(self.requests)
            self.requests.append(request)
        answer = self.responder(request, number)
        request.status = answer.status
        with self.arrived:
            self.arrived.notify_all()
        return answer

    @property
    def transport(self) -> FakeTransport:
        return FakeTransport(self)


class FakeTransport:
    """The fake as an in-process ``Transport``: no sockets, same recording and answers."""

    def __init__(self, fake: FakeIngest) -> None:
        self.fake = fake

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        answer = self.fake.handle(headers, body, url, timeout)
        return Response(answer.status, answer.headers, answer.body)


class FailingTransport:
    """A transport whose every request fails without an answer (refused, reset, timed out)."""

    def __init__(self) -> None:
        self.calls = 0

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        self.calls += 1
        raise ConnectionRefusedError(111, "Connection refused")


def _handler(fake: FakeIngest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            answer = fake.handle(dict(self.headers.items()), raw, fake.url + self.path)
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_ingest() -> Iterator[FakeIngest]:
    """The fake served over HTTP on 127.0.0.1; ``fake.url`` is the base URL to give ``Apex``."""
    fake = FakeIngest()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


class Errors:
    """An on_error callback that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[ApexError, list[dict[str, Any]]]] = []
        self.lock = threading.Lock()
        self.called = threading.Event()

    def __call__(self, error: ApexError, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.calls.append((error, events))
        self.called.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, batch in self.calls for e in batch]
