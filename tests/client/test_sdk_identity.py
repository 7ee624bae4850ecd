"""Users from both SDK clients against the real service (`apex-ingest serve` on PostgreSQL, the
default rate limit): each event is stored with its own user id, and the HTTP client batches the
events of all users together rather than sending a request per user, which ran into the per-key
rate limit. identify and alias (issue #18): the events are stored, the links recorded, and
`events_with_user` attributes the visitor's earlier anonymous events to the user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from apex_ingest_sdk import Apex, IngestClient

from tests.client.support import Errors, SpyTransport, query
from tests.conftest import make_project
from tests.service import running_service

pytestmark = pytest.mark.postgres


def stored_users(database_url: str) -> dict[str, str | None]:
    """event id -> the stored user id"""
    return dict(query(database_url, "SELECT event_id, user_id FROM events"))


@pytest.fixture
def service(postgres_url: str) -> Iterator[Any]:
    with running_service(postgres_url) as running:
        yield running


def test_identify_and_alias_from_both_clients(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    errors = Errors()
    apex = Apex(key, service.base_url, flush_interval=0.2, on_error=errors)
    apex.track("pageview", "/", visitor_id="v-http", id="anon-http")
    assert apex.flush(30)
    apex.identify("u-http", {"plan": "pro"}, visitor_id="v-http", id="identify-http")
    apex.alias("anon-cookie", "u-http", id="alias-http")
    assert apex.close(30)
    assert errors.calls == []

    with IngestClient(service.grpc_target) as client:
        assert (
            client.ingest(
                key, [{"id": "anon-grpc", "type": "click", "url": "/", "visitorId": "v-grpc"}]
            )
            == 1
        )
        events: list[dict[str, Any]] = [
            {
                "id": "identify-grpc",
                "type": "identify",
                "visitorId": "v-grpc",
                "userId": "u-grpc",
                "data": {"name": "Ada"},
            },
            {"id": "alias-grpc", "type": "alias", "previousId": "old-grpc", "userId": "u-grpc"},
            {"id": "other-grpc", "type": "click", "url": "/"},
        ]
        assert client.ingest(key, events, user_id="batch-user") == 3

    stored = stored_users(postgres_url)
    assert stored == {
        "anon-http": None,
        "identify-http": "u-http",
        "alias-http": "u-http",
        "anon-grpc": None,
        "identify-grpc": "u-grpc",
        "alias-grpc": "u-grpc",
        "other-grpc": "batch-user",
    }
    assert sorted(
        query(postgres_url, "SELECT visitor_id, user_id, source FROM identity_links")
    ) == [
        ("anon-cookie", "u-http", "alias"),
        ("old-grpc", "u-grpc", "alias"),
        ("v-grpc", "u-grpc", "identify"),
        ("v-http", "u-http", "identify"),
    ]
    resolved = dict(query(postgres_url, "SELECT event_id, resolved_user_id FROM events_with_user"))
    assert resolved["anon-http"] == "u-http"
    assert resolved["anon-grpc"] == "u-grpc"


def test_a_thousand_users_go_in_a_few_requests(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    errors = Errors()
    spy = SpyTransport()
    apex = Apex(key, service.base_url, on_error=errors, transport=spy)
    expected: dict[str, str | None] = {}
    for i in range(1000):
        user = f"user_{i}" if i % 10 else None
        expected[apex.track("e", f"/u/{i}", user_id=user)] = user
    assert apex.close(60)
    assert errors.calls == []
    assert spy.statuses == [200, 200]  # 500 events a request, whatever their users
    assert stored_users(postgres_url) == expected


def test_grpc_events_carry_their_own_users(service: Any, postgres_url: str) -> None:
    key = make_project(postgres_url)
    events: list[dict[str, Any]] = [
        {"id": f"g{i}", "type": "e", "url": "/", "userId": f"user_{i}"} for i in range(499)
    ]
    events.append({"id": "batch", "type": "e", "url": "/"})
    with IngestClient(service.grpc_target) as client:
        assert client.ingest(key, events, user_id="batch-user") == 500
    expected = {f"g{i}": f"user_{i}" for i in range(499)} | {"batch": "batch-user"}
    assert stored_users(postgres_url) == expected
