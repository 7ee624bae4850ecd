"""The coalescer (gateway/coalescer.py): concurrent HTTP requests in one IngestMany call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import pytest
from flask import Flask
from google.rpc import code_pb2

from apex_ingest.common.rpc import retry_info
from apex_ingest.v1 import ingest_pb2
from gateway.coalescer import Coalescer
from gateway.grpc_client import IngestClient
from tests.conftest import RunningServer, make_project, start_server
from tests.gateway.conftest import FakeServer, Handler, assert_documented, fake_app, stored
from tests.tcp_proxy import TcpProxy

StartFake = Callable[[Handler], FakeServer]


def snippet(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "pageview", "visitorId": "v", "projectKey": key, "url": "/", **fields}


class Recorder:
    """Wraps an app's IngestClient.ingest_many: records each call's requests; the first call
    can be held until released, so that the requests arriving meanwhile queue up."""

    def __init__(self, app: Flask, hold_first: bool = False) -> None:
        self.client = cast(IngestClient, app.extensions["apex_gateway.grpc"])
        self.calls: list[list[ingest_pb2.IngestEventsRequest]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        real = self.client.ingest_many

        def ingest_many(
            requests: Sequence[ingest_pb2.IngestEventsRequest], timeout: float
        ) -> Sequence[ingest_pb2.IngestResult]:
            self.calls.append(
                [ingest_pb2.IngestEventsRequest.FromString(r.SerializeToString()) for r in requests]
            )
            self.started.set()
            self.release.wait(10)
            return real(requests, timeout)

        self.client.ingest_many = ingest_many  # type: ignore[method-assign]


def post(app: Flask, body: Any, headers: dict[str, str] | None = None) -> Any:
    response = app.test_client().post("/api/events", json=body, headers=headers or {})
    assert_documented(response)
    return response


def app_for(target: str, **config: Any) -> Flask:
    return fake_app(target, APEX_RATE_LIMIT_STORAGE="memory://", **config)


def wait_queued(app: Flask, count: int) -> None:
    coalescer: Coalescer = app.extensions["apex_gateway.coalescer"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with coalescer._lock:
            if len(coalescer._queue) >= count:
                return
        time.sleep(0.005)
    raise AssertionError(f"{count} requests were not queued")


def test_mixed_requests_in_one_call_each_get_their_own_answer(
    grpc_server: RunningServer, project_key: str
) -> None:
    database_url = grpc_server.database_url
    strict_key = make_project(database_url, "strict", allowed_origins=("https://shop.example",))
    app = app_for(grpc_server.target)
    recorder = Recorder(app, hold_first=True)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, app, snippet(project_key, id="first"))
        assert recorder.started.wait(5)
        cases = {
            "valid": pool.submit(post, app, snippet(project_key, id="valid")),
            "invalid": pool.submit(post, app, snippet(project_key, url="not a url")),
            "unknown key": pool.submit(post, app, snippet("pk_nobody")),
            "origin refused": pool.submit(
                post, app, snippet(strict_key), {"Origin": "https://evil.example"}
            ),
            "origin allowed": pool.submit(
                post, app, snippet(strict_key, id="allowed"), {"Origin": "https://shop.example"}
            ),
        }
        wait_queued(app, len(cases))
        recorder.release.set()
        answers = {name: future.result(10) for name, future in cases.items()}
        assert first.result(10).status_code == 200
    assert [len(call) for call in recorder.calls] == [1, 5]  # the five went together
    assert answers["valid"].status_code == 200
    assert answers["valid"].get_json() == {"received": 1}
    assert answers["invalid"].status_code == 400
    assert [d["field"] for d in answers["invalid"].get_json()["error"]["details"]] == ["url"]
    assert answers["unknown key"].status_code == 401
    assert answers["origin refused"].status_code == 403
    assert answers["origin allowed"].status_code == 200
    # Each request carried its own X-Request-ID in its context.
    ids = {r.context.request_id for r in recorder.calls[1]}
    assert ids == {a.headers["X-Request-ID"] for a in answers.values()}
    assert sorted(row["event_id"] for row in stored(database_url)) == ["allowed", "first", "valid"]


def test_a_deadline_that_passes_while_queued_sends_nothing(
    grpc_server: RunningServer, project_key: str
) -> None:
    app = app_for(grpc_server.target, APEX_GRPC_TIMEOUT=0.5)
    recorder = Recorder(app, hold_first=True)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, app, snippet(project_key, id="first"))
        assert recorder.started.wait(5)
        started = time.monotonic()
        late = post(app, snippet(project_key, id="late"))
        waited = time.monotonic() - started
        recorder.release.set()
        first.result(10)
    assert late.status_code == 504
    assert 0.4 < waited < 2
    time.sleep(0.3)  # the sender is free again: it would have sent "late" by now
    assert [[r.events[0].id for r in call] for call in recorder.calls] == [["first"]]
    assert [row["event_id"] for row in stored(grpc_server.database_url)] == ["first"]


def test_a_server_killed_mid_call_answers_everyone_and_stores_nothing_twice(
    sqlite_url: str,
) -> None:
    server = start_server(sqlite_url)
    key = make_project(sqlite_url)
    proxy = TcpProxy("127.0.0.1", server.port)
    app = app_for(f"127.0.0.1:{proxy.port}", APEX_GRPC_TIMEOUT=2)
    statuses: list[tuple[str, int]] = []
    lock = threading.Lock()

    def send(number: int) -> None:
        event_id = f"e{number}"
        response = post(app, snippet(key, id=event_id))
        with lock:
            statuses.append((event_id, response.status_code))

    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(send, n) for n in range(200)]
            time.sleep(0.05)
            proxy.cut()  # every connection to the server drops, calls in flight included
            time.sleep(0.3)
            proxy.restore()
            for future in futures:
                future.result(30)
    finally:
        proxy.close()
        server.server.stop(0)
    assert len(statuses) == 200
    assert {status for _, status in statuses} <= {200, 503, 504}
    rows = [row["event_id"] for row in stored(sqlite_url)]
    assert len(rows) == len(set(rows))  # none stored twice
    acked = {event_id for event_id, status in statuses if status == 200}
    assert acked <= set(rows)  # every 200 is stored


def test_an_older_server_gets_one_ingest_events_call_per_request(
    fake_server: StartFake,
) -> None:
    fake = fake_server(lambda request, context: len(request.events))  # no IngestMany
    app = app_for(fake.target)
    recorder = Recorder(app)
    for number in range(3):
        response = post(app, snippet("pk_test", id=f"e{number}"))
        assert response.status_code == 200
        assert response.get_json() == {"received": 1}
    # One IngestMany attempt (UNIMPLEMENTED), then IngestEvents for that request and the rest.
    assert len(recorder.calls) == 1
    assert [r.events[0].id for r in fake.servicer.requests] == ["e0", "e1", "e2"]


# --- The coalescer alone, in front of a stand-in client.


class StubClient:
    """IngestClient's two calls, answered by `answer` (request -> RequestStatus code)."""

    def __init__(self, answer: Callable[[ingest_pb2.IngestEventsRequest], int]) -> None:
        self.timeout = 5.0
        self.answer = answer
        self.calls: list[tuple[float, list[str]]] = []

    def ingest_many(
        self, requests: Sequence[ingest_pb2.IngestEventsRequest], timeout: float
    ) -> list[ingest_pb2.IngestResult]:
        self.calls.append((time.monotonic(), [r.events[0].id for r in requests]))
        results = []
        for request in requests:
            code = self.answer(request)
            if code == code_pb2.OK:
                results.append(ingest_pb2.IngestResult(received=len(request.events)))
            else:
                status = ingest_pb2.RequestStatus(
                    code=code, message="storage down", details=[retry_info(1)]
                )
                results.append(ingest_pb2.IngestResult(status=status))
        return results

    def ingest(self, request: ingest_pb2.IngestEventsRequest) -> int:
        raise AssertionError("not expected")


