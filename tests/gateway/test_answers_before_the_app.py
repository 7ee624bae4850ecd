"""What granian answers by itself, before the app runs (issue #14 items 4 and 5): these answers
are the documented exceptions to "every error has the contract's JSON body" (README, "Answers
that come from the HTTP server itself"); if granian starts passing them to the app, these tests
say so and the docs must change."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.conftest import make_project
from tests.service import Service, running_service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, str]]:
    from apex_ingest.ops.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('raw') / 'apex.db'}"
    upgrade(url)
    key = make_project(url, "shop", ("https://shop.example",))
    with running_service(url) as running:
        yield running, key, url


def raw(service: Service, request: bytes) -> tuple[int, bytes]:
    port = int(service.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # More than 100 header fields (hyper's fixed limit).
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(120))
            + b"\r\n",
            431,
        ),
        # A request target of 64 KiB or more.
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        # A control byte in a header value.
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n", 400),
    ],
)
def test_what_granian_refuses_comes_without_a_body(
    service: tuple[Service, str, str], request_bytes: bytes, status: int
) -> None:
    running, _key, _url = service
    assert raw(running, request_bytes) == (status, b"")


def test_a_non_ascii_user_agent_or_origin_arrives_empty(service: tuple[Service, str, str]) -> None:
    running, key, url = service
    body = b'{"type":"pageview","visitorId":"v","projectKey":"' + key.encode() + b'","url":"/"}'
    status, _ = raw(
        running,
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"User-Agent: Caf\xc3\xa9Browser/1.0\r\nOrigin: https://\xc3\xa9vil.example\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body,
    )
    # granian drops a header value holding a byte >= 0x80: the UA is stored as none, and the
    # Origin counts as absent (a browser always sends an ASCII Origin: IDN hosts in punycode).
    assert status == 200
    engine = create_engine(url)
    with engine.connect() as connection:
        agent = connection.execute(text("SELECT user_agent FROM events")).scalar_one()
    engine.dispose()
    assert agent is None
    # An ASCII Origin outside the allowlist is still refused.
    refused = requests.post(
        f"{running.base_url}/api/events",
        data=body,
        headers={"Content-Type": "application/json", "Origin": "https://evil.example"},
        timeout=10,
    )
    assert refused.status_code == 403
