"""POST /api/events for cookieless projects (issue #19, item 7), and sentAt from apex.js."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import create_project
from gateway.payload import parse_request, to_request
from tests.conftest import RunningServer
from tests.gateway.conftest import Api

Rows = Callable[[], list[dict[str, Any]]]
SAFARI_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1"
)


def cookieless_project(database_url: str) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, "cookieless", cookieless=True).key
    finally:
        engine.dispose()


def pageview(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "pageview", "projectKey": key, "url": "https://example.com/", **fields}


def test_a_snippet_without_visitor_id_asks_the_server_to_derive_one() -> None:
    for payload in (
        to_request(pageview("k")),
        parse_request(b'{"type":"pageview","projectKey":"k","url":"/","visitorId":""}'),
    ):
        assert payload.violations == ()  # the gateway cannot know the project's setting
        assert payload.request.derive_visitor_id
    assert not to_request(pageview("k", visitorId="v")).request.derive_visitor_id
    batch = to_request({"projectKey": "k", "events": [{"type": "t", "url": "/"}]})
    assert not batch.request.derive_visitor_id  # server-side batches need no visitor
    typed = to_request(pageview("k", visitorId=5))  # a type error stays the gateway's
    assert not typed.request.derive_visitor_id
    assert [v.field for v in typed.violations] == ["visitorId"]


def test_cookieless_snippets_are_stored_with_a_derived_visitor(
    api: Api, grpc_server: RunningServer, rows: Rows
) -> None:
    key = cookieless_project(grpc_server.database_url)
    assert api.post(pageview(key), headers={"User-Agent": SAFARI_IOS}).status_code == 200
    assert api.post(pageview(key, visitorId=""), headers={"User-Agent": SAFARI_IOS}).json == {
        "received": 1
    }
    assert api.post(pageview(key), headers={"User-Agent": "curl/8.5.0"}).status_code == 200
    first, second, other = (row["visitor_id"] for row in rows())
    assert first.startswith("cl_") and first == second
    assert other.startswith("cl_") and other != first


def test_other_projects_still_answer_400_naming_visitor_id(api: Api, project_key: str) -> None:
    response = api.post(pageview(project_key))
    assert response.status_code == 400
    assert response.json is not None
    required = {"field": "visitorId", "description": "is required"}
    assert response.json["error"]["details"] == [required]


def test_sent_at_is_accepted_by_the_snippet_format(api: Api, project_key: str, rows: Rows) -> None:
    """apex.js sends sentAt (issue #19, item 1) whether or not the server uses it yet."""
    body = pageview(
        project_key,
        visitorId="v",
        timestamp="2026-12-02T10:00:00.000Z",
        sentAt="2026-12-02T10:00:01.500Z",
    )
    assert api.post(body).status_code == 200
    raw = (
        b'{"type":"pageview","visitorId":"v","projectKey":"' + project_key.encode() + b'",'
        b'"url":"/","id":"sent-at-raw","sentAt":"2026-12-02T10:00:01.500Z"}'
    )
    assert api.post(raw=raw, content_type="text/plain").status_code == 200
    assert len(rows()) == 2


def test_an_unknown_key_without_visitor_id_is_401(api: Api) -> None:
    """Whether visitorId may be left out depends on the project: an unknown key learns nothing
    more (before, the gateway answered 400 for the missing visitorId first)."""
    assert api.post(pageview("pk_live_nobody")).status_code == 401
