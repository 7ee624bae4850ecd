"""The gRPC client ``IngestClient``: against a scripted servicer, then the real server."""

from __future__ import annotations

import os
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from apex_ingest_sdk import IngestClient, IngestError, grpc_client
from apex_ingest_sdk._proto import ingest_pb2 as sdk_pb2
from apex_ingest_sdk.grpc_client import to_event
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.common import rpc
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway.payload import parse_timestamp
from tests.client.support import count_rows
from tests.conftest import RunningServer, make_project

Handler = Callable[[ingest_pb2.IngestEventsRequest, grpc.ServicerContext], Any]


class ScriptedServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ingest_pb2.IngestEventsRequest] = []
        self.lock = threading.Lock()
        self.handler: Handler = self.accept

    @staticmethod
    def accept(
        request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        return ingest_pb2.IngestEventsResponse(received=len(request.events))

    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        with self.lock:
            self.requests.append(request)
        return self.handler(request, context)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _abort(context: grpc.ServicerContext, code: int, message: str, *details: Any) -> None:
    status = status_pb2.Status(code=code, message=message, details=[_packed(d) for d in details])
    context.abort_with_status(rpc_status.to_status(status))


# ------------------------------------------------------------------ conversion


def test_dict_events_become_proto_events_with_ids() -> None:
    event = to_event(
        {
            "type": "signup",
            "url": "/welcome",
            "visitorId": "v1",
            "data": {"n": 3, "big": 9007199254740993, "text": "zürich"},
            "timestamp": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        }
    )
    assert event.type == "signup" and event.url == "/welcome" and event.visitor_id == "v1"
    assert event.data == '{"n":3,"big":9007199254740993,"text":"zürich"}'
    assert event.timestamp.ToJsonString() == "2024-01-02T01:04:05Z"
    # The project's one id format: 32 lowercase hex characters (uuid4().hex).
    assert re.fullmatch(r"[0-9a-f]{32}", event.id)


def test_conversion_details() -> None:
    naive = to_event({"type": "t", "url": "/", "timestamp": datetime(2024, 1, 2)})
    assert naive.timestamp.ToJsonString() == "2024-01-02T00:00:00Z"
    text_ts = to_event({"type": "t", "url": "/", "timestamp": "2024-01-02T03:00:00+01:00"})
    assert text_ts.timestamp.ToJsonString() == "2024-01-02T02:00:00Z"
    # JSON text passes through byte for byte; huge integers survive the orjson fallback.
    assert to_event({"type": "t", "url": "/", "data": '{"a":1.0}'}).data == '{"a":1.0}'
    assert to_event({"type": "t", "url": "/", "data": {"x": 2**70}}).data == f'{{"x":{2**70}}}'
    given = ingest_pb2.Event(type="t", url="/", id="keep")
    assert to_event(given).id == "keep"
    blank = ingest_pb2.Event(type="t", url="/")
    stamped = to_event(blank)
    assert stamped.id and not blank.id  # the caller's message is left alone
    with pytest.raises(ValueError):
        to_event({"type": "t", "url": "/", "colour": "red"})
    with pytest.raises(TypeError):
        to_event({"type": "t", "url": "/", "data": [1, 2]})
    with pytest.raises(TypeError):
        to_event({"type": 5, "url": "/"})
    with pytest.raises(ValueError):
        to_event({"type": "t", "url": "/", "data": {"x": float("nan")}})  # not JSON
    with pytest.raises(TypeError):
        to_event(ingest_pb2.RequestContext())  # a message, but not an Event


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-02T03:04:05Z",
        "2024-01-02t03:04:05z",
        "2024-01-02t03:04:05.25+01:00",
        "2024-01-02 03:04:05Z",
        "2024-01-02T03:04:05",
    ],
)
def test_rfc_3339_text_reads_as_the_gateway_reads_it(text: str) -> None:
    expected = parse_timestamp(text)
    assert expected is not None
    event = to_event({"type": "t", "url": "/", "timestamp": text})
    assert event.timestamp.ToJsonString() == expected.ToJsonString()


