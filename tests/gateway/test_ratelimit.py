"""Rate limits per project key: a batch counts once; 429 with Retry-After."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import shared_windows
from gateway.app import create_app
from gateway.ratelimit import RateLimiter
from gateway.shared_windows import SharedWindows, create_table
from tests.conftest import RunningServer, make_project
from tests.gateway.conftest import Api, closed_port_target

Rows = Callable[[], list[dict[str, Any]]]
LIMITED = {"APEX_RATE_LIMIT": "2/minute"}


def batch(key: str, size: int = 3) -> dict[str, Any]:
    return {"projectKey": key, "events": [{"type": "t", "url": "/"} for _ in range(size)]}


@pytest.mark.parametrize("app_config", [LIMITED])
def test_a_batch_counts_once(api: Api, project_key: str, rows: Rows) -> None:
    first = api.post(batch(project_key))
    assert first.get_json() == {"received": 3}
    assert first.headers["X-RateLimit-Limit"] == "2"
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert "X-RateLimit-Reset" in first.headers
    assert "Retry-After" not in first.headers  # only throttling answers carry it
    second = api.post(batch(project_key))
    assert second.get_json() == {"received": 3}
    assert second.headers["X-RateLimit-Remaining"] == "0"

    refused = api.post(batch(project_key))
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert len(rows()) == 6  # the refused batch stored nothing


@pytest.mark.parametrize("app_config", [LIMITED])
def test_limits_are_per_project(api: Api, grpc_server: RunningServer) -> None:
    one = make_project(grpc_server.database_url, "one")
    two = make_project(grpc_server.database_url, "two")
    for _ in range(2):
        assert api.post(batch(one)).status_code == 200
    assert api.post(batch(one)).status_code == 429
    assert api.post(batch(two)).status_code == 200


@pytest.mark.parametrize("app_config", [LIMITED])
def test_rejected_bodies_count_too(api: Api, project_key: str) -> None:
    # An invalid request from a project still uses its budget (it cost a parse and a call).
    bad = {"projectKey": project_key, "type": 5, "visitorId": "v", "url": "/"}
    assert api.post(bad).status_code == 400
    assert api.post(bad).status_code == 400
    assert api.post(batch(project_key)).status_code == 429


@pytest.mark.parametrize("app_config", [LIMITED])
def test_bodies_without_a_key_are_limited_by_ip(api: Api) -> None:
    for _ in range(2):
        assert api.post(raw=b"not json").status_code == 400
    assert api.post(raw=b"not json").status_code == 429
    other = api.post(raw=b"not json", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 400


@pytest.mark.parametrize("app_config", [LIMITED])
def test_a_size_or_type_limit_never_reads_as_a_rate_limit(api: Api) -> None:
    """Past the address's budget, junk is refused 429; a body too large or of the wrong type
    is still told why (it could never be accepted: a 429 would have it retried)."""
    for _ in range(2):
        assert api.post(raw=b"not json").status_code == 400
    assert api.post(raw=b"not json").status_code == 429
    too_large = api.post(raw=b" " * (1024 * 1024 + 1))
    assert too_large.status_code == 413 and "Retry-After" not in too_large.headers
    assert api.post(raw=b"{}", content_type="application/xml").status_code == 415
    assert api.post(raw=b"not json").status_code == 429  # those counted, and refused nothing


@pytest.mark.parametrize("app_config", [LIMITED])
def test_preflight_and_other_routes_are_not_limited(api: Api, project_key: str) -> None:
    for _ in range(5):
        preflight = api.client.options(
            "/api/events",
            headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert api.client.get("/api/openapi.json").status_code == 200
    assert api.post(batch(project_key)).status_code == 200


def redis_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        return False
    return True


def test_redis_storage_shares_the_limit_between_gateways(
    grpc_server: RunningServer, project_key: str
) -> None:
    if not redis_reachable():
        pytest.fail("Redis is not reachable on 127.0.0.1:6379 (make test starts it)")
    config = {
        "TESTING": True,
        "APEX_GRPC_TARGET": grpc_server.target,
        "APEX_RATE_LIMIT": "3/minute",
        "APEX_RATE_LIMIT_STORAGE": "redis://127.0.0.1:6379/0",
    }
    # Two gateway instances, one Redis: the project's budget is shared.
    gateways = [Api(create_app(config).test_client()) for _ in range(2)]
    statuses = [gateways[i % 2].post(batch(project_key, 1)).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


def test_unreachable_redis_falls_back_to_per_process_limits(
    grpc_server: RunningServer, project_key: str
) -> None:
    config = {
        "TESTING": True,
        "APEX_GRPC_TARGET": grpc_server.target,
        "APEX_RATE_LIMIT": "2/minute",
        "APEX_RATE_LIMIT_STORAGE": "redis://" + closed_port_target(),
    }
    api = Api(create_app(config).test_client())
    # Serving goes on (events matter more than exact limits), still limited in memory.
    statuses = [api.post(batch(project_key, 1)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_workers_count_in_one_table(tmp_path: Path) -> None:
    """Processes with the same table file share each window; a window ends and starts anew."""
    path = str(tmp_path / "table")
    create_table(path)
    now = 1_000.0
    context = multiprocessing.get_context("fork")
    with context.Pool(4) as pool:
        counts = pool.starmap(_hit_many, [(path, "project:a", now, 25)] * 4)
    assert sorted(hits for hits, _end in counts)[-1] == 100  # the last of 100 hits saw 100
    assert {end for _hits, end in counts} == {now + 60}
    table = SharedWindows(path)
    assert table.hit("project:a", 60, now + 1) == (now + 60, 101)
    assert table.hit("project:b", 60, now + 1) == (now + 61, 1)
    assert table.hit("project:a", 60, now + 60) == (now + 120, 1)  # a new window


def test_a_full_table_hands_the_hit_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_windows, "SLOTS", 8)
    monkeypatch.setattr(shared_windows, "TABLE_BYTES", 8 * shared_windows._SLOT.size)
    path = str(tmp_path / "table")
    create_table(path)
    table = SharedWindows(path)
    assert all(table.hit(f"key-{i}", 60, 0.0) is not None for i in range(8))
    assert table.hit("one-too-many", 60, 1.0) is None
    assert table.hit("one-too-many", 60, 61.0) == (121.0, 1)  # windows ended: room again
    limiter = RateLimiter("1/minute", "memory://", path)
    for name in (f"other-{i}" for i in range(8)):
        table.hit(name, 60, time.time())
    # Counted per process instead: still limited.
    assert [limiter.hit("project:x").allowed for _ in range(2)] == [True, False]


def _hit_many(path: str, name: str, now: float, times: int) -> tuple[int, float]:
    """Hit `name` `times` times; (the highest count seen, the window end)."""
    table = SharedWindows(path)
    counted = [table.hit(name, 60, now) for _ in range(times)]
    ends, hits = zip(*(c for c in counted if c is not None), strict=True)
    assert len(hits) == times
    return max(hits), ends[0]


def test_a_recount_after_a_limit_change_skips_the_windows_already_counted() -> None:
    """A refused request whose project's limit changed meanwhile is counted again against the
    new one (gateway.ratelimit.check): a part of the limit that did not change ("5/minute" of
    "5/minute;2/hour" -> "5/minute;100/hour") is the same window, counted once."""
    limiter = RateLimiter("100/second", "memory://")
    for _ in range(2):
        assert limiter.hit("project:p", "5/minute;2/hour").allowed
    seen: dict[str, Any] = {}
    assert not limiter.hit("project:p", "5/minute;2/hour", seen).allowed  # the hour's third
    again = limiter.hit("project:p", "5/minute;100/hour", seen)
    assert again.allowed and again.remaining == 2  # the minute's third hit, not its fourth
    assert limiter.hit("project:p", "5/minute;100/hour").remaining == 1
