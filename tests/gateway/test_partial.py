"""gateway/partial.py: the body's `"partial": true` to the proto field, and the answer back.

These tests do what the view does, against a real gRPC server, and check the answer against
the OpenAPI document; the last one goes through the view itself.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway import partial
from gateway.errors import ApiError
from gateway.grpc_errors import to_api_error
from gateway.payload import to_request
from tests.conftest import RunningServer
from tests.gateway.conftest import OPENAPI, schema_validator
from tests.server.test_dead_letters import dead_letters

RECEIVED = schema_validator(OPENAPI["components"]["schemas"]["Received"])


def send(server: RunningServer, document: Any) -> tuple[int, dict[str, Any]]:
    """What the view does with a body: (status, JSON answer)."""
    payload = to_request(document)
    try:
        prepared = partial.prepare(payload)
    except ApiError as error:
        assert error.code is not None
        return error.code, {"details": [d.field for d in error.details]}
    assert prepared is not None
    with grpc.insecure_channel(server.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            response = stub.IngestEvents(prepared.request, timeout=5)
        except grpc.RpcError as exc:
            api_error = to_api_error(exc, payload.snippet)
            assert api_error.code is not None
            return api_error.code, {}
    body = prepared.answer(response.received, response.rejected)
    RECEIVED.validate(body)
    return 200, body


def test_the_flag_is_read_from_the_body() -> None:
    assert not to_request({"events": []}).partial
    assert not partial.requested(None)
    assert not partial.requested(False)
    assert partial.requested(True)
    with pytest.raises(ApiError) as refused:
        partial.requested("yes")
    assert refused.value.code == 400 and refused.value.details[0].field == "partial"
    document = {"projectKey": "k", "events": [{"type": "x", "url": "/"}]}
    assert partial.prepare(to_request(document)) is None


def test_valid_events_are_stored_and_invalid_ones_listed(
    grpc_server: RunningServer, project_key: str
) -> None:
    body = {
        "projectKey": project_key,
        "partial": True,
        "events": [
            {"type": "pageview", "url": "/a", "visitorId": "v1"},
            {"type": 5, "url": "/b"},  # a type error: never sent
            {"type": "click", "url": "nope", "visitorId": "v\u0001"},  # value errors
            {"type": "signup", "url": "/d"},
        ],
    }
    status, answer = send(grpc_server, body)
    assert status == 200
    assert answer["received"] == 2
    assert [r["index"] for r in answer["rejected"]] == [1, 2]
    assert [d["field"] for d in answer["rejected"][0]["details"]] == ["events[1].type"]
    assert {d["field"] for d in answer["rejected"][1]["details"]} == {
        "events[2].url",
        "events[2].visitorId",
    }


def test_every_event_invalid_is_still_a_200(grpc_server: RunningServer, project_key: str) -> None:
    body = {"projectKey": project_key, "partial": True, "events": [{"type": 1, "url": "/"}]}
    assert send(grpc_server, body) == (
        200,
        {
            "received": 0,
            "rejected": [
                {
                    "index": 0,
                    "details": [{"field": "events[0].type", "description": "must be a string"}],
                }
            ],
        },
    )


def test_the_whole_request_is_refused_for_its_key_or_its_own_fields(
    grpc_server: RunningServer, project_key: str
) -> None:
    events = [{"type": "x", "url": "/"}]
    assert (
        send(grpc_server, {"projectKey": "pk_live_nobody", "partial": True, "events": events})[0]
        == 401
    )
    assert (
        send(
            grpc_server, {"projectKey": "pk_live_nobody", "partial": True, "events": [{"type": 1}]}
        )[0]
        == 401
    )
    assert send(
        grpc_server, {"projectKey": project_key, "partial": True, "userId": 7, "events": events}
    ) == (400, {"details": ["userId"]})
    assert send(grpc_server, {"projectKey": project_key, "partial": 1, "events": events}) == (
        400,
        {"details": ["partial"]},
    )


def test_not_the_snippet_format(api: Any, rows: Any, project_key: str) -> None:
    """Partial is a batch's option (the OpenAPI's SnippetEvent has no `partial`): in a snippet
    body it is an unknown field, ignored, and an invalid event is a 400 as always."""
    body = {"projectKey": project_key, "type": "x", "url": "nope", "visitorId": "v"}
    for flag in (True, "not even a boolean"):
        refused = api.post({**body, "partial": flag})
        assert refused.status_code == 400
        assert [d["field"] for d in refused.get_json()["error"]["details"]] == ["url"]
    assert rows() == []
    accepted = api.post({**body, "url": "/ok", "partial": True})
    assert accepted.status_code == 200 and accepted.get_json() == {"received": 1}


def test_an_answer_maps_the_sent_indexes_back() -> None:
    prepared = partial.PartialRequest(ingest_pb2.IngestEventsRequest(), False, [0, 2], {}, 3)
    rejected = [
        ingest_pb2.RejectedEvent(
            index=1,
            violations=[ingest_pb2.FieldViolation(field="events[1].visitor_id", description="d")],
        )
    ]
    assert prepared.answer(1, rejected) == {
        "received": 1,
        "rejected": [
            {"index": 2, "details": [{"field": "events[2].visitorId", "description": "d"}]}
        ],
    }


def test_through_the_view(api: Any, project_key: str, rows: Any) -> None:
    body = {
        "projectKey": project_key,
        "partial": True,
        "events": [
            {"type": "pageview", "url": "/ok", "id": "p1"},
            {"type": "pageview", "url": "not a url", "id": "p2"},
            {"type": 5, "url": "/typed", "id": "p3"},
            {"type": "pageview", "url": "/ok2", "id": "p4"},
        ],
    }
    response = api.post(body)
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["received"] == 2
    assert [rejected["index"] for rejected in answer["rejected"]] == [1, 2]
    assert answer["rejected"][0]["details"][0]["field"] == "events[1].url"
    assert sorted(row["event_id"] for row in rows()) == ["p1", "p4"]
    # Without the flag the same batch is refused whole, as the contract says.
    del body["partial"]
    assert api.post(body).status_code == 400


def test_events_with_type_errors_are_kept_as_dead_letters_too(
    api: Any, project_key: str, rows: Any, grpc_server: RunningServer
) -> None:
    """They are never sent to be stored; once the batch is answered, RecordRefused keeps them
    (numbered as in that call), and the server's own violations of them join the answer."""
    body = {
        "projectKey": project_key,
        "partial": True,
        "events": [
            {"type": "pageview", "url": "/ok", "id": "q1"},
            {"type": 5, "url": "ftp://nope", "id": "q2"},  # a type error and a value error
            {"type": "pageview", "url": "not a url", "id": "q3"},  # a value error only
            {"type": "pageview", "url": "/fine", "timestamp": 1700000000, "id": "q4"},
        ],
    }
    response = api.post(body)
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    RECEIVED.validate(answer)
    assert answer["received"] == 1
    fields = {r["index"]: [d["field"] for d in r["details"]] for r in answer["rejected"]}
    assert fields == {
        1: ["events[1].type", "events[1].url"],
        2: ["events[2].url"],
        3: ["events[3].timestamp"],
    }
    assert [row["event_id"] for row in rows()] == ["q1"]

    kept = dead_letters(grpc_server.database_url, wait_for=3)
    by_id = {json.loads(row["event"]).get("id"): row for row in kept}
    assert set(by_id) == {"q2", "q3", "q4"}
    # The server's partial call numbers q3 as the 2nd event it was sent; RecordRefused's call
    # held q2 and q4 only.
    assert [v["field"] for v in json.loads(by_id["q2"]["violations"])] == [
        "events[0].type",
        "events[0].url",
    ]
    assert [v["field"] for v in json.loads(by_id["q4"]["violations"])] == ["events[1].timestamp"]
    assert json.loads(by_id["q2"]["event"])["incomplete"]
    assert not json.loads(by_id["q3"]["event"]).get("incomplete")
    assert by_id["q2"]["request_id"] == response.headers["X-Request-ID"]


def test_a_server_without_record_refused_answers_partial_batches_as_before(
    api: Any,
    project_key: str,
    rows: Any,
    grpc_server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.coalescer import ResultError

    def unimplemented(self: Any, request: Any) -> None:
        raise ResultError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    monkeypatch.setattr("gateway.grpc_client.IngestClient.record_refused", unimplemented)
    body = {
        "projectKey": project_key,
        "partial": True,
        "events": [{"type": "pageview", "url": "/ok", "id": "r1"}, {"type": 5, "url": "/b"}],
    }
    response = api.post(body)
    assert response.status_code == 200
    assert response.get_json()["rejected"] == [
        {"index": 1, "details": [{"field": "events[1].type", "description": "must be a string"}]}
    ]
    assert [row["event_id"] for row in rows()] == ["r1"]
    assert dead_letters(grpc_server.database_url) == []
