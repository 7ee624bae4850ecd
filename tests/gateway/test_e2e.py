"""End to end through `apex-ingest serve` (granian + gRPC server) on PostgreSQL."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import make_project
from tests.gateway.conftest import stored
from tests.service import Service, running_service

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.postgres


def readme_curl_examples() -> list[tuple[str, str]]:
    """(command, expected answer) of each curl example to /api/events in the README."""
    examples = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL):
        if "curl" in block and "/api/events" in block:
            command, _, expected = block.partition("\n# ")
            examples.append((command.strip(), expected.strip()))
    return examples


@pytest.fixture
def service(postgres_url: str) -> Iterator[Service]:
    with running_service(postgres_url) as running:
        yield running


def test_readme_curl_examples_verbatim(service: Service, postgres_url: str) -> None:
    examples = readme_curl_examples()
    assert [expected for _, expected in examples] == ['{"received": 1}', '{"received": 3}']
    key = make_project(postgres_url, "readme")
    for command, expected in examples:
        # The README's commands as written, pointed at this service and a real key.
        command = command.replace("http://127.0.0.1:8080", service.base_url)
        command = command.replace("pk_live_YOURKEY", key)
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == json.loads(expected), service.output()
    rows = stored(postgres_url)
    assert [row["type"] for row in rows] == ["pageview", "signup", "form_submit", "purchase"]
    assert json.loads(rows[0]["data"]) == {"plan": "pro", "seats": 3}
    assert rows[0]["referrer"] == "https://google.com/"
    assert rows[0]["user_agent"].startswith("curl/")
    assert rows[0]["ip"] == "127.0.0.1"
    assert {row["user_id"] for row in rows[1:]} == {"user_42"}
    assert rows[1]["event_id"] == "evt-1"
    # JSONB keeps the number's digits: 49.90 stays a decimal with its scale.
    assert '"amount": 49.90' in rows[3]["data"]


def test_real_http_behaviour(service: Service, postgres_url: str) -> None:
    key = make_project(postgres_url, "e2e")
    url = f"{service.base_url}/api/events"

    def event(**fields: Any) -> dict[str, Any]:
        return {"type": "pageview", "visitorId": "v1", "projectKey": key, "url": "/", **fields}

    # Exact numbers on PostgreSQL's JSONB.
    data = (
        '{"big":9007199254740993,"int":3,"float":1.0,"huge":123456789012345678901234567890,'
        '"pi":3.14159265358979323846264}'
    )
    body = json.dumps(event())[:-1] + ',"data":' + data + "}"
    answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.json() == {"received": 1}, answer.text
    assert int(answer.headers["X-RateLimit-Limit"]) == 100

    # A sendBeacon body, gzip, and a chunked upload within the limit.
    beacon = requests.post(
        url, data=json.dumps(event()), headers={"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert beacon.json() == {"received": 1}
    zipped = requests.post(
        url,
        data=gzip.compress(json.dumps(event()).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert zipped.json() == {"received": 1}
    chunked = requests.post(
        url,
        data=iter([json.dumps(event()).encode()]),
        headers={"Content-Type": "application/json"},
    )
    assert chunked.json() == {"received": 1}

    # Oversized: with Content-Length, chunked (no Content-Length), and a gzip bomb.
    huge = b'{"pad":"' + b"x" * (1024 * 1024) + b'"}'
    assert (
        requests.post(url, data=huge, headers={"Content-Type": "application/json"}).status_code
        == 413
    )
    pieces = iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)])
    too_big_chunked = requests.post(url, data=pieces, headers={"Content-Type": "application/json"})
    assert too_big_chunked.status_code == 413
    bomb = gzip.compress(b" " * (64 * 1024 * 1024), compresslevel=9)
    exploded = requests.post(
        url, data=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert exploded.status_code == 413
    assert exploded.json()["error"]["code"] == "payload_too_large"

    # Other answers of the real server.
    assert requests.get(url).status_code == 405
    assert requests.post(url, data="{}", headers={"Content-Type": "text/html"}).status_code == 415
    preflight = requests.options(
        url,
        headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Max-Age"] == "86400"
    assert requests.get(f"{service.base_url}/api/openapi.json").json()["openapi"] == "3.1.0"

    rows = stored(postgres_url)
    assert len(rows) == 4
    stored_data = json.loads(rows[0]["data"], parse_float=str, parse_int=str)
    assert stored_data == {
        "big": "9007199254740993",
        "int": "3",
        "float": "1.0",
        "huge": "123456789012345678901234567890",
        "pi": "3.14159265358979323846264",
    }


def test_the_in_memory_rate_limit_holds_across_gateway_workers(sqlite_url: str) -> None:
    """Two granian workers, one limit: each used to count alone and let twice the limit in."""
    key = make_project(sqlite_url)
    body = {"type": "pageview", "visitorId": "v", "projectKey": key, "url": "/"}
    with running_service(sqlite_url, env={"APEX_RATE_LIMIT": "20/minute"}) as running:
        # A new connection per request: the kernel spreads connections over the workers.
        statuses = [
            requests.post(f"{running.base_url}/api/events", json=body, timeout=10).status_code
            for _ in range(60)
        ]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 40
