"""gRPC answers to HTTP: statuses, Retry-After, deadlines, retries, the server being down."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.v1 import ingest_pb2
from gateway.grpc_client import IngestClient
from tests.gateway.conftest import Api, FakeServer, Handler, closed_port_target, fake_app

StartFake = Callable[[Handler], FakeServer]

SNIPPET = {"type": "pageview", "visitorId": "v", "projectKey": "pk_test", "url": "/"}
BATCH = {
    "projectKey": "pk_test",
    "events": [{"type": "a", "url": "/"}, {"type": "b", "url": "/", "id": "mine"}],
}


def api_for(target: str, **config: Any) -> Api:
    return Api(fake_app(target, **config).test_client())


def abort_with(context: grpc.ServicerContext, code: int, message: str, *details: Any) -> None:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    context.abort_with_status(
        rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    )


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def error(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.get_json()["error"]
    return body


def test_request_sent_to_the_server(fake_server: StartFake) -> None:
    fake = fake_server(lambda request, context: len(request.events))
    api = api_for(fake.target)
    response = api.post(
        {**BATCH, "userId": "u1"},
        headers={"User-Agent": "sdk/1.0", "Origin": "https://a.example"},
    )
    assert response.get_json() == {"received": 2}
    [request] = fake.servicer.requests
    assert request.project_key == "pk_test"
    assert request.user_id == "u1"
    assert request.context == ingest_pb2.RequestContext(
        client_ip="127.0.0.1",
        user_agent="sdk/1.0",
        origin="https://a.example",
        request_id=response.headers["X-Request-ID"],  # the one in the answer
    )
    first, second = request.events
    assert len(first.id) == 32  # stamped by the gateway (uuid4 hex, the one id format)
    assert second.id == "mine"  # the client's own is kept


def test_invalid_argument_maps_paths_to_json_names(fake_server: StartFake) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        violations = [
            ("events[1].visitor_id", "too long"),
            ("project_key", "is required"),
            ("user_id", "bad"),
            ("events[0].data", "too deep"),
        ]
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        abort_with(context, code_pb2.INVALID_ARGUMENT, "4 violations", bad)
        return 0

    api = api_for(fake_server(refuse).target)
    body = error(api.post(BATCH))
    assert body["code"] == "invalid_request"
    assert body["details"] == [
        {"field": "events[1].visitorId", "description": "too long"},
        {"field": "projectKey", "description": "is required"},
        {"field": "userId", "description": "bad"},
        {"field": "events[0].data", "description": "too deep"},
    ]


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [
        (code_pb2.UNAUTHENTICATED, 401, "unauthorized"),
        (code_pb2.PERMISSION_DENIED, 403, "forbidden"),
        (code_pb2.INTERNAL, 502, "bad_gateway"),
        (code_pb2.UNKNOWN, 502, "bad_gateway"),
        (code_pb2.UNIMPLEMENTED, 502, "bad_gateway"),
        (code_pb2.FAILED_PRECONDITION, 502, "bad_gateway"),
    ],
)
def test_status_codes(fake_server: StartFake, code: int, status: int, error_code: str) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        abort_with(context, code, "secret internal detail: db at 10.0.0.5")
        return 0

    api = api_for(fake_server(refuse).target)
    response = api.post(SNIPPET)
    assert response.status_code == status
    assert error(response)["code"] == error_code
    if status >= 500:
        assert "10.0.0.5" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("code", "status", "delay", "retry_after"),
    [
        (code_pb2.RESOURCE_EXHAUSTED, 429, 2.2, "3"),
        (code_pb2.RESOURCE_EXHAUSTED, 429, 0.0, "1"),
        (code_pb2.UNAVAILABLE, 503, 7.0, "7"),
        (code_pb2.UNAVAILABLE, 503, 0.2, "1"),
    ],
)
def test_retry_after_from_retry_info(
    fake_server: StartFake, code: int, status: int, delay: float, retry_after: str
) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        abort_with(context, code, "come back later", retry_info(delay))
        return 0

    api = api_for(fake_server(refuse).target)
    response = api.post(SNIPPET)
    assert response.status_code == status
    assert response.headers["Retry-After"] == retry_after


def test_unavailable_is_retried_by_grpc_with_the_same_ids(fake_server: StartFake) -> None:
    attempts: list[list[str]] = []

    def flaky(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        attempts.append([event.id for event in request.events])
        if len(attempts) < 3:
            abort_with(context, code_pb2.UNAVAILABLE, "storage blip", retry_info(1))
        return len(request.events)

    api = api_for(fake_server(flaky).target)
    assert api.post(BATCH).get_json() == {"received": 2}
    assert len(attempts) == 3
    # Every attempt carried the ids stamped once, before the first: the server stores each once.
    assert attempts[0] == attempts[1] == attempts[2]


def test_other_errors_are_not_retried(fake_server: StartFake) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        abort_with(context, code_pb2.INTERNAL, "boom")
        return 0

    fake = fake_server(refuse)
    assert api_for(fake.target).post(SNIPPET).status_code == 502
    assert len(fake.servicer.requests) == 1


def test_deadline_is_504(fake_server: StartFake) -> None:
    def slow(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        time.sleep(1.5)
        return 1

    api = api_for(fake_server(slow).target, APEX_GRPC_TIMEOUT=0.3)
    started = time.monotonic()
    response = api.post(SNIPPET)
    assert response.status_code == 504
    assert error(response)["code"] == "timeout"
    assert time.monotonic() - started < 1.2


def test_server_down_is_a_fast_503() -> None:
    api = api_for(closed_port_target(), APEX_GRPC_TIMEOUT=5)
    started = time.monotonic()
    response = api.post(SNIPPET)
    assert response.status_code == 503
    assert error(response)["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 2.0


def test_healthz_with_the_server_down() -> None:
    client = fake_app(closed_port_target()).test_client()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["status"] == "UNAVAILABLE"


def test_a_list_of_servers_is_balanced_round_robin(fake_server: StartFake) -> None:
    one = fake_server(lambda request, context: 1)
    two = fake_server(lambda request, context: 1)
    target = "ipv4:" + ",".join(server.target for server in (one, two))
    api = api_for(target)
    # Until both connections are up, round_robin uses the ready one; then it alternates.
    for _ in range(40):
        assert api.post(SNIPPET).status_code == 200
    counts = len(one.servicer.requests), len(two.servicer.requests)
    assert sum(counts) == 40
    assert min(counts) >= 15, counts


def test_channel_is_made_once_per_process(
    fake_server: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_server(lambda request, context: 1)
    client = IngestClient(fake.target, timeout=5)
    request = ingest_pb2.IngestEventsRequest(project_key="k")
    client.ingest(request)
    first = client._channel
    client.ingest(request)
    assert client._channel is first  # reused
    # In a forked worker (another pid) the inherited channel is not used.
    monkeypatch.setattr("gateway.grpc_client.os.getpid", lambda: -1)
    client.ingest(request)
    assert client._channel is not first
    assert len(fake.servicer.requests) == 3


def test_no_channel_before_first_use() -> None:
    app = fake_app(closed_port_target())
    client: IngestClient = app.extensions["apex_gateway.grpc"]
    assert client._channel is None


def test_server_retry_after_wins_over_the_rate_limit_window(fake_server: StartFake) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        abort_with(context, code_pb2.UNAVAILABLE, "storage down", retry_info(2))
        return 0

    # The project's budget resets in up to an hour; storage is back in 2 s: say 2.
    api = api_for(fake_server(refuse).target, APEX_RATE_LIMIT="1000/hour")
    response = api.post(SNIPPET)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.headers["X-RateLimit-Remaining"] == "999"


def test_a_database_locked_past_the_statement_timeout_is_a_503_before_the_deadline(
    api: Api, project_key: str, grpc_server: Any
) -> None:
    """The server gives up on the lock (3 s by default) before the gateway's 5 s deadline."""
    import sqlite3

    holder = sqlite3.connect(grpc_server.database_url.removeprefix("sqlite:///"))
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        response = api.post({**SNIPPET, "projectKey": project_key})
        waited = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"] == "1"
    assert waited < 5