def test_server_and_sdk_event_messages_are_both_accepted() -> None:
    server_event = ingest_pb2.Event(type="t", url="/", id="server")
    sdk_event = sdk_pb2.Event(type="t", url="/", id="sdk")
    assert to_event(server_event).id == "server"
    assert to_event(sdk_event).id == "sdk"
    assert isinstance(to_event(server_event), sdk_pb2.Event)


# ------------------------------------------------------------------ the SDK's copies of rpc facts


def test_sdk_calls_the_servers_method() -> None:
    assert grpc_client.SERVICE == rpc.SERVICE_NAME
    assert grpc_client.METHOD == rpc.INGEST_METHOD


@pytest.mark.parametrize(("attempts", "backoff"), [(2, "1s"), (3, "1s"), (5, "2s")])
def test_sdk_retry_policy_is_the_servers(attempts: int, backoff: str) -> None:
    assert grpc_client.service_config(attempts, backoff) == rpc.retry_service_config(
        attempts, backoff
    )


def test_sdk_decodes_rich_details_as_the_server_packs_them() -> None:
    status = status_pb2.Status(
        code=code_pb2.UNAVAILABLE,
        message="storage down",
        details=[
            *rpc.bad_request([("events[3].url", "bad"), ("userId", "long")]),
            rpc.retry_info(7),
        ],
    )
    error = IngestError.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.UNAVAILABLE, "storage down", status.SerializeToString())
    )
    assert error.field_violations == rpc.field_violations(status)
    assert error.retry_after == rpc.retry_delay(status) == 7.0


def test_sdk_event_ids_have_the_servers_format() -> None:
    shape = re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")
    for server_id in rpc.new_event_ids(50):
        assert shape.fullmatch(server_id)
    for _ in range(50):
        assert shape.fullmatch(to_event({"type": "t", "url": "/"}).id)


# ------------------------------------------------------------------ scripted server


def test_ingest_returns_received_and_reuses_one_channel(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    with IngestClient(target) as client:
        assert client.ingest("pk", [{"type": "a", "url": "/"}], user_id="u1") == 1
        channel = client._channel
        assert client.ingest("pk", [ingest_pb2.Event(type="b", url="/")] * 3) == 3
        assert client._channel is channel
    first, second = servicer.requests
    assert first.project_key == "pk" and first.user_id == "u1"
    assert len({e.id for e in second.events}) == 3  # each copy got an id of its own
    with pytest.raises(RuntimeError):
        client.ingest("pk", [{"type": "a", "url": "/"}])


def test_unavailable_is_retried_by_the_channel_with_the_same_ids(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted

    def flaky(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> Any:
        if len(servicer.requests) < 3:
            _abort(context, code_pb2.UNAVAILABLE, "storage down")
        return ScriptedServicer.accept(request, context)

    servicer.handler = flaky
    with IngestClient(target) as client:
        assert client.ingest("pk", [{"type": "a", "url": "/"}, {"type": "b", "url": "/"}]) == 2
    assert len(servicer.requests) == 3
    ids = [[e.id for e in r.events] for r in servicer.requests]
    assert ids[0] == ids[1] == ids[2]


def test_unavailable_after_all_attempts_raises_with_retry_info(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    delay = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
    servicer.handler = lambda r, c: _abort(c, code_pb2.UNAVAILABLE, "storage down", delay)
    with IngestClient(target, max_attempts=3) as client, pytest.raises(IngestError) as caught:
        client.ingest("pk", [{"type": "a", "url": "/"}])
    assert len(servicer.requests) == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.retry_after == 2.0


def test_invalid_argument_is_not_retried_and_carries_field_violations(
    scripted: tuple[ScriptedServicer, str],
) -> None:
    servicer, target = scripted
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="events[0].url", description="bad")
        ]
    )
    servicer.handler = lambda r, c: _abort(c, code_pb2.INVALID_ARGUMENT, "invalid events", bad)
    with IngestClient(target) as client, pytest.raises(IngestError) as caught:
        client.ingest("pk", [{"type": "a", "url": "x"}])
    assert len(servicer.requests) == 1
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "invalid events"
    assert error.field_violations == [("events[0].url", "bad")]
    assert "events[0].url" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.field_violations) == (error.code, error.field_violations)


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, message: str, details: bytes) -> None:
        self._code, self._message, self._details = code, message, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._details),)


