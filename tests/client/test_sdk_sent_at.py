"""Both SDK clients send `sentAt` (issue #19): the HTTP client on each attempt, as it leaves."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from apex_ingest_sdk import Apex, IngestClient, Response
from sqlalchemy import create_engine, text

from tests.conftest import RunningServer


class FlakyTransport:
    """Answers 503 to the first request, 200 after; keeps every body sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        raw = gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body
        self.bodies.append(json.loads(raw))
        if len(self.bodies) == 1:
            time.sleep(0.05)  # so that the retry's stamp differs
            return Response(503, {"Retry-After": "0"}, b"")
        return Response(200, {}, b'{"received": 1}')


def test_the_http_client_stamps_sent_at_on_each_attempt() -> None:
    transport = FlakyTransport()
    apex = Apex("pk_test", "http://127.0.0.1:9", transport=transport, backoff_base=0.01)
    apex.track("signup", "/signup", user_id="u1")
    apex.flush()
    apex.close()
    assert len(transport.bodies) == 2
    stamps = [datetime.fromisoformat(str(body["sentAt"])) for body in transport.bodies]
    now = datetime.now(UTC)
    assert all(timedelta(0) <= now - stamp < timedelta(seconds=10) for stamp in stamps)
    assert stamps[1] > stamps[0]  # a retry is stamped anew
    assert transport.bodies[0]["events"] == transport.bodies[1]["events"]


def test_the_grpc_client_sends_sent_at(grpc_server: RunningServer, project_key: str) -> None:
    with IngestClient(grpc_server.target) as client:
        assert client.ingest(project_key, [{"type": "signup", "url": "/signup"}]) == 1
    engine = create_engine(grpc_server.database_url)
    try:
        with engine.connect() as connection:
            skew = connection.execute(text("SELECT clock_skew_ms FROM events")).scalar_one()
    finally:
        engine.dispose()
    assert skew == 0  # measured (not null), same machine: under the threshold
