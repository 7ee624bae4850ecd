"""gateway/auth_guard.py: failed authentication is cheap to refuse (issue #14 item 7)."""

from __future__ import annotations

import time
from typing import Any

from gateway.auth_guard import AuthGuard
from gateway.ratelimit import RateLimiter


def guard(limit: str = "3/minute", ttl: float = 5.0) -> AuthGuard:
    return AuthGuard(RateLimiter(limit, "memory://"), ttl)


def test_unverified_keys_are_limited_per_address() -> None:
    auth = guard()
    answers = [auth.check(f"junk{i}", "192.0.2.1") for i in range(5)]
    assert answers[:3] == [None, None, None]
    assert [a.code for a in answers[3:] if a is not None] == [429, 429]
    refused = answers[3]
    assert refused is not None and refused.retry_after is not None and refused.retry_after >= 1
    # Another address has its own budget.
    assert auth.check("junk9", "192.0.2.2") is None


def test_a_verified_key_is_never_counted() -> None:
    auth = guard("1/minute")
    assert auth.check("pk_good", "192.0.2.1") is None
    auth.accepted("pk_good")
    for _ in range(10):
        assert auth.check("pk_good", "192.0.2.1") is None
    # The address's budget for unknown keys is still spent by the first, unverified request.
    assert auth.check("junk", "192.0.2.1") is not None


def test_a_refused_key_is_answered_401_without_a_call_for_a_while() -> None:
    auth = guard("100/minute", ttl=0.2)
    assert auth.check("pk_gone", "192.0.2.1") is None
    auth.refused("pk_gone")
    answer = auth.check("pk_gone", "192.0.2.7")
    assert answer is not None and answer.code == 401
    time.sleep(0.25)
    assert auth.check("pk_gone", "192.0.2.7") is None  # asked again after the TTL


def test_a_revoked_key_stops_being_verified() -> None:
    auth = guard("100/minute")
    auth.accepted("pk_x")
    auth.refused("pk_x")
    answer = auth.check("pk_x", "192.0.2.1")
    assert answer is not None and answer.code == 401


def test_random_keys_mostly_never_reach_the_server(fake_server: Any) -> None:
    """200 random-key requests in a second all reached gRPC before (issue #14 item 7)."""
    from google.rpc import code_pb2

    from apex_ingest.v1 import ingest_pb2
    from tests.gateway.conftest import fake_app
    from tests.gateway.test_grpc_status import abort_with

    calls: list[str] = []

    def unknown(request: ingest_pb2.IngestEventsRequest, context: Any) -> int:
        calls.append(request.project_key)
        abort_with(context, code_pb2.UNAUTHENTICATED, "unknown or revoked project key")
        return 0

    app = fake_app(fake_server(unknown).target, APEX_AUTH_RATE_LIMIT="20/minute")
    client = app.test_client()
    statuses = []
    for i in range(200):
        response = client.post(
            "/api/events",
            json={"type": "pageview", "visitorId": "v", "projectKey": f"pk_{i}", "url": "/"},
        )
        statuses.append(response.status_code)
    assert len(calls) == 20
    assert statuses.count(401) == 20 and statuses.count(429) == 180
    # The refusal's headers are those of the limit that refused (not the address's 100/second).
    assert response.headers["X-RateLimit-Limit"] == "20"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    # The same unknown key again: answered from memory, no call.
    again = client.post(
        "/api/events", json={"type": "pageview", "visitorId": "v", "projectKey": "pk_0", "url": "/"}
    )
    assert again.status_code == 401
    assert len(calls) == 20
