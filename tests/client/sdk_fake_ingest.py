"""A small fake of ``POST /api/events`` for the HTTP client's unit tests.

It records every request (headers and decompressed JSON) and answers through a replaceable
``responder``, so a test can script 503s, 429s, 400s or a hang.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes  # the body as sent on the wire
    body: bytes  # decompressed
    json: dict[str, Any]
    status: int = 0  # what the fake answered

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.json["events"]]


Answer = tuple[int, dict[str, str], dict[str, Any] | bytes]
Responder = Callable[[Received, int], Answer]  # (request, 0-based request number)


def ok(request: Received, n: int) -> Answer:
    return 200, {}, {"received": len(request.json["events"])}


@dataclass
class FakeIngest:
    url: str = ""
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

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)


def _handler(fake: FakeIngest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
            request = Received(dict(self.headers.items()), raw, body, json.loads(body))
            with fake.lock:
                number = len(fake.requests)
                fake.requests.append(request)
            status, headers, payload = fake.responder(request, number)
            request.status = status
            with fake.arrived:
                fake.arrived.notify_all()
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_ingest() -> Iterator[FakeIngest]:
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


def error_body(code: str, message: str, *details: tuple[str, str]) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "details": [{"field": f, "description": d} for f, d in details],
        }
    }