def one_event(event_id: str) -> ingest_pb2.IngestEventsRequest:
    return ingest_pb2.IngestEventsRequest(
        project_key="k", events=[ingest_pb2.Event(id=event_id, type="t", url="/")]
    )


@pytest.fixture
def stub() -> Iterator[Callable[..., tuple[Coalescer, StubClient]]]:
    made: list[Coalescer] = []

    def make(
        answer: Callable[[ingest_pb2.IngestEventsRequest], int] = lambda r: code_pb2.OK,
        linger: float = 0.0,
    ) -> tuple[Coalescer, StubClient]:
        client = StubClient(answer)
        coalescer = Coalescer(client, 2 * 1024 * 1024, linger=linger)  # type: ignore[arg-type]
        made.append(coalescer)
        return coalescer, client

    yield make
    for coalescer in made:
        assert coalescer.drain(5)


def test_a_lone_request_on_a_quiet_gateway_goes_at_once(stub: Any) -> None:
    coalescer, client = stub()
    coalescer.ingest(one_event("warm"))  # starts the sender thread
    delays = []
    for number in range(20):
        time.sleep(0.01)  # quiet: nothing else queued
        started = time.monotonic()
        assert coalescer.ingest(one_event(f"e{number}")) == 1
        delays.append(client.calls[-1][0] - started)
    delays.sort()
    assert delays[len(delays) // 2] < 0.002, delays  # no batching wait
    assert all(len(ids) == 1 for _, ids in client.calls)


def test_per_request_unavailable_is_sent_again_with_the_same_ids(stub: Any) -> None:
    seen: dict[str, int] = {}

    def flaky(request: ingest_pb2.IngestEventsRequest) -> int:
        event_id = request.events[0].id
        seen[event_id] = seen.get(event_id, 0) + 1
        if event_id == "blip" and seen[event_id] < 3:
            return int(code_pb2.UNAVAILABLE)
        return int(code_pb2.OK)

    coalescer, _client = stub(flaky)
    assert coalescer.ingest(one_event("blip")) == 1
    assert seen["blip"] == 3  # two UNAVAILABLE results, then stored: the same id each time


def test_unavailable_three_times_is_the_unavailable_error(stub: Any) -> None:
    coalescer, client = stub(lambda request: code_pb2.UNAVAILABLE)
    with pytest.raises(grpc.RpcError) as raised:
        coalescer.ingest(one_event("down"))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(client.calls) == 3


def test_calls_are_bounded_by_count_and_bytes(stub: Any) -> None:
    coalescer, client = stub()
    coalescer.max_requests = 4
    coalescer.max_bytes = 300
    release = threading.Event()
    real = client.ingest_many

    def slow(requests: Any, timeout: float) -> Any:
        release.wait(5)
        return real(requests, timeout)

    client.ingest_many = slow
    big = one_event("big")
    big.events[0].data = '{"x":"' + "y" * 1000 + '"}'  # alone over the byte bound
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(coalescer.ingest, one_event("first"))]
        time.sleep(0.05)
        futures += [pool.submit(coalescer.ingest, one_event(f"e{n}")) for n in range(6)]
        time.sleep(0.05)
        futures.append(pool.submit(coalescer.ingest, big))
        time.sleep(0.05)
        release.set()
        assert [f.result(5) for f in futures] == [1] * 8
    sizes = [len(ids) for _, ids in client.calls]
    assert sizes == [1, 4, 2, 1], client.calls


