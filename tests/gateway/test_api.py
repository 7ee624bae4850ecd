"""POST /api/events through the Flask app and a real gRPC server on SQLite."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from tests.conftest import RunningServer, make_project
from tests.gateway.conftest import Api, assert_documented
from tests.server.test_dead_letters import dead_letters

Rows = Callable[[], list[dict[str, Any]]]


def snippet(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "pageview",
        "visitorId": "v_123",
        "projectKey": key,
        "url": "https://example.com/pricing",
        **fields,
    }


def test_snippet_event_is_stored(api: Api, project_key: str, rows: Rows) -> None:
    response = api.post(
        snippet(project_key, referrer="https://google.com/", data={"plan": "pro", "seats": 3}),
        headers={"User-Agent": "Mozilla/5.0 test", "Origin": "https://example.com"},
    )
    assert response.status_code == 200
    assert response.get_json() == {"received": 1}
    [row] = rows()
    assert row["type"] == "pageview"
    assert row["visitor_id"] == "v_123"
    assert row["user_id"] is None
    assert row["url"] == "https://example.com/pricing"
    assert row["referrer"] == "https://google.com/"
    assert json.loads(row["data"]) == {"plan": "pro", "seats": 3}
    assert row["user_agent"] == "Mozilla/5.0 test"
    assert row["ip"] == "127.0.0.1"
    # The gateway stamps an id (a uuid) when the client sends none.
    assert re.fullmatch(r"[0-9a-f]{32}", row["event_id"])  # the one id format: uuid4 hex


def test_batch_is_stored_whole(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "projectKey": project_key,
        "userId": "user_42",
        "events": [
            {"type": "signup", "url": "/signup", "id": "evt-1", "data": {"plan": "pro"}},
            {
                "type": "form_submit",
                "url": "/contact",
                "visitorId": "v_123",
                "timestamp": "2024-11-28T10:00:00Z",
            },
            {"type": "purchase", "url": "https://example.com/checkout", "data": {"amount": 49.9}},
        ],
    }
    response = api.post(body)
    assert response.status_code == 200
    assert response.get_json() == {"received": 3}
    stored = rows()
    assert [r["type"] for r in stored] == ["signup", "form_submit", "purchase"]
    assert {r["user_id"] for r in stored} == {"user_42"}
    assert stored[0]["event_id"] == "evt-1"
    assert stored[1]["visitor_id"] == "v_123"
    assert stored[0]["visitor_id"] is None
    occurred = stored[1]["occurred_at"]
    if isinstance(occurred, str):
        occurred = datetime.fromisoformat(occurred)
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    assert occurred == datetime(2024, 11, 28, 10, 0, tzinfo=UTC)


def test_repeated_id_is_stored_once(api: Api, project_key: str, rows: Rows) -> None:
    body = snippet(project_key, id="evt-once")
    assert api.post(body).get_json() == {"received": 1}
    assert api.post(body).get_json() == {"received": 1}
    assert [r["event_id"] for r in rows()] == ["evt-once"]


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # no offset: UTC
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_timestamps(
    api: Api, project_key: str, rows: Rows, timestamp: str, expected: datetime
) -> None:
    assert api.post(snippet(project_key, timestamp=timestamp)).status_code == 200
    occurred = rows()[0]["occurred_at"]
    if isinstance(occurred, str):
        occurred = datetime.fromisoformat(occurred)
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    assert occurred == expected


def test_unknown_fields_and_nulls_are_ignored(api: Api, project_key: str, rows: Rows) -> None:
    body = snippet(project_key, referrer=None, data=None, timestamp=None, id=None, extra=[1, 2])
    assert api.post(body).status_code == 200
    [row] = rows()
    assert row["referrer"] is None


def test_beacon_text_plain_body(api: Api, project_key: str, rows: Rows) -> None:
    response = api.post(snippet(project_key), content_type="text/plain;charset=UTF-8")
    assert response.status_code == 200
    assert len(rows()) == 1


# -- 400: every type violation at once, with the public field names ---------------------------


def details(response: Any) -> dict[str, str]:
    body = response.get_json()
    assert body["error"]["code"] == "invalid_request"
    return {d["field"]: d["description"] for d in body["error"]["details"]}


def test_snippet_type_errors_are_all_named(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "type": 7,
        "projectKey": project_key,
        "url": ["/"],
        "data": "text",
        "timestamp": "yesterday",
        "referrer": {},
        "id": 12,
    }
    response = api.post(body)
    assert response.status_code == 400
    assert set(details(response)) == {
        "type",
        "visitorId",
        "url",
        "data",
        "timestamp",
        "referrer",
        "id",
    }
    assert rows() == []


def test_batch_type_errors_are_all_named(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "projectKey": project_key,
        "userId": 42,
        "events": [
            {"type": "ok", "url": "/"},
            "not an event",
            {"type": "ok", "url": "/", "visitorId": 5, "data": [1]},
        ],
    }
    response = api.post(body)
    assert response.status_code == 400
    assert set(details(response)) == {
        "userId",
        "events[1]",
        "events[2].visitorId",
        "events[2].data",
    }
    assert rows() == []


def test_value_errors_are_named_beside_type_errors(api: Api, project_key: str, rows: Rows) -> None:
    """The contract: the answer names each offending field, whatever kind of rule it breaks."""
    body = {
        "projectKey": project_key,
        "userId": "u" * 200,
        "events": [
            {
                "type": "",
                "url": "x",
                "id": "i" * 65,
                "visitorId": "v" * 129,
                "referrer": "r" * 4097,
            },
            {"type": "ok", "url": "/", "timestamp": "bad", "data": []},
        ],
    }
    response = api.post(body)
    assert response.status_code == 400
    assert set(details(response)) == {
        "userId",
        "events[0].type",
        "events[0].url",
        "events[0].id",
        "events[0].visitorId",
        "events[0].referrer",
        "events[1].timestamp",
        "events[1].data",
    }
    assert rows() == []


def test_an_empty_object_names_every_required_field(api: Api, rows: Rows) -> None:
    response = api.post({})
    assert response.status_code == 400
    assert set(details(response)) == {"projectKey", "visitorId", "type", "url"}
    assert rows() == []


def test_type_errors_with_an_unknown_key_are_still_400(api: Api, rows: Rows) -> None:
    response = api.post({"projectKey": "pk_nobody", "events": [{"type": 5, "url": "/"}]})
    assert response.status_code == 400
    assert set(details(response)) == {"events[0].type"}
    assert rows() == []


def test_server_rules_come_back_with_public_names(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "projectKey": project_key,
        "events": [
            {"type": "ok", "url": "/"},
            {"type": "", "url": "ftp://example.com/", "visitorId": "v" * 129},
        ],
    }
    response = api.post(body)
    assert response.status_code == 400
    named = details(response)
    assert {"events[1].type", "events[1].url", "events[1].visitorId"} <= set(named)
    assert rows() == []


def test_snippet_server_rules_use_top_level_names(api: Api, project_key: str, rows: Rows) -> None:
    response = api.post(snippet(project_key, url="not a url", visitorId="x" * 200))
    assert response.status_code == 400
    assert {"url", "visitorId"} <= set(details(response))
    assert rows() == []


def test_snippet_requires_visitor_id(api: Api, project_key: str, rows: Rows) -> None:
    for visitor in (None, ""):
        body = snippet(project_key, visitorId=visitor)
        response = api.post(body)
        assert response.status_code == 400
        assert set(details(response)) == {"visitorId"}
    body = snippet(project_key)
    del body["visitorId"]
    assert set(details(api.post(body))) == {"visitorId"}
    assert rows() == []


def test_batch_event_count_is_the_servers_rule(api: Api, project_key: str, rows: Rows) -> None:
    empty = api.post({"projectKey": project_key, "events": []})
    assert empty.status_code == 400
    assert "events" in details(empty)
    events = [{"type": "t", "url": "/"}] * 501
    too_many = api.post({"projectKey": project_key, "events": events})
    assert too_many.status_code == 400
    assert "events" in details(too_many)
    assert api.post({"projectKey": project_key, "events": events[:500]}).get_json() == {
        "received": 500
    }
    assert len(rows()) == 500


def test_missing_project_key_names_the_field(api: Api, rows: Rows) -> None:
    response = api.post({"type": "pageview", "visitorId": "v", "url": "/"})
    assert response.status_code == 400
    assert "projectKey" in details(response)
    assert rows() == []


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"true"])
def test_top_level_must_be_an_object(api: Api, body: bytes) -> None:
    response = api.post(raw=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert response.get_json()["error"]["details"] == [
        {"field": "body", "description": "must be a JSON object"}
    ]


@pytest.mark.parametrize("body", [b"{", b'{"type": "pageview",}', b"", b"\xff"])
def test_a_body_that_is_not_json_names_the_body(api: Api, rows: Rows, body: bytes) -> None:
    response = api.post(raw=body)
    assert response.status_code == 400
    assert list(details(response)) == ["body"]
    assert response.get_json()["error"]["message"].startswith("The body is not valid JSON")
    assert rows() == []


# -- 401 / 403 ---------------------------------------------------------------------------------


def test_unknown_key_is_401(api: Api, rows: Rows) -> None:
    response = api.post(snippet("pk_live_doesnotexist000000000000"))
    assert response.status_code == 401
    error = response.get_json()["error"]
    assert error["code"] == "unauthorized"
    # The contract's body names the offending field, here as for a 400.
    assert error["details"] == [{"field": "projectKey", "description": "is unknown or revoked"}]
    assert rows() == []
    again = api.post(snippet("pk_live_doesnotexist000000000000"))  # answered from memory
    assert again.status_code == 401 and again.get_json()["error"]["details"] == error["details"]


def test_origin_allowlist_is_403(api: Api, grpc_server: RunningServer, rows: Rows) -> None:
    key = make_project(grpc_server.database_url, "shop", allowed_origins=("https://shop.example",))
    refused = api.post(snippet(key), headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "forbidden"
    assert refused.get_json()["error"]["details"] == [
        {"field": "Origin", "description": "is not allowed for this project"}
    ]
    assert rows() == []
    # The allowed site, and server-side batches (no Origin), get through.
    assert api.post(snippet(key), headers={"Origin": "https://shop.example"}).status_code == 200
    batch = {"projectKey": key, "events": [{"type": "t", "url": "/"}]}
    assert api.post(batch).status_code == 200
    assert len(rows()) == 2


# -- methods and routes ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_json(client: Any, method: str) -> None:
    response = client.open("/api/events", method=method)
    assert_documented(response)
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_unknown_path_is_404_json(client: Any) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json() == {
        "error": {"code": "not_found", "message": "No such endpoint.", "details": []}
    }


def test_index_links(client: Any) -> None:
    body = client.get("/").get_json()
    assert body["links"]["events"] == "/api/events"
    assert body["links"]["openapi"] == "/api/openapi.json"


# -- the request context -----------------------------------------------------------------------


def test_forwarded_for_is_ignored_without_trusted_proxies(
    api: Api, project_key: str, rows: Rows
) -> None:
    api.post(snippet(project_key), headers={"X-Forwarded-For": "203.0.113.9"})
    assert rows()[0]["ip"] == "127.0.0.1"


@pytest.mark.parametrize("app_config", [{"APEX_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"}])
def test_forwarded_for_from_trusted_proxy(api: Api, project_key: str, rows: Rows) -> None:
    # The client forged the first entry; 10.1.2.3 is our own load balancer.
    api.post(
        snippet(project_key),
        headers={"X-Forwarded-For": "1.1.1.1, 203.0.113.9, 10.1.2.3"},
    )
    assert rows()[0]["ip"] == "203.0.113.9"


def test_a_bug_is_a_json_500_without_internals(
    api: Api, project_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, *args: Any) -> int:
        raise RuntimeError("secret: password=hunter2")

    # Raised in the coalescer's sender thread, answered by the request's own thread.
    monkeypatch.setattr("gateway.grpc_client.IngestClient.ingest_many", broken)
    response = api.post(snippet(project_key))
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "hunter2" not in response.get_data(as_text=True)


def test_a_server_older_than_validate_only_stores_nothing_either(
    api: Api, project_key: str, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling deploy a new gateway may call an old server, which ignores the field
    (and has no RecordRefused)."""
    from apex_ingest.server import ingest, servicer
    from gateway.coalescer import ResultError

    def old_server(request: Any, *args: Any) -> ingest.Outcome:
        request.validate_only = False  # what a server without the field sees
        return real_ingest(request, *args)

    def unimplemented(self: Any, request: Any) -> None:
        raise ResultError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    real_ingest = ingest.ingest_events  # the function servicer imported
    monkeypatch.setattr(servicer, "ingest_events", old_server)
    monkeypatch.setattr("gateway.grpc_client.IngestClient.record_refused", unimplemented)
    response = api.post(snippet(project_key, referrer={"not": "a string"}, url="ftp://x"))
    assert response.status_code == 400
    # The url's value error comes from the validate_only call the gateway fell back to.
    assert set(details(response)) == {"referrer", "url"}
    assert rows() == []


def test_a_body_with_type_errors_is_kept_as_dead_letters(
    api: Api, project_key: str, rows: Rows, grpc_server: RunningServer
) -> None:
    """The gateway refuses it itself; the server keeps its events with every violation
    (RecordRefused), as it keeps the events of requests it refuses."""
    batch = {
        "projectKey": project_key,
        "events": [
            {"type": "click", "url": "ftp://nope", "visitorId": 7},
            {"type": "pageview", "url": "/fine", "timestamp": 1700000000},
        ],
    }
    response = api.post(batch)
    assert response.status_code == 400
    assert set(details(response)) == {"events[0].visitorId", "events[0].url", "events[1].timestamp"}
    kept = dead_letters(grpc_server.database_url, wait_for=2)
    assert [[v["field"] for v in json.loads(row["violations"])] for row in kept] == [
        ["events[0].visitor_id", "events[0].url"],
        ["events[1].timestamp"],
    ]
    assert all(json.loads(row["event"])["incomplete"] for row in kept)
    assert kept[0]["request_id"]  # the answer's X-Request-ID, to find it from the client's side
    assert kept[0]["request_id"] == response.headers["X-Request-ID"]
    assert rows() == []
