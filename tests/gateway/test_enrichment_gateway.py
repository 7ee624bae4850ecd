"""The gateway's part of issue #19: `sentAt` (clock skew), and client IPs in its own logs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.payload import parse_request, to_request
from tests.gateway.conftest import Api
from tests.server.test_enrichment import CHROME

Rows = Callable[[], list[dict[str, Any]]]


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _utc(value: Any) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def test_a_browser_clock_hours_off_still_stores_the_right_time(
    api: Api, project_key: str, rows: Rows
) -> None:
    ahead = timedelta(hours=6)
    browser_now = datetime.now(UTC) + ahead
    body = {
        "type": "pageview",
        "visitorId": "v1",
        "projectKey": project_key,
        "url": "https://shop.example/?utm_campaign=winter",
        "timestamp": _iso(browser_now - timedelta(seconds=20)),
        "sentAt": _iso(browser_now),
    }
    response = api.post(body, headers={"User-Agent": CHROME})
    assert response.status_code == 200, response.get_json()
    [row] = rows()
    lag = _utc(row["received_at"]) - _utc(row["occurred_at"])
    assert timedelta(seconds=19) < lag < timedelta(seconds=21)


def test_a_batch_carries_sent_at_for_all_its_events(api: Api, project_key: str, rows: Rows) -> None:
    behind = timedelta(days=2)
    server_now = datetime.now(UTC)
    events = [
        {"type": "signup", "url": "/signup", "timestamp": _iso(server_now - behind)},
        {"type": "paid", "url": "/paid"},
    ]
    body = {"projectKey": project_key, "sentAt": _iso(server_now - behind), "events": events}
    assert api.post(body).status_code == 200
    first, second = rows()
    assert abs(_utc(first["occurred_at"]) - server_now) < timedelta(seconds=5)
    assert abs(_utc(second["occurred_at"]) - server_now) < timedelta(seconds=5)


@pytest.mark.parametrize("sent_at", ["yesterday", 1733000000, "2026-13-01T00:00:00Z", True])
def test_a_sent_at_that_is_not_a_time_is_a_400_naming_it(
    api: Api, project_key: str, rows: Rows, sent_at: Any
) -> None:
    body = {"type": "pageview", "visitorId": "v", "projectKey": project_key, "url": "/"}
    for document in (
        {**body, "sentAt": sent_at},
        {"projectKey": project_key, "sentAt": sent_at, "events": [{"type": "a", "url": "/"}]},
    ):
        response = api.post(document)
        assert response.status_code == 400
        assert [d["field"] for d in response.get_json()["error"]["details"]] == ["sentAt"]
    assert rows() == []


def test_both_parsers_read_sent_at() -> None:
    body = {"projectKey": "pk", "sentAt": "2026-12-02T10:00:00Z", "events": [{"type": "a"}]}
    import json

    fast = parse_request(json.dumps(body).encode())
    generic = to_request(body)
    for payload in (fast, generic):
        assert payload.request.HasField("sent_at")
        assert payload.request.sent_at.ToDatetime(UTC) == datetime(2026, 12, 2, 10, tzinfo=UTC)
    assert not parse_request(b'{"projectKey":"pk","sentAt":null}').request.HasField("sent_at")
    assert [v.field for v in to_request({**body, "sentAt": "x"}).violations] == ["sentAt"]


def _logged_ip(api: Api, project_key: str, caplog: pytest.LogCaptureFixture) -> Any:
    caplog.clear()
    body = {"type": "pageview", "visitorId": "v", "projectKey": project_key, "url": "/"}
    api.post(body, environ_base={"REMOTE_ADDR": "203.0.113.77"})
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    return record.__dict__["client_ip"], caplog.text


def test_the_gateway_logs_truncated_client_ips_by_default(
    api: Api, project_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    logged, text = _logged_ip(api, project_key, caplog)
    assert logged == "203.0.113.0"
    assert "203.0.113.77" not in text


@pytest.mark.parametrize(("mode", "expected"), [("full", "203.0.113.77"), ("none", None)])
def test_the_gateway_log_ip_setting(
    app_config: dict[str, Any],
    mode: str,
    expected: str | None,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app_config["APEX_LOG_CLIENT_IP"] = mode
    api: Api = request.getfixturevalue("api")
    key: str = request.getfixturevalue("project_key")
    caplog.set_level(logging.INFO, logger="gateway.access")
    assert _logged_ip(api, key, caplog)[0] == expected