def test_a_call_lingers_for_the_other_requests_in_the_view_and_carries_them(
    stub: Any,
) -> None:
    coalescer, client = stub(linger=2.0)
    coalescer.ingest(one_event("warm"))
    first, second = coalescer.announce(), coalescer.announce()  # two requests in the view
    with ThreadPoolExecutor(2) as pool:
        sent_first = pool.submit(coalescer.ingest, one_event("first"))
        time.sleep(0.2)
        assert len(client.calls) == 1  # still waiting for the other one
        sent_second = pool.submit(coalescer.ingest, one_event("second"))
        assert sent_first.result(5) == 1 and sent_second.result(5) == 1
    first.leave()
    second.leave()
    assert [ids for _, ids in client.calls] == [["warm"], ["first", "second"]]
    assert coalescer._present == 0


def test_a_call_waits_the_linger_at_most(stub: Any) -> None:
    coalescer, client = stub(linger=0.3)
    coalescer.ingest(one_event("warm"))
    arrivals = [coalescer.announce() for _ in range(3)]  # two of them never queue anything
    started = time.monotonic()
    assert coalescer.ingest(one_event("first")) == 1
    assert 0.25 < time.monotonic() - started < 2
    for arrival in arrivals:
        arrival.leave()
    assert [ids for _, ids in client.calls] == [["warm"], ["first"]]


def test_a_lone_request_never_waits(stub: Any) -> None:
    coalescer, client = stub(linger=5.0)
    started = time.monotonic()
    # The very first request of the process enters the view before the sender exists.
    for number in range(5):
        arrival = coalescer.announce()
        assert coalescer.ingest(one_event(f"e{number}")) == 1
        arrival.leave()
    assert time.monotonic() - started < 1
    assert coalescer._present == 0
    assert all(len(ids) == 1 for _, ids in client.calls)
