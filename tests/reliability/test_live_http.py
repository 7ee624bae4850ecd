"""Hostile input over real HTTP (granian, not the Flask test client), logs, and the origin
allowlist, against one `apex_ingest serve` on PostgreSQL shared by the module."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.conftest import fresh_postgres_database, make_project
from tests.reliability.support import record
from tests.service import Service, running_service

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]

LIMIT = 1024 * 1024
SHOP = "https://shop.example"


@dataclass
class Live:
    service: Service
    database_url: str
    key: str
    locked_key: str  # a project whose allowlist is SHOP only

    @property
    def events_url(self) -> str:
        return f"{self.service.base_url}/api/events"

    def count(self) -> int:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return int(connection.execute(text("SELECT count(*) FROM events")).scalar_one())
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with fresh_postgres_database("apex_rel") as url:
        key = make_project(url, "open")
        locked = make_project(url, "locked", allowed_origins=(SHOP,))
        env = {"APEX_RATE_LIMIT": "100000/second", "APEX_PROJECT_CACHE_TTL": "0"}
        with running_service(url, env) as service:
            yield Live(service, url, key, locked)


def raw_http(live: Live, head: bytes, body_chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a hand-made request over a socket; the status and body of the answer."""
    host, port = live.service.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read its answer
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < 12:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
        time.sleep(0.1)
        sock.settimeout(1)
        try:
            while part := sock.recv(65536):
                answer += part
        except (TimeoutError, ConnectionResetError):
            pass
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def chunked(payload: bytes, size: int = 64 * 1024) -> list[bytes]:
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def big_batch(key: str, size: int) -> bytes:
    head = json.dumps({"projectKey": key, "events": [{"type": "x", "url": "/"}]})[:-2]
    filler = ',"pad":"' + "p" * size + '"}]}'
    return (head + filler).encode()[: size + 200]


def test_chunked_body_over_the_limit_is_413(live: Live) -> None:
    before = live.count()
    body = big_batch(live.key, LIMIT + 1000)
    head = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, answer = raw_http(live, head, chunked(body))
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["code"] == "payload_too_large"
    assert live.count() == before


def test_chunked_gzip_bomb_is_413(live: Live) -> None:
    bomb = gzip.compress(b'{"projectKey":"' + b" " * (64 * LIMIT), compresslevel=9)
    assert len(bomb) < 100_000
    head = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    started = time.monotonic()
    status, answer = raw_http(live, head, chunked(bomb))
    assert status == 413, answer[:300]
    assert time.monotonic() - started < 5


def test_content_length_lie_is_400_and_the_server_carries_on(live: Live) -> None:
    head = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    host, port = live.service.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + b'{"projectKey":')
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)  # whatever it answers (or nothing): it must not take the server down
    body = {"projectKey": live.key, "events": [{"type": "x", "url": "/"}]}
    assert requests.post(live.events_url, json=body, timeout=5).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json-patch+json",
        "",
    ],
)
def test_wrong_content_type_is_415_over_http(live: Live, content_type: str) -> None:
    before = live.count()
    body = json.dumps({"projectKey": live.key, "events": [{"type": "x", "url": "/"}]})
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(live.events_url, data=body.encode(), headers=headers, timeout=5)
    assert answer.status_code == 415, answer.text
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert live.count() == before


LOG_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d"  # logging's asctime
    rb"|\[(INFO|WARNING|ERROR|DEBUG)\]"  # granian
    rb"|\{.*\}$"  # a JSON log record
    rb"|[IWE]\d{4} \d\d:\d\d:\d\d)"  # gRPC core
)


#: Legal header bytes that would forge a JSON log record if pasted into a line unescaped.
FORGED_ID = '"} {"level":"ERROR","message":"forged","x":"'


