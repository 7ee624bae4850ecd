"""A batch with hundreds of invalid events is a 400 naming them (issue #14 item 1), and a gRPC
transport limit never reads as a rate limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from apex_ingest.common.rpc import MAX_VIOLATION_BYTES
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import RunningServer
from tests.gateway.conftest import Api, FakeServer, Handler, assert_documented, fake_app
from tests.gateway.test_grpc_status import abort_with

Rows = Callable[[], list[dict[str, Any]]]


def bad_batch(key: str, bad: int, good: int = 3) -> dict[str, Any]:
    events = [{"type": "t", "url": "/ok", "id": f"ok{i}"} for i in range(good)]
    events += [{"type": "t", "url": "no url", "visitorId": "x" * 200} for _ in range(bad)]
    return {"projectKey": key, "events": events}


def test_five_hundred_invalid_events_are_a_400_naming_the_first(
    api: Api, project_key: str, rows: Rows
) -> None:
    response = api.post(bad_batch(project_key, bad=497))
    assert response.status_code == 400, response.get_data(as_text=True)
    assert_documented(response)
    body = response.get_json()["error"]
    details = body["details"]
    assert details[0] == {"field": "events[3].visitorId", "description": "must be 1-128 characters"}
    assert details[1] == {
        "field": "events[3].url",
        "description": "must be an absolute http(s) URL or a path starting with /",
    }
    assert 20 < len(details) < 2 * 497
    assert f"has {2 * 497} invalid fields; the first {len(details)} are listed" in body["message"]
    assert rows() == []  # a rejected request stores nothing, its valid events included


@pytest.mark.parametrize(
    ("events", "total"),
    [
        # One JSON type error, 499 value errors the server finds (each lacks its url).
        ([{"type": 5, "url": "/"}] + [{"type": "x"}] * 499, 500),
        # Type errors on every event: the gateway's own list is capped too.
        ([{"type": 5, "url": "/"}] * 500, 500),
        ([{"type": 5, "url": 6, "visitorId": 7, "id": 8, "data": 9, "timestamp": 10}] * 500, 3000),
    ],
    ids=["one-type-error", "all-type-errors", "six-per-event"],
)
def test_type_errors_and_the_servers_are_counted_and_capped_together(
    api: Api, project_key: str, rows: Rows, events: list[dict[str, Any]], total: int
) -> None:
    response = api.post({"projectKey": project_key, "events": events})
    assert response.status_code == 400, response.get_data(as_text=True)
    body = response.get_json()["error"]
    listed = len(body["details"])
    assert 20 < listed < total
    message = f"The request has {total} invalid fields; the first {listed} are listed."
    assert body["message"] == message
    assert len(response.get_data()) < 2 * MAX_VIOLATION_BYTES  # JSON: ~40 bytes a detail more
    assert rows() == []


def test_the_servers_detail_stays_under_the_metadata_limit(
    grpc_server: RunningServer, project_key: str
) -> None:
    with grpc.insecure_channel(grpc_server.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        events = [ingest_pb2.Event(type="t", url="nope", visitor_id="v" * 300)] * 500
        with pytest.raises(grpc.RpcError) as raised:
            stub.IngestEvents(
                ingest_pb2.IngestEventsRequest(project_key=project_key, events=events), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(raised.value.trailing_metadata())["grpc-status-details-bin"]
    assert len(details) < MAX_VIOLATION_BYTES + 1024


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("received metadata size exceeds hard limit", 502),
        ("Received message larger than max (3000000 vs. 2162688)", 413),
    ],
)
def test_a_transport_limit_is_not_a_rate_limit(
    fake_server: Callable[[Handler], FakeServer], text: str, status: int
) -> None:
    def refuse(request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext) -> int:
        abort_with(context, code_pb2.RESOURCE_EXHAUSTED, text)
        return 0

    app = fake_app(fake_server(refuse).target)
    response = app.test_client().post(
        "/api/events",
        json={"type": "pageview", "visitorId": "v", "projectKey": "k", "url": "/"},
    )
    assert response.status_code == status
    assert "Retry-After" not in response.headers
    assert response.get_json()["error"]["code"] != "rate_limited"


def test_a_status_stays_small_whatever_its_violations() -> None:
    from apex_ingest.server.errors import FieldViolation, InvalidRequest
    from apex_ingest.server.status import rich_status

    huge = [FieldViolation("f" * 5000, "d" * 5000)] * 1000
    status = rich_status(InvalidRequest(huge))
    assert len(status.SerializeToString()) <= MAX_VIOLATION_BYTES + 1024
    # Listed in order: once one does not fit, no later (shorter) one is listed after it.
    mixed = [FieldViolation("a", "x" * 300)] * 20 + [FieldViolation("b", "short")] * 5
    listed = [v.field for v in _bad_request(rich_status(InvalidRequest(mixed)))]
    assert set(listed) == {"a"}


def _bad_request(status: Any) -> list[Any]:
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return list(bad.field_violations)


def test_an_over_long_event_list_is_refused_before_anything_is_built(
    api: Api, project_key: str, rows: Rows
) -> None:
    """A 1 KB gzip body unpacking to 340,000 empty events (just under 1 MiB): 400 at once
    (issue #14 item 2)."""
    import gzip
    import time

    body = (
        b'{"projectKey":"'
        + project_key.encode()
        + b'","events":['
        + b",".join([b"{}"] * 340_000)
        + b"]}"
    )
    packed = gzip.compress(body)
    assert len(packed) < 4096
    started = time.process_time()
    response = api.post(raw=packed, headers={"Content-Encoding": "gzip"})
    spent = time.process_time() - started
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["details"] == [
        {"field": "events", "description": "must hold at most 500 events, not 340000"}
    ]
    assert spent < 1.0, f"{spent:.2f} s of CPU"
    assert rows() == []


@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        # Legal JSON past what the parsers read (orjson: 1024 levels; 254 on the exact path).
        (
            '{"projectKey":"KEY","events":[{"type":"t","url":"/"},'
            '{"type":"t","url":"/","data":{"x":' + "[" * 2000 + "]" * 2000 + "}}]}",
            "events[1].data",
            "must not nest deeper than 16 levels",
        ),
        (
            '{"projectKey":"KEY","type":"t","url":"/","visitorId":"v","data":{"price":1.50,'
            '"x":' + "[" * 300 + "]" * 300 + "}}",
            "data",
            "must not nest deeper than 16 levels",
        ),
        (
            '{"projectKey":"KEY","type":"t","url":"/","visitorId":"v","extra":'
            + '{"a":' * 1100
            + "1"
            + "}" * 1100
            + "}",
            "extra",
            "nests deeper than 254 levels",
        ),
    ],
)
def test_a_body_too_deep_to_read_names_the_field(
    api: Api, project_key: str, rows: Rows, body: str, field: str, description: str
) -> None:
    answer = api.post(raw=body.replace("KEY", project_key).encode())
    assert answer.status_code == 400
    details = answer.get_json()["error"]["details"]
    assert details == [{"field": field, "description": description}]
    assert rows() == []
