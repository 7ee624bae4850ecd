"""Identity over HTTP (issue #18): per-event `userId` and `previousId` in batches, `userId` in
the snippet format, identify and alias without a url, and the fields named in errors."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from apex_ingest.server.database import create_db_engine
from tests.conftest import RunningServer
from tests.gateway.conftest import Api
from tests.gateway.test_api import Rows, details


def links(database_url: str) -> list[tuple[Any, ...]]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            return [
                tuple(row)
                for row in connection.execute(
                    text("SELECT visitor_id, user_id, source FROM identity_links ORDER BY id")
                )
            ]
    finally:
        engine.dispose()


def test_batch_with_per_event_users_identify_and_alias(
    api: Api, project_key: str, rows: Rows, grpc_server: RunningServer
) -> None:
    body = {
        "projectKey": project_key,
        "userId": "batch-user",
        "events": [
            {"type": "identify", "visitorId": "v1", "userId": "u1", "data": {"plan": "pro"}},
            {"type": "alias", "previousId": "anon-9", "userId": "u9"},
            {"type": "signup", "url": "/signup", "id": "own"},
        ],
    }
    response = api.post(body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"received": 3}
    stored = {r["type"]: r for r in rows()}
    assert stored["identify"]["user_id"] == "u1"
    assert stored["identify"]["url"] == ""
    assert stored["alias"]["user_id"] == "u9"
    assert stored["signup"]["user_id"] == "batch-user"
    assert links(grpc_server.database_url) == [("anon-9", "u9", "alias"), ("v1", "u1", "identify")]


def test_snippet_carries_a_user_id(
    api: Api, project_key: str, rows: Rows, grpc_server: RunningServer
) -> None:
    event = {"type": "pageview", "visitorId": "v5", "projectKey": project_key, "url": "/"}
    assert api.post({**event, "userId": "u5"}).status_code == 200
    assert rows()[0]["user_id"] == "u5"
    assert links(grpc_server.database_url) == [("v5", "u5", "event")]


def test_identity_fields_are_named_as_sent(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "projectKey": project_key,
        "events": [
            {"type": "identify", "visitorId": "v1"},
            {"type": "alias", "userId": "u"},
            {"type": "click", "url": "/", "userId": 7, "previousId": "p"},
            {"type": "click", "url": "/", "userId": "x" * 129},
        ],
    }
    response = api.post(body)
    assert response.status_code == 400
    assert set(details(response)) == {
        "events[0].userId",
        "events[1].previousId",
        "events[2].userId",
        "events[2].previousId",
        "events[3].userId",
    }
    snippet = {"type": "pageview", "visitorId": "v", "projectKey": project_key, "url": "/"}
    response = api.post({**snippet, "userId": "y" * 129})
    assert response.status_code == 400
    assert set(details(response)) == {"userId"}
    assert rows() == []
