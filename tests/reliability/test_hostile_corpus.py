"""Hostile bodies beyond tests/gateway/test_hostile_input.py, through the Flask app and a real
gRPC server: each gets its documented status, names the offending field, and stores nothing.

Duplicate keys are not an error: the last one wins, as with JavaScript's JSON.parse (what a
browser's JSON.stringify peer expects), in both of the gateway's parsing paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.gateway.conftest import Api, api, app, app_config, client, rows  # noqa: F401

pytestmark = pytest.mark.reliability

Rows = Callable[[], list[dict[str, Any]]]
KEY = "__KEY__"
EXACT = '"n":12345678901234567890'  # forces the gateway's exact-number parsing path


def snippet(**fields: Any) -> dict[str, Any]:
    return {"type": "pageview", "visitorId": "v", "projectKey": KEY, "url": "/", **fields}


def batch(*events: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"projectKey": KEY, "events": list(events), **fields}


def event(**fields: Any) -> dict[str, Any]:
    return {"type": "x", "url": "/", **fields}


# name -> (body: dict or raw bytes, expected status, field the error must name or None)
CORPUS: dict[str, tuple[Any, int, str | None]] = {
    # NUL: PostgreSQL cannot store it; a 400 naming the field, never a silent drop.
    "nul-in-data-key": (snippet(data={"a\u0000b": 1}), 400, "data"),
    "nul-in-data-value": (batch(event(data={"s": "x\u0000"})), 400, "events[0].data"),
    "nul-in-nested-data": (snippet(data={"a": [{"b": "\u0000"}]}), 400, "data"),
    "nul-in-url": (snippet(url="/a\u0000b"), 400, "url"),
    "nul-in-event-id": (batch(event(id="a\u0000")), 400, "events[0].id"),
    "nul-in-user-id": (batch(event(), userId="u\u0000"), 400, "userId"),
    "nul-in-referrer": (snippet(referrer="https://a.example/\u0000"), 400, "referrer"),
    "raw-nul-byte-in-string": (
        b'{"type":"x","visitorId":"a\x00b","projectKey":"__KEY__","url":"/"}',
        400,
        None,
    ),
    "invalid-utf8-in-key": (
        b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/","data":{"\xff":1}}',
        400,
        None,
    ),
    "invalid-utf8-in-key-exact": (
        b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/","data":{"\xed\xa0\x80":1,'
        + EXACT.encode()
        + b"}}",
        400,
        None,
    ),
    "truncated-utf8": (
        b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/\xe2\x82"}',
        400,
        None,
    ),
    "utf16-body": (json.dumps(snippet()).encode("utf-16"), 400, None),
    # CR/LF and escape codes in identifiers: refused (they would forge log lines downstream).
    "crlf-in-type": (snippet(type="a\r\nFAKE-LOG-LINE"), 400, "type"),
    "escape-code-in-visitor": (snippet(visitorId="\x1b[31mred"), 400, "visitorId"),
    "crlf-in-url": (snippet(url="/a\r\nSet-Cookie: x=1"), 400, "url"),
    "c1-control-in-type": (snippet(type="a\u0085b"), 400, "type"),
    # Timestamps: extreme, malformed, or of the wrong type.
    "timestamp-js-max": (snippet(timestamp="+275760-09-13T00:00:00Z"), 400, "timestamp"),
    "timestamp-feb-30": (snippet(timestamp="2026-02-30T00:00:00Z"), 400, "timestamp"),
    "timestamp-hour-25": (snippet(timestamp="2026-11-28T25:00:00Z"), 400, "timestamp"),
    "timestamp-offset-25h": (snippet(timestamp="2026-11-28T10:00:00+25:00"), 400, "timestamp"),
    "timestamp-empty": (snippet(timestamp=""), 400, "timestamp"),
    "timestamp-word": (snippet(timestamp="yesterday"), 400, "timestamp"),
    "timestamp-huge-number": (snippet(timestamp=1e308), 400, "timestamp"),
    "timestamp-object": (snippet(timestamp={"$date": 1}), 400, "timestamp"),
    "timestamp-5000-digits": (
        b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/","timestamp":'
        + b"9" * 5000
        + b"}",
        400,
        "timestamp",
    ),
    "timestamp-year-10000": (batch(event(timestamp="10000-01-01T00:00:00Z")), 400, None),
    "timestamp-before-epoch-offset": (
        snippet(timestamp="1970-01-01T00:30:00+01:00"),
        400,
        "timestamp",
    ),
    # One character over each documented limit.
    "type-101": (snippet(type="t" * 101), 400, "type"),
    "visitor-129": (snippet(visitorId="v" * 129), 400, "visitorId"),
    "event-id-65": (batch(event(id="i" * 65)), 400, "events[0].id"),
    "user-id-129": (batch(event(), userId="u" * 129), 400, "userId"),
    "url-4097": (snippet(url="/" + "u" * 4096), 400, "url"),
    "referrer-4097": (snippet(referrer="https://r.example/" + "r" * 4079), 400, "referrer"),
    "events-501": (batch(*[event()] * 501), 400, "events"),
    "events-empty": (batch(), 400, "events"),
    "data-33-kib": (batch(event(data={"s": "x" * 33_000})), 400, "events[0].data"),
    "data-depth-17": (snippet(data=json.loads('{"a":' * 17 + "1" + "}" * 17)), 400, "data"),
    "data-array": (snippet(data=[1, 2]), 400, "data"),
    "data-string": (snippet(data="{}"), 400, "data"),
    # One bad event spoils the whole batch: nothing of it is stored.
    "one-bad-event-in-500": (
        batch(*[event(id=f"ok-{i}") for i in range(499)], event(url="javascript:alert(1)")),
        400,
        "events[499].url",
    ),
    "unknown-key": (snippet(projectKey="pk_live_nope"), 401, None),
    "key-with-crlf": (snippet(projectKey="pk\r\nx"), 400, "projectKey"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_body_gets_its_documented_status(
    api: Api,  # noqa: F811
    project_key: str,
    rows: Rows,  # noqa: F811
    name: str,
) -> None:
    body, status, field = CORPUS[name]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = api.post(raw=raw.replace(KEY.encode(), project_key.encode()))
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    if field is not None:
        fields = [d["field"] for d in response.get_json()["error"]["details"]]
        assert field in fields, fields
    assert rows() == []


def test_edge_values_just_inside_the_limits_are_stored(
    api: Api,  # noqa: F811
    project_key: str,
    rows: Rows,  # noqa: F811
) -> None:
    body = batch(
        event(id="i" * 64, type="t" * 100, url="/" + "u" * 4095, visitorId="v" * 128),
        event(timestamp="1970-01-01T00:00:00Z", data=json.loads('{"a":' * 16 + "1" + "}" * 16)),
        userId="u" * 128,
    )
    raw = json.dumps(body).encode().replace(KEY.encode(), project_key.encode())
    assert api.post(raw=raw).status_code == 200
    assert len(rows()) == 2


@pytest.mark.parametrize("exact", [False, True], ids=["fast-path", "exact-path"])
def test_duplicate_keys_last_one_wins(
    api: Api,  # noqa: F811
    project_key: str,
    rows: Rows,  # noqa: F811
    exact: bool,
) -> None:
    extra = "," + EXACT if exact else ""
    raw = (
        '{"projectKey":"pk_live_wrong","type":"first","visitorId":"v","url":"/first",'
        f'"projectKey":"{project_key}","type":"second","url":"/second",'
        f'"data":{{"k":1,"k":2{extra}}}}}'
    ).encode()
    response = api.post(raw=raw)
    assert response.status_code == 200, response.get_data(as_text=True)
    (row,) = rows()
    assert (row["type"], row["url"]) == ("second", "/second")
    assert json.loads(row["data"])["k"] == 2
