"""Both SDK clients against the real service: `apex-ingest serve` (gateway + gRPC) + PostgreSQL.

Every test counts rows in the `events` table: "stored exactly once" means as many rows as distinct
event ids, and exactly the ids the client handed out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from apex_ingest_sdk import Apex, IngestClient, IngestError, Response
from apex_ingest_sdk.limits import MAX_BODY_BYTES
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.client.support import Errors, SpyTransport, count_rows
from tests.conftest import make_project
from tests.service import running_service
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
FAST = {"APEX_RATE_LIMIT": "100000/second"}


def stored_ids(database_url: str) -> list[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [r[0] for r in connection.execute(text("SELECT event_id FROM events"))]
    finally:
        engine.dispose()


@pytest.fixture
def service(postgres_url: str) -> Iterator[Any]:
    with running_service(postgres_url, env=FAST) as running:
        yield running


def test_thousands_of_events_from_threads_are_stored_exactly_once(
    service: Any, postgres_url: str
) -> None:
    key = make_project(postgres_url)
    errors = Errors()
    apex = Apex(key, service.base_url, flush_interval=0.2, on_error=errors)
    tracked: list[list[str]] = [[] for _ in range(6)]

    def work(n: int) -> None:
        for i in range(1000):
            user = f"user_{(n + i) % 5}" if i % 7 else None
            tracked[n].append(
                apex.track("load", f"/t/{n}/{i}", {"thread": n, "i": i}, user_id=user)
            )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert apex.close(120)
    assert errors.calls == []
    expected = sorted(i for ids in tracked for i in ids)
    assert len(set(expected)) == 6000
    assert count_rows(postgres_url) == (6000, 6000)
    assert sorted(stored_ids(postgres_url)) == expected


def test_400_reaches_on_error_and_the_rest_is_stored(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    errors = Errors()
    with Apex(key, service.base_url, on_error=errors) as apex:
        good = [apex.track("ok", f"/ok/{i}", user_id="u1") for i in range(3)]
        bad = apex.track("bad", "not a url", user_id="u1")
        nul = apex.track("bad", "/nul", {"text": "a\u0000b"}, user_id="u1")
        assert apex.flush(30)
    assert sorted(stored_ids(postgres_url)) == sorted(good)
    reported = {e["id"]: error for error, events in errors.calls for e in events}
    assert set(reported) == {bad, nul}
    for error in reported.values():
        assert (error.status, error.code) == (400, "invalid_request")
        assert error.message
    fields = {f for error, _ in errors.calls for f, _ in error.field_violations}
    assert any(f.startswith("events[") and f.endswith(".url") for f in fields), fields
    assert any(".data" in f for f in fields), fields


def test_unknown_key_reaches_on_error(service: Any, postgres_url: str) -> None:
    errors = Errors()
    with Apex("pk_live_unknown", service.base_url, on_error=errors) as apex:
        event_id = apex.track("e", "/")
    [(error, events)] = errors.calls
    assert (error.status, error.code) == (401, "unauthorized")
    assert [e["id"] for e in events] == [event_id]


class WrongPath(SpyTransport):
    """Posts where a misconfigured proxy or path prefix would: not the ingest endpoint."""

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        return super().send(
            url.replace("/api/events", "/api/event"), body, headers, timeout=timeout
        )


def test_wrong_path_fails_at_once(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    errors = Errors()
    transport = WrongPath()
    started = time.monotonic()
    with Apex(key, service.base_url, on_error=errors, transport=transport) as apex:
        event_id = apex.track("e", "/")
    assert time.monotonic() - started < 10  # not the retries' 20-90 s
    assert transport.statuses == [404]
    [(error, events)] = errors.calls
    assert (error.status, error.code) == (404, "not_found")
    assert "not an Apex Ingest gateway" in error.message
    assert [e["id"] for e in events] == [event_id]


def test_a_batch_filled_to_the_body_limit_is_accepted_at_once(
    service: Any, postgres_url: str
) -> None:
    """The gateway's 1 MiB counts the sentAt stamped on the request as it leaves."""
    key = make_project(postgres_url)
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def event(i: int, pad: int) -> dict[str, Any]:
        return {
            "id": f"{i:032x}",
            "type": "e",
            "url": "/",
            "timestamp": stamp,
            "data": {"pad": "x" * pad},
        }

    # 40 events fill a body to the byte before sentAt; the last one takes up the remainder.
    head = len(b'{"projectKey":' + json.dumps(key).encode() + b',"events":[')
    room = MAX_BODY_BYTES - head - len(b"]}") - 39  # the commas between the events
    bare = len(json.dumps(event(0, 0), separators=(",", ":")))
    pad = room // 40 - bare
    events = [event(i, pad) for i in range(39)] + [event(39, room - 39 * (bare + pad) - bare)]
    errors = Errors()
    spy = SpyTransport()
    with Apex(key, service.base_url, on_error=errors, transport=spy) as apex:
        for e in events:
            apex.track("e", "/", e["data"], timestamp=stamp, id=e["id"])
    assert errors.calls == []
    assert spy.statuses == [200, 200]  # 39 events, then 1: no 413 and no halving
    assert count_rows(postgres_url) == (40, 40)


