"""Unit tests of the batching HTTP client ``apex_ingest.client.Apex`` against a local fake."""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from apex_ingest.client import Apex, ApexError
from apex_ingest.client.http import format_timestamp
from tests.client.sdk_fake_ingest import Answer, FakeIngest, Received, error_body, fake_ingest, ok
from tests.client.support import Errors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake() -> Iterator[FakeIngest]:
    with fake_ingest() as server:
        yield server


def client(fake: FakeIngest, **kwargs: Any) -> Apex:
    options: dict[str, Any] = {"flush_interval": 60.0, "backoff_base": 0.01, "timeout": 5.0}
    options.update(kwargs)
    return Apex("pk_test", fake.url, **options)


def test_batch_is_gzip_json_with_an_id_per_event(fake: FakeIngest) -> None:
    apex = client(fake)
    ids = [apex.track("pageview", f"/p/{i}", {"n": i}, visitor_id="v1") for i in range(3)]
    assert apex.flush(5)
    apex.close()

    [request] = fake.requests
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["Content-Type"] == "application/json"
    assert request.raw[:2] == b"\x1f\x8b" and gzip.decompress(request.raw) == request.body
    assert request.json["projectKey"] == "pk_test"
    assert "userId" not in request.json
    assert request.ids == ids
    assert all(uuid.UUID(i).version == 4 for i in ids)
    first = request.json["events"][0]
    assert first["type"] == "pageview" and first["url"] == "/p/0" and first["data"] == {"n": 0}
    assert first["visitorId"] == "v1"
    # Stamped at track time, with an offset: the batch leaves seconds later.
    stamped = datetime.fromisoformat(first["timestamp"])
    assert stamped.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - stamped).total_seconds()) < 10


def test_caller_supplied_id_and_timestamp_are_kept(fake: FakeIngest) -> None:
    apex = client(fake)
    when = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    assert apex.track("click", "/x", id="my-id", timestamp=when) == "my-id"
    apex.close()
    event = fake.requests[0].json["events"][0]
    assert event["id"] == "my-id"
    assert event["timestamp"] == "2024-05-01T12:30:00+02:00"


def test_timestamps_are_rfc3339_with_offset_and_naive_means_utc() -> None:
    assert format_timestamp(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05+00:00"
    assert format_timestamp(datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)) == (
        "2024-01-02T03:04:05.600000+00:00"
    )
    assert format_timestamp(0) == "1970-01-01T00:00:00+00:00"
    assert format_timestamp("2024-01-02T03:04:05Z") == "2024-01-02T03:04:05Z"
    with pytest.raises(TypeError):
        format_timestamp(True)


def test_data_is_snapshotted_when_tracked(fake: FakeIngest) -> None:
    apex = client(fake)
    data: dict[str, Any] = {"items": [1]}
    apex.track("cart", "/cart", data)
    data["items"].append(2)
    apex.close()
    assert fake.requests[0].json["events"][0]["data"] == {"items": [1]}


def test_numbers_and_unicode_round_trip_exactly(fake: FakeIngest) -> None:
    apex = client(fake)
    apex.track("n", "/", {"int": 3, "big": 9007199254740993, "float": 3.5, "text": "zürich ✓"})
    apex.close()
    body = fake.requests[0].body.decode()
    assert '"int":3,' in body and '"big":9007199254740993' in body and "zürich ✓" in body


