"""Garbage never gets a 500, and nothing of a rejected request is stored."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway.conftest import Api

Rows = Callable[[], list[dict[str, Any]]]
KEY = "__KEY__"


def snippet_with(fragment: str) -> bytes:
    """A snippet body whose data is the given raw JSON text."""
    head = '{"type":"pageview","visitorId":"v","projectKey":"__KEY__","url":"/","data":'
    return (head + fragment + "}").encode()


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"   \n ",
    "truncated": b'{"type":"pageview",',
    "trailing-garbage": b'{"type":"x"} {"type":"y"}',
    "single-quotes": b"{'type':'x'}",
    "deep-arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep-objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep-data": snippet_with('{"a":' * 100_000 + "1" + "}" * 100_000),
    "deep-data-exact-path": snippet_with(
        '{"n":12345678901234567890,"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    ),
    "data-300-deep": snippet_with('{"a":' * 300 + "1" + "}" * 300),
    "data-20-deep": snippet_with('{"a":' * 20 + "1" + "}" * 20),
    "5000-digit-integer": snippet_with('{"n":' + "9" * 5000 + "}"),
    "5000-digit-visitor": (
        b'{"type":"x","visitorId":' + b"7" * 5000 + b',"projectKey":"__KEY__","url":"/"}'
    ),
    "exponent-overflow": snippet_with('{"n":1e400}'),
    "nan": snippet_with('{"n":NaN}'),
    "infinity": snippet_with('{"n":Infinity}'),
    "minus-infinity": snippet_with('{"n":-Infinity}'),
    "nan-exact-path": snippet_with('{"n":NaN,"m":12345678901234567890}'),
    "lone-high-surrogate": snippet_with('{"s":"\\ud800"}'),
    "lone-low-surrogate-key": snippet_with('{"\\udc00":1}'),
    "lone-surrogate-exact-path": snippet_with('{"s":"\\ud800","n":12345678901234567890}'),
    "lone-surrogate-visitor": (
        b'{"type":"x","visitorId":"\\ud800","projectKey":"__KEY__","url":"/",'
        b'"data":{"n":12345678901234567890}}'
    ),
    "invalid-utf8": snippet_with('{"s":"__BAD__"}').replace(b"__BAD__", b"\xff\xfe"),
    "invalid-utf8-exact-path": (
        b'{"type":"x","visitorId":"\xc3\x28","projectKey":"__KEY__","url":"/",'
        b'"data":{"n":12345678901234567890}}'
    ),
    "overlong-utf8": b'{"type":"\xc0\xaf","visitorId":"v","projectKey":"__KEY__","url":"/"}',
    "nul-in-visitor": b'{"type":"x","visitorId":"a\\u0000b","projectKey":"__KEY__","url":"/"}',
    "nul-in-type": b'{"type":"a\\u0000","visitorId":"v","projectKey":"__KEY__","url":"/"}',
    "raw-control-char": b'{"type":"a\x01","visitorId":"v","projectKey":"__KEY__","url":"/"}',
    "timestamp-year-0": b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/",'
    b'"timestamp":"0000-01-01T00:00:00Z"}',
    "timestamp-overflow": b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/",'
    b'"timestamp":"9999-12-31T23:59:59-23:59"}',
    "timestamp-1969": b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/",'
    b'"timestamp":"1969-12-31T23:59:59Z"}',
    "timestamp-next-year": b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/",'
    b'"timestamp":"2999-01-01T00:00:00Z"}',
    "timestamp-number": b'{"type":"x","visitorId":"v","projectKey":"__KEY__","url":"/",'
    b'"timestamp":1700000000000}',
    "huge-project-key": b'{"type":"x","visitorId":"v","projectKey":"'
    + b"k" * 500_000
    + b'","url":"/"}',
    "events-object": b'{"projectKey":"__KEY__","events":{"type":"x"}}',
    "events-null": b'{"projectKey":"__KEY__","events":null}',
    "events-of-numbers": b'{"projectKey":"__KEY__","events":[1,2,3]}',
    "data-too-big": snippet_with('{"s":"' + "x" * 40_000 + '"}'),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_body_gets_a_4xx_and_stores_nothing(
    api: Api, project_key: str, rows: Rows, name: str
) -> None:
    raw = HOSTILE[name].replace(KEY.encode(), project_key.encode())
    response = api.post(raw=raw)
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert rows() == []


def test_5000_digit_fraction_is_in_range_and_stored_exactly(
    api: Api, project_key: str, rows: Rows
) -> None:
    data = '{"n":0.' + "1" * 5000 + "}"
    raw = snippet_with(data).replace(KEY.encode(), project_key.encode())
    assert api.post(raw=raw).status_code == 200
    assert rows()[0]["data"] == data


def test_lone_surrogate_error_is_clear(api: Api, project_key: str) -> None:
    raw = snippet_with('{"s":"\\ud800","n":12345678901234567890}')
    response = api.post(raw=raw.replace(KEY.encode(), project_key.encode()))
    assert "surrogate" in response.get_json()["error"]["message"]


# Property: whatever JSON a client sends, the answer is a documented 2xx/4xx, never a 5xx.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = json_values | st.sampled_from(["pageview", "/", "https://example.com/", ""])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fields=st.dictionaries(
        st.sampled_from(
            ["type", "visitorId", "url", "data", "referrer", "timestamp", "id", "userId", "x"]
        ),
        field_values,
    ),
    batch=st.booleans(),
)
def test_any_json_gets_a_documented_answer(
    api: Api, project_key: str, rows: Rows, fields: dict[str, Any], batch: bool
) -> None:
    before = len(rows())
    if batch:
        body: dict[str, Any] = {"projectKey": project_key, "events": [fields, fields]}
    else:
        body = {"projectKey": project_key, **fields}
    response = api.post(raw=json.dumps(body).encode())
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    added = len(rows()) - before
    if response.status_code == 200:
        received = response.get_json()["received"]
        assert received == (2 if batch else 1)
        if fields.get("id"):
            # A client id repeated (in the batch, or by an earlier example) is stored once.
            assert 0 <= added <= received
        else:
            assert added == received
    else:
        assert added == 0


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=300))
def test_any_bytes_get_a_documented_answer(api: Api, rows: Rows, raw: bytes) -> None:
    response = api.post(raw=raw)
    assert response.status_code == 400
    assert rows() == []