def test_the_grpc_port_fails_at_once_saying_so(service: Any, postgres_url: str) -> None:
    """A user mixing up the two ports the README lists: reported at once, never retried."""
    key = make_project(postgres_url)
    errors = Errors()
    started = time.monotonic()
    with Apex(key, f"http://{service.grpc_target}", on_error=errors) as apex:
        apex.track("e", "/")
    assert time.monotonic() - started < 10  # not the retries' 20-90 s
    [(error, _)] = errors.calls
    assert (error.status, error.code) == (None, "not_a_gateway")
    assert "gRPC port" in error.message and "not an Apex Ingest gateway" in error.message


def test_close_at_exit_loses_nothing(service: Any, postgres_url: str, tmp_path: Path) -> None:
    key = make_project(postgres_url)
    script = tmp_path / "track_and_exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from apex_ingest_sdk import Apex

            apex = Apex(sys.argv[1], sys.argv[2], flush_interval=3600)
            for i in range(int(sys.argv[3])):
                apex.track("exit", f"/exit/{i}", {"i": i}, user_id=f"u{i % 3}")
            # No flush(), no close(): the atexit hook must deliver all of it.
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), key, service.base_url, "2500"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "not delivered" not in done.stderr, done.stderr
    assert count_rows(postgres_url) == (2500, 2500)


def test_storage_down_503_then_200_stores_one_copy(postgres_url: str) -> None:
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    key = make_project(postgres_url)
    try:
        with running_service(proxied, env=FAST) as running:
            errors = Errors()
            spy = SpyTransport()
            apex = Apex(
                key,
                running.base_url,
                on_error=errors,
                backoff_max=5.0,
                max_retries=10,
                transport=spy,
            )
            proxy.cut()
            ids = [apex.track("outage", f"/o/{i}", user_id="u") for i in range(50)]
            threading.Timer(2.0, proxy.restore).start()
            assert apex.flush(60)
            apex.close()
            assert errors.calls == []
            assert 503 in spy.statuses and spy.statuses[-1] == 200
        assert sorted(stored_ids(postgres_url)) == sorted(ids)
    finally:
        proxy.close()


def test_429_with_retry_after_stores_one_copy(postgres_url: str) -> None:
    key = make_project(postgres_url)
    with running_service(postgres_url, env={"APEX_RATE_LIMIT": "1/second"}) as running:
        errors = Errors()
        spy = SpyTransport()
        apex = Apex(key, running.base_url, on_error=errors, max_batch=10, transport=spy)
        started = time.monotonic()
        ids = [apex.track("limited", f"/l/{i}") for i in range(30)]  # three full batches
        assert apex.flush(60)
        apex.close()
        assert errors.calls == []
        assert 429 in spy.statuses
        assert time.monotonic() - started >= 1.0  # the second batch waited for its turn
    assert sorted(stored_ids(postgres_url)) == sorted(ids)


def test_grpc_client_against_the_service(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    with IngestClient(service.grpc_target) as client:
        events = [{"type": "grpc", "url": f"/g/{i}", "data": {"i": i}} for i in range(20)]
        assert client.ingest(key, events, user_id="svc") == 20

        with pytest.raises(IngestError) as invalid:
            client.ingest(key, [{"type": "ok", "url": "/"}, {"type": "x", "url": "nope"}])
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in invalid.value.field_violations] == ["events[1].url"]

        with pytest.raises(IngestError) as unknown:
            client.ingest("pk_live_unknown", [{"type": "x", "url": "/"}])
        assert unknown.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert count_rows(postgres_url) == (20, 20)