def test_bad_arguments_raise_at_track_time(fake: FakeIngest) -> None:
    apex = client(fake)
    with pytest.raises(TypeError):
        apex.track("t", "/", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        apex.track("t", "/", {"x": float("nan")})
    with pytest.raises(TypeError):
        apex.track("t", "/", {"x": object()})
    with pytest.raises(TypeError):
        apex.track(None, "/")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        apex.track("t", "/", id=5)  # type: ignore[arg-type]
    assert apex.pending == 0
    apex.close()
    assert fake.requests == []


def test_batches_per_user_id(fake: FakeIngest) -> None:
    apex = client(fake)
    for i in range(12):
        apex.track("e", f"/{i}", user_id=[None, "alice", "bob", ""][i % 4])
    apex.close()
    by_user = {r.json.get("userId"): len(r.json["events"]) for r in fake.requests}
    # "" means no user to the server, so those events travel with the anonymous ones.
    assert by_user == {None: 6, "alice": 3, "bob": 3}
    assert len(fake.requests) == 3


def test_split_at_500_and_full_batches_go_without_waiting(fake: FakeIngest) -> None:
    apex = client(fake, flush_interval=3600.0)
    ids = [apex.track("e", "/", user_id="u") for _ in range(1234)]
    # Two full batches leave at once; the 234 rest wait for the interval or a flush.
    assert fake.wait_for_requests(2, timeout=10)
    time.sleep(0.2)
    assert [len(r.ids) for r in fake.requests] == [500, 500]
    assert apex.flush(10)
    assert [len(r.ids) for r in fake.requests] == [500, 500, 234]
    assert fake.accepted_ids() == ids
    apex.close()


def test_split_by_body_size(fake: FakeIngest) -> None:
    apex = client(fake, max_body_bytes=4000)
    ids = [apex.track("e", "/", {"pad": "x" * 300}) for _ in range(50)]
    apex.close()
    assert len(fake.requests) > 1
    assert all(len(r.body) <= 4000 for r in fake.requests)
    assert fake.accepted_ids() == ids


def test_flush_interval_sends_without_flush(fake: FakeIngest) -> None:
    apex = client(fake, flush_interval=0.2)
    apex.track("e", "/")
    assert fake.wait_for_requests(1, timeout=5)
    apex.close()


def test_503_then_200_stores_each_event_once(fake: FakeIngest) -> None:
    def responder(request: Received, n: int) -> Answer:
        if n < 2:
            return 503, {"Retry-After": "0"}, error_body("unavailable", "storage down")
        return ok(request, n)

    fake.responder = responder
    errors = Errors()
    apex = client(fake, on_error=errors)
    ids = [apex.track("e", f"/{i}") for i in range(20)]
    assert apex.flush(10)
    apex.close()
    assert [r.status for r in fake.requests] == [503, 503, 200]
    # Every attempt carried the same ids, so the server stores one copy of each.
    assert all(r.ids == ids for r in fake.requests)
    assert Counter(fake.accepted_ids()) == Counter({i: 1 for i in ids})
    assert errors.calls == []


def test_429_honours_retry_after(fake: FakeIngest) -> None:
    def responder(request: Received, n: int) -> Answer:
        if n == 0:
            return 429, {"Retry-After": "1"}, error_body("rate_limited", "slow down")
        return ok(request, n)

    fake.responder = responder
    times: list[float] = []
    original = fake.responder

    def timed(request: Received, n: int) -> Answer:
        times.append(time.monotonic())
        return original(request, n)

    fake.responder = timed
    apex = client(fake)
    ids = [apex.track("e", "/") for _ in range(5)]
    assert apex.flush(10)
    apex.close()
    assert [r.status for r in fake.requests] == [429, 200]
    assert times[1] - times[0] >= 0.95
    assert fake.accepted_ids() == ids


def test_retries_give_up_after_max_retries(fake: FakeIngest) -> None:
    fake.responder = lambda r, n: (503, {}, error_body("unavailable", "storage down"))
    errors = Errors()
    apex = client(fake, on_error=errors, max_retries=3)
    ids = [apex.track("e", "/") for _ in range(4)]
    assert apex.flush(10)
    apex.close()
    assert len(fake.requests) == 4
    [(error, events)] = errors.calls
    assert error.status == 503 and error.code == "unavailable" and error.message == "storage down"
    assert [e["id"] for e in events] == ids


def test_network_errors_are_retried_then_reported() -> None:
    errors = Errors()
    # A port nobody listens on: connection refused on every attempt.
    apex = Apex(
        "pk_test",
        "http://127.0.0.1:9",
        flush_interval=60,
        backoff_base=0.01,
        max_retries=2,
        on_error=errors,
    )
    apex.track("e", "/", user_id="u")
    assert apex.flush(10)
    apex.close()
    [(error, events)] = errors.calls
    assert error.code == "network_error" and error.status is None
    assert events[0]["userId"] == "u"


def test_400_reaches_on_error_without_retry(fake: FakeIngest) -> None:
    fake.responder = lambda r, n: (
        400,
        {},
        error_body("invalid_argument", "userId is too long", ("userId", "at most 128 characters")),
    )
    errors = Errors()
    apex = client(fake, on_error=errors)
    ids = [apex.track("e", "/", user_id="u" * 200) for _ in range(3)]
    assert apex.flush(10)
    apex.close()
    assert len(fake.requests) == 1
    [(error, events)] = errors.calls
    assert (error.status, error.code) == (400, "invalid_argument")
    assert error.message == "userId is too long"
    assert error.field_violations == [("userId", "at most 128 characters")]
    assert [e["id"] for e in events] == ids
    assert "userId is too long" in str(error)


def test_400_for_some_events_still_delivers_the_others(fake: FakeIngest) -> None:
    def responder(request: Received, n: int) -> Answer:
        bad = [
            (f"events[{i}].url", "must be an absolute URL or a path")
            for i, e in enumerate(request.json["events"])
            if e["url"] == "bad"
        ]
        if bad:
            return 400, {}, error_body("invalid_argument", "invalid events", *bad)
        return ok(request, n)

    fake.responder = responder
    errors = Errors()
    apex = client(fake, on_error=errors)
    urls = ["/a", "bad", "/b", "bad", "/c"]
    ids = [apex.track("e", url) for url in urls]
    apex.close()
    assert [r.status for r in fake.requests] == [400, 200]
    assert fake.accepted_ids() == [ids[0], ids[2], ids[4]]
    [(error, events)] = errors.calls
    assert [e["id"] for e in events] == [ids[1], ids[3]]
    # Paths now index the events handed to on_error.
    assert [f for f, _ in error.field_violations] == ["events[0].url", "events[1].url"]


def test_413_halves_the_batch(fake: FakeIngest) -> None:
    def responder(request: Received, n: int) -> Answer:
        if len(request.body) > 1500:
            return 413, {}, error_body("payload_too_large", "body over the limit")
        return ok(request, n)

    fake.responder = responder
    errors = Errors()
    apex = client(fake, on_error=errors)
    ids = [apex.track("e", "/", {"pad": "y" * 100}) for _ in range(40)]
    apex.close()
    assert sorted(fake.accepted_ids()) == sorted(ids)
    assert errors.calls == []


def test_redirect_is_an_error_not_a_silent_loss(fake: FakeIngest) -> None:
    fake.responder = lambda r, n: (302, {"Location": "/elsewhere"}, b"")
    errors = Errors()
    apex = client(fake, on_error=errors)
    apex.track("e", "/")
    apex.close()
    [(error, _)] = errors.calls
    assert error.status == 302


def test_queue_full_drops_the_newest_and_reports_it(fake: FakeIngest) -> None:
    errors = Errors()
    apex = client(fake, max_queue=5, on_error=errors)
    ids = [apex.track("e", f"/{i}") for i in range(8)]
    assert [e["id"] for e in errors.events] == ids[5:]
    assert all(error.code == "queue_full" for error, _ in errors.calls)
    apex.close()
    assert fake.accepted_ids() == ids[:5]


def test_queue_full_without_callback_logs_a_warning(
    fake: FakeIngest, caplog: pytest.LogCaptureFixture
) -> None:
    apex = client(fake, max_queue=1)
    with caplog.at_level(logging.WARNING, logger="apex_ingest.client"):
        apex.track("e", "/")
        apex.track("e", "/")
        apex.track("e", "/")
    apex.close()
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_undelivered_events_without_callback_are_logged(
    fake: FakeIngest, caplog: pytest.LogCaptureFixture
) -> None:
    fake.responder = lambda r, n: (401, {}, error_body("unauthenticated", "unknown projectKey"))
    apex = client(fake)
    with caplog.at_level(logging.WARNING, logger="apex_ingest.client"):
        apex.track("e", "/")
        apex.close()
    assert any("unknown projectKey" in r.getMessage() for r in caplog.records)


def test_a_failing_callback_does_not_stop_the_sender(fake: FakeIngest) -> None:
    def explode(error: ApexError, events: list[dict[str, Any]]) -> None:
        raise RuntimeError("boom")

    fake.responder = lambda r, n: (
        (400, {}, error_body("invalid_argument", "no")) if n == 0 else ok(r, n)
    )
    apex = client(fake, on_error=explode)
    apex.track("e", "/")
    assert apex.flush(5)
    second = apex.track("e", "/")
    assert apex.flush(5)
    apex.close()
    assert fake.accepted_ids() == [second]


def test_flush_semantics(fake: FakeIngest) -> None:
    release = threading.Event()

    def hanging(request: Received, n: int) -> Answer:
        release.wait(10)
        return ok(request, n)

    apex = client(fake)
    assert apex.flush(0.1)  # nothing queued: returns at once
    fake.responder = hanging
    first = apex.track("e", "/")
    assert not apex.flush(0.3)  # the request is in flight and the server holds it
    second = apex.track("e", "/")
    release.set()
    assert apex.flush(10)
    # flush() covers everything tracked before it was called, including the in-flight batch.
    assert fake.accepted_ids() == [first, second]
    apex.close()


def test_flush_from_many_threads_at_once(fake: FakeIngest) -> None:
    apex = client(fake)
    results: list[bool] = []

    def work(n: int) -> None:
        for i in range(50):
            apex.track("e", f"/{n}/{i}", user_id=f"u{n}")
        results.append(apex.flush(10))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    apex.close()
    assert results == [True] * 6
    assert len(fake.accepted_ids()) == len(set(fake.accepted_ids())) == 300


def test_concurrent_tracking_delivers_each_event_once(fake: FakeIngest) -> None:
    apex = client(fake, flush_interval=0.05)
    tracked: list[list[str]] = [[] for _ in range(8)]

    def work(n: int) -> None:
        for i in range(1000):
            tracked[n].append(apex.track("e", "/", {"i": i}, user_id=f"u{n % 3}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert apex.close(30)
    expected = [i for ids in tracked for i in ids]
    assert len(set(expected)) == 8000
    assert Counter(fake.accepted_ids()) == Counter(expected)
    assert all(len(r.ids) <= 500 for r in fake.requests)


def test_close_flushes_and_later_tracks_are_reported(fake: FakeIngest) -> None:
    errors = Errors()
    apex = client(fake, on_error=errors)
    ids = [apex.track("e", "/") for _ in range(3)]
    assert apex.close(5)
    assert fake.accepted_ids() == ids
    late = apex.track("e", "/")
    [(error, events)] = errors.calls
    assert error.code == "closed" and events[0]["id"] == late
    assert apex.close(1)  # idempotent
    assert apex.flush(1)


def test_close_with_timeout_gives_up_and_reports(fake: FakeIngest) -> None:
    fake.responder = lambda r, n: (503, {"Retry-After": "30"}, error_body("unavailable", "down"))
    errors = Errors()
    apex = client(fake, on_error=errors, backoff_max=30.0)
    ids = [apex.track("e", "/") for _ in range(3)]
    started = time.monotonic()
    assert not apex.close(0.5)
    assert time.monotonic() - started < 5
    [(error, events)] = errors.calls
    assert error.code == "shutdown"
    assert [e["id"] for e in events] == ids


def test_close_at_interpreter_exit_sends_everything(fake: FakeIngest, tmp_path: Path) -> None:
    script = tmp_path / "exit_without_flush.py"
    script.write_text(
        "import sys\n"
        "from apex_ingest.client import Apex\n"
        "apex = Apex('pk_test', sys.argv[1], flush_interval=3600)\n"
        "for i in range(1500):\n"
        "    apex.track('e', '/', {'i': i}, user_id=str(i % 4))\n"
        "print('tracked')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), fake.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    events = [e for r in fake.accepted for e in r.json["events"]]
    assert sorted(e["data"]["i"] for e in events) == list(range(1500))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_has_its_own_sender_and_queue(fake: FakeIngest) -> None:
    apex = client(fake)
    before = [apex.track("e", "/parent", {"who": "parent"}) for _ in range(3)]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_end)
            child_ids = [apex.track("e", "/child", {"who": "child"}) for _ in range(4)]
            flushed = apex.flush(10)
            apex.close(10)
            os.write(write_end, json.dumps({"ids": child_ids, "flushed": flushed}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report["flushed"] is True
    # The child sent only its own events; the parent's queue was untouched by the fork.
    assert fake.accepted_ids() == report["ids"]
    after = apex.track("e", "/parent", {"who": "parent"})
    assert apex.flush(10)
    apex.close()
    assert Counter(fake.accepted_ids()) == Counter([*report["ids"], *before, after])


def _track_in_child(url: str, who: str, count: int) -> None:
    apex = Apex("pk_test", url, flush_interval=3600)
    for i in range(count):
        apex.track("e", "/", {"who": who, "i": i})
    # No flush and no close: the child ends through multiprocessing's os._exit.


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_child_exit_sends_everything(fake: FakeIngest, method: str) -> None:
    context: Any = multiprocessing.get_context(method)
    process = context.Process(target=_track_in_child, args=(fake.url, method, 700))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    events = [e for r in fake.accepted for e in r.json["events"]]
    assert sorted(e["data"]["i"] for e in events) == list(range(700))


def test_constructor_validates_limits() -> None:
    with pytest.raises(ValueError):
        Apex("pk", max_batch=501)
    with pytest.raises(ValueError):
        Apex("", "http://x")
    with pytest.raises(ValueError):
        Apex("pk", max_queue=0)


def test_importing_the_http_client_does_not_load_grpc_or_the_server() -> None:
    code = (
        "import sys\n"
        "from apex_ingest.client import Apex\n"
        "heavy = [m for m in ('grpc', 'sqlalchemy', 'flask', 'apex_ingest.server') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
