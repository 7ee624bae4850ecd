"""Events of many users against the real service (`apex-ingest serve` on PostgreSQL, the default
rate limit): each event is stored with its own user id, and the HTTP client batches all users
together rather than sending a request per user, which ran into the per-key rate limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from apex_ingest_sdk import Apex, IngestClient
from sqlalchemy import create_engine, text

from tests.client.support import Errors, SpyTransport
from tests.conftest import make_project
from tests.service import running_service

pytestmark = pytest.mark.postgres


def stored_users(database_url: str) -> dict[str, str | None]:
    """event id -> the stored user id"""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT event_id, user_id FROM events"))
            return {event_id: user_id for event_id, user_id in rows}
    finally:
        engine.dispose()


@pytest.fixture
def service(postgres_url: str) -> Iterator[Any]:
    with running_service(postgres_url) as running:
        yield running


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
