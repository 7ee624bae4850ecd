"""A body that does not arrive in time is a 408 with the contract's body (issue #14 item 6),
through granian itself, and the stalled client delays nobody else."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import make_project
from tests.service import Service, running_service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    from apex_ingest.ops.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('body') / 'apex.db'}"
    upgrade(url)
    key = make_project(url)
    with running_service(url, env={"APEX_BODY_TIMEOUT": "1"}) as running:
        yield running, key


def _answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("content-length", headers.get("Content-Length", "0")))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _headers(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def test_a_stalled_body_is_a_408_in_time_and_others_are_served(
    service: tuple[Service, str],
) -> None:
    running, key = service
    port = int(running.base_url.rsplit(":", 1)[1])
    stalled = _headers(port, 100)
    stalled.sendall(b"{")
    started = time.monotonic()
    # Meanwhile, another client is answered at once.
    ok = requests.post(
        f"{running.base_url}/api/events",
        json={"type": "pageview", "visitorId": "v", "projectKey": key, "url": "/"},
        timeout=5,
    )
    assert ok.status_code == 200
    status, headers, body = _answer(stalled, timeout=5)
    elapsed = time.monotonic() - started
    assert status == 408
    assert 0.9 < elapsed < 3.0
    assert headers.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert [d["field"] for d in json.loads(body)["error"]["details"]] == ["body"]
    # The stalled client is still connected: the worker keeps answering others.
    again = requests.get(f"{running.base_url}/healthz", timeout=5)
    assert again.status_code == 200
    stalled.close()


def test_a_trickled_body_is_a_408_too(service: tuple[Service, str]) -> None:
    running, _key = service
    port = int(running.base_url.rsplit(":", 1)[1])
    trickler = _headers(port, 100)
    started = time.monotonic()
    sent = 0
    trickler.settimeout(0.3)
    answer = b""
    while time.monotonic() - started < 5 and not answer:
        trickler.sendall(b" ")
        sent += 1
        with contextlib.suppress(TimeoutError):
            answer = trickler.recv(65536, socket.MSG_PEEK)
    status, _, body = _answer(trickler, timeout=5)
    assert status == 408, body
    assert time.monotonic() - started < 3.0
    assert sent < 100
    trickler.close()