def test_rich_details_that_contradict_the_status_line_are_ignored() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="f", description="d")]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="m", details=[_packed(bad)])
    raw = status.SerializeToString()
    agreeing = IngestError.from_rpc_error(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "m", raw))
    assert agreeing.field_violations == [("f", "d")]
    other_code = IngestError.from_rpc_error(_FakeRpcError(grpc.StatusCode.INTERNAL, "m", raw))
    other_message = IngestError.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "other", raw)
    )
    garbage = IngestError.from_rpc_error(
        _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "m", b"\xff\xff")
    )
    for error in (other_code, other_message, garbage):
        assert error.field_violations == [] and error.retry_after is None


def test_every_call_has_a_deadline(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    seen: list[float | None] = []

    def slow(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> Any:
        seen.append(context.time_remaining())
        threading.Event().wait(1.0)
        return ScriptedServicer.accept(request, context)

    servicer.handler = slow
    with IngestClient(target, timeout=0.3) as client, pytest.raises(IngestError) as caught:
        client.ingest("pk", [{"type": "a", "url": "/"}])
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server sees the client's 0.3 s deadline (give or take the clocks' rounding: 0.3001
    # was seen), not none and not a default.
    assert seen and seen[0] is not None and 0 < seen[0] <= 0.31


def test_unreachable_target_raises_unavailable() -> None:
    with IngestClient("127.0.0.1:9", timeout=2) as client, pytest.raises(IngestError) as caught:
        client.ingest("pk", [{"type": "a", "url": "/"}])
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_import_is_lazy() -> None:
    import apex_ingest_sdk as package

    assert package.IngestError is IngestError
    with pytest.raises(AttributeError):
        package.Nope  # noqa: B018


# ------------------------------------------------------------------ the real server


def test_real_server_stores_events_once(grpc_server: RunningServer, project_key: str) -> None:
    events = [
        {"type": "pageview", "url": f"/p/{i}", "data": {"i": i}, "timestamp": datetime.now(UTC)}
        for i in range(100)
    ]
    with IngestClient(grpc_server.target) as client:
        assert client.ingest(project_key, events, user_id="u1") == 100
        # The same Event messages (same ids) again: accepted, stored once.
        messages = [to_event(e) for e in events[:10]]
        assert client.ingest(project_key, messages) == 10
        assert client.ingest(project_key, messages) == 10
    assert count_rows(grpc_server.database_url) == (110, 110)


def test_real_server_field_violations(grpc_server: RunningServer, project_key: str) -> None:
    with IngestClient(grpc_server.target) as client, pytest.raises(IngestError) as caught:
        client.ingest(
            project_key,
            [{"type": "ok", "url": "/"}, {"type": "bad", "url": "not a url"}],
        )
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.field_violations] == ["events[1].url"]
    assert count_rows(grpc_server.database_url) == (0, 0)


def test_real_server_unknown_key(grpc_server: RunningServer) -> None:
    with IngestClient(grpc_server.target) as client, pytest.raises(IngestError) as caught:
        client.ingest("pk_live_nope", [{"type": "a", "url": "/"}])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.postgres
def test_real_server_on_postgres_from_threads(postgres_url: str) -> None:
    from tests.conftest import start_server

    running = start_server(postgres_url)
    try:
        key = make_project(postgres_url)
        with IngestClient(running.target) as client:

            def work(n: int) -> None:
                for b in range(5):
                    batch = [{"type": "t", "url": f"/{n}/{b}/{i}"} for i in range(100)]
                    assert client.ingest(key, batch, user_id=f"u{n}") == 100

            threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert count_rows(postgres_url) == (2000, 2000)
    finally:
        running.server.stop(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_channel(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    client = IngestClient(target)
    assert client.ingest("pk", [{"type": "parent", "url": "/"}]) == 1
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if client.ingest("pk", [{"type": "child", "url": "/"}]) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.ingest("pk", [{"type": "parent", "url": "/"}]) == 1
    client.close()
    assert [r.events[0].type for r in servicer.requests] == ["parent", "child", "parent"]
