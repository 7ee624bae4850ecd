"""The default ``UrllibTransport`` against a stdlib HTTP server, and ``Apex`` end to end over it."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import unittest
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fake_ingest import Answer, Errors, Received, fake_ingest, foreign, ok, refuse

from apex_ingest_sdk import Apex, ApexError, Response, Transport, UrllibTransport


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers: for timeouts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for sock in accepted:
            sock.close()
        listener.close()


class UrllibTransportTests(unittest.TestCase):
    def setUp(self) -> None:
        context = fake_ingest()
        self.fake = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)
        self.transport = UrllibTransport()

    def send(self, body: bytes = b'{"projectKey":"pk","events":[{"id":"1"}]}') -> Response:
        headers = {"Content-Type": "application/json", "X-Test": "yes"}
        return self.transport.send(self.fake.url + "/api/events", body, headers, timeout=5)

    def test_is_a_transport(self) -> None:
        self.assertIsInstance(self.transport, Transport)

    def test_posts_the_body_and_headers_and_returns_the_answer(self) -> None:
        response = self.send()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b'{"received": 1}')
        self.assertEqual(response.header("content-type"), "application/json")
        [request] = self.fake.requests
        self.assertEqual(request.url, self.fake.url + "/api/events")
        self.assertEqual(request.headers["X-Test"], "yes")
        self.assertEqual(request.json["projectKey"], "pk")

    def test_error_statuses_are_answers_with_headers_and_body(self) -> None:
        self.fake.responder = lambda r, n: refuse(429, "slow down", retry_after=7)
        response = self.send()
        self.assertEqual(response.status, 429)
        self.assertEqual(response.header("Retry-After"), "7")
        self.assertIn(b"rate_limited", response.body)

    def test_redirects_are_not_followed(self) -> None:
        self.fake.responder = lambda r, n: foreign(307, {"Location": "/elsewhere"})
        response = self.send()
        self.assertEqual(response.status, 307)
        self.assertEqual(response.header("location"), "/elsewhere")
        self.assertEqual(len(self.fake.requests), 1)

    def test_refused_connection_raises_oserror(self) -> None:
        with self.assertRaises(OSError):
            self.transport.send(f"http://127.0.0.1:{free_port()}/api/events", b"{}", {}, timeout=5)

    def test_timeout_raises_oserror(self) -> None:
        with silent_server() as url:
            started = time.monotonic()
            with self.assertRaises(OSError):
                self.transport.send(url + "/api/events", b"{}", {}, timeout=0.3)
            self.assertLess(time.monotonic() - started, 5)


def one_failure(url: str, max_retries: int) -> ApexError:
    """Track one event to `url`, close, and return the one error on_error was handed."""
    errors = Errors()
    apex = Apex("pk", url, max_retries=max_retries, backoff_base=0.01, on_error=errors)
    apex.track("e", "/")
    assert apex.close(10)
    [(error, _)] = errors.calls
    return error


class BrokenAnswer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BrokenAnswerTests(unittest.TestCase):
    def test_a_truncated_answer_is_a_network_error(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenAnswer)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        error = one_failure(f"http://127.0.0.1:{server.server_address[1]}", max_retries=1)
        self.assertEqual((error.code, error.status), ("network_error", None))


def read_request(sock: socket.socket) -> None:
    """Read one HTTP/1.1 request with a Content-Length, headers and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)


class Http2Only(unittest.TestCase):
    def test_an_http2_answer_is_not_a_gateway_and_not_retried(self) -> None:
        """What a gRPC port sends a plain POST: its SETTINGS frame, then it closes."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.addCleanup(listener.close)
        connections: list[int] = []

        def answer() -> None:
            listener.settimeout(5)
            while True:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    return
                connections.append(1)
                with sock:
                    read_request(sock)  # whole, or closing early resets the client's send
                    sock.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00\x40\x00\x00")

        threading.Thread(target=answer, daemon=True).start()
        error = one_failure(f"http://127.0.0.1:{listener.getsockname()[1]}", max_retries=3)
        self.assertEqual((error.code, error.status), ("not_a_gateway", None))
        self.assertIn("gRPC port", error.message)
        self.assertEqual(len(connections), 1)


class OverHttp(unittest.TestCase):
    """``Apex`` with its default transport against the fake served over HTTP."""

    def setUp(self) -> None:
        context = fake_ingest()
        self.fake = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)

    def client(self, **kwargs: Any) -> Apex:
        options: dict[str, Any] = {"flush_interval": 60.0, "backoff_base": 0.01, "timeout": 5.0}
        options.update(kwargs)
        return Apex("pk_test", self.fake.url, **options)

    def test_batch_is_gzip_json(self) -> None:
        apex = self.client()
        ids = [apex.track("pageview", f"/p/{i}", {"n": i}, user_id="u") for i in range(3)]
        self.assertTrue(apex.flush(5))
        apex.close()
        [request] = self.fake.requests
        self.assertEqual(request.url, self.fake.url + "/api/events")
        self.assertEqual(request.headers["Content-Encoding"], "gzip")
        self.assertEqual(request.headers["Content-Type"], "application/json")
        self.assertEqual(request.raw[:2], b"\x1f\x8b")
        self.assertEqual(gzip.decompress(request.raw), request.body)
        self.assertEqual({e["userId"] for e in request.json["events"]}, {"u"})
        self.assertEqual(request.ids, ids)

    def test_503_with_retry_after_then_200(self) -> None:
        def responder(request: Received, n: int) -> Answer:
            return refuse(503, "storage down", retry_after=1) if n == 0 else ok(request, n)

        self.fake.responder = responder
        errors = Errors()
        apex = self.client(on_error=errors)
        ids = [apex.track("e", "/") for _ in range(3)]
        started = time.monotonic()
        self.assertTrue(apex.flush(10))
        self.assertGreaterEqual(time.monotonic() - started, 0.95)
        apex.close()
        self.assertEqual(self.fake.statuses, [503, 200])
        self.assertEqual(self.fake.accepted_ids(), ids)
        self.assertEqual(errors.calls, [])

    def test_redirect_is_an_error_not_a_silent_loss(self) -> None:
        self.fake.responder = lambda r, n: foreign(302, {"Location": "/elsewhere"})
        errors = Errors()
        apex = self.client(on_error=errors)
        apex.track("e", "/")
        apex.close()
        [(error, _)] = errors.calls
        self.assertEqual(error.status, 302)
        self.assertEqual(len(self.fake.requests), 1)

    def test_network_errors_are_retried_then_reported(self) -> None:
        errors = Errors()
        # A port nobody listens on: connection refused on every attempt.
        apex = Apex(
            "pk_test",
            f"http://127.0.0.1:{free_port()}",
            flush_interval=60,
            backoff_base=0.01,
            max_retries=2,
            on_error=errors,
        )
        apex.track("e", "/", user_id="u")
        self.assertTrue(apex.flush(10))
        apex.close()
        [(error, events)] = errors.calls
        self.assertEqual((error.code, error.status), ("network_error", None))
        self.assertEqual(events[0]["userId"], "u")


if __name__ == "__main__":
    unittest.main()