def test_logs_stay_one_line_per_record_with_hostile_input(live: Live) -> None:
    hostile = "a\r\nFAKE-LOG-LINE 2026-01-01 00:00:00 ERROR forged\x1b[2J\x1b]0;owned\x07\u2028x"
    agents = [
        "Mozilla/5.0 \x1b[31mred\x1b[0m \x07bell",
        "ua\u2028with\u2029separators\x85",
        "ua\x0bvt\x0cff\x7fdel",
    ]
    statuses = []
    for agent in agents:
        body: Mapping[str, object] = {
            "projectKey": live.key,
            "events": [{"type": "ua-test", "url": "/"}],
        }
        answer = requests.post(
            live.events_url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "User-Agent": agent.encode("utf-8")},
            timeout=5,
        )
        # HTTP forbids ASCII controls in header values: granian may refuse the request (400)
        # before the app sees it; otherwise it is stored with the controls removed.
        statuses.append(answer.status_code)
    assert set(statuses) <= {200, 400}, statuses
    assert statuses[1] == 200  # the Unicode separators are legal header bytes (obs-text)
    # A raw header with CR/LF in it cannot pass through HTTP/1.1 framing: send it anyway.
    head = (
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"User-Agent: ua\rFAKE-LOG-LINE\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _ = raw_http(live, head, [])
    assert 400 <= status < 500
    # Hostile values in every field, valid and invalid, snippet and batch, and an unknown key.
    for body in (
        {"type": hostile, "visitorId": hostile, "projectKey": live.key, "url": "/" + hostile},
        {"projectKey": hostile, "events": [{"type": hostile, "url": hostile, "id": hostile}]},
        {"projectKey": live.key, "userId": hostile, "events": [{"type": "x", "url": "/"}]},
        {hostile: hostile},
    ):
        headers = {"X-Request-ID": FORGED_ID, "Referer": FORGED_ID}
        answer = requests.post(live.events_url, json=body, timeout=5, headers=headers)
        assert 400 <= answer.status_code < 500, answer.text
    time.sleep(0.5)
    output = live.service.log_path.read_bytes()
    bad = [line for line in output.splitlines() if line and not LOG_LINE.match(line)]
    assert not bad, bad[:5]
    for line in output.splitlines():
        if line.startswith(b"{"):
            assert isinstance(json.loads(line), dict), line  # one whole record per line
    assert b'"message":"forged' not in output.replace(b" ", b"")
    assert b"\x1b" not in output and b"\x07" not in output
    assert not re.search(rb"(^|[\r\n])FAKE-LOG-LINE", output)
    record(
        "hostile User-Agent and fields vs the logs",
        None,
        None,
        user_agent_statuses=statuses,
        log_lines=len(output.splitlines()),
        lines_not_starting_a_record=len(bad),
        five_hundreds=0,
    )
    engine = create_engine(live.database_url)
    try:
        with engine.connect() as connection:
            stored = connection.execute(
                text("SELECT user_agent FROM events WHERE type = 'ua-test'")
            ).scalars()
            for agent in stored:
                assert agent is None or not re.search(r"[\x00-\x1f\x7f-\x9f]", agent), agent
    finally:
        engine.dispose()


def post_from(live: Live, key: str, origin: str | None, content_type: str) -> int:
    body = {"projectKey": key, "events": [{"type": "origin-test", "url": "/"}]}
    headers = {"Content-Type": content_type}
    if origin is not None:
        headers["Origin"] = origin
    data = json.dumps(body).encode()
    return requests.post(live.events_url, data=data, headers=headers, timeout=5).status_code


@pytest.mark.parametrize(
    ("origin", "content_type", "status"),
    [
        ("https://evil.example", "application/json", 403),
        ("https://evil.example", "text/plain", 403),  # sendBeacon, no preflight
        ("null", "text/plain", 403),  # sandboxed iframe, file://
        ("https://shop.example.evil.example", "application/json", 403),
        ("http://shop.example", "application/json", 403),  # another scheme is another site
        ("https://shop.example:8443", "application/json", 403),
        (SHOP, "application/json", 200),
        ("https://SHOP.example:443", "text/plain", 200),  # the same origin, spelled otherwise
        (None, "application/json", 200),  # server-side batch: browsers always send Origin
    ],
)
def test_origin_allowlist(live: Live, origin: str | None, content_type: str, status: int) -> None:
    before = live.count()
    assert post_from(live, live.locked_key, origin, content_type) == status
    assert live.count() == before + (1 if status == 200 else 0)
    # A project without an allowlist takes any origin.
    assert post_from(live, live.key, origin, content_type) == 200
