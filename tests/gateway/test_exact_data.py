"""`data` round-trips exactly: numbers keep their digits, unicode is kept, NUL is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.gateway.conftest import Api

Rows = Callable[[], list[dict[str, Any]]]

EXACT_NUMBERS = [
    "9007199254740993",
    "3",
    "1.0",
    "123456789012345678901234567890",
    "3.14159265358979323846264",
    "-9223372036854775809",
    "18446744073709551616",
    "0.1",
    "-0.000000000000000000001",
    "49.90",
    "1.50",
    "1e5",
    "1E+2",
    "2.5e-3",
    "0.00001",
    "-0",
    "-0.0",
    "100",
    "-42",
    "18446744073709551615",
]


def body_with_data(key: str, data_text: str) -> bytes:
    head = '{"type":"pageview","visitorId":"v","projectKey":"' + key + '","url":"/","data":'
    return (head + data_text + "}").encode()


def exact(text: str) -> Any:
    """Parse JSON keeping every number as its text (as Decimal cannot say 3 vs 3.0)."""
    return json.loads(text, parse_int=lambda s: ("int", s), parse_float=lambda s: ("num", s))


@pytest.mark.parametrize("number", EXACT_NUMBERS)
def test_number_is_stored_exactly(api: Api, project_key: str, rows: Rows, number: str) -> None:
    response = api.post(raw=body_with_data(project_key, '{"n":' + number + "}"))
    assert response.status_code == 200, response.get_json()
    stored = rows()[0]["data"]
    # The stored JSON text holds the same token, digit for digit.
    assert stored == '{"n":' + number + "}"


def test_numbers_in_a_mixed_document(api: Api, project_key: str, rows: Rows) -> None:
    data = (
        '{"big":9007199254740993,"int":3,"float":1.0,"huge":123456789012345678901234567890,'
        '"pi":3.14159265358979323846264,"list":[1,2.5,-0],"nested":{"deep":[{"x":1e5}]},'
        '"text":"caf\\u00e9 \\ud83d\\ude00 \u65e5\u672c"}'
    )
    assert api.post(raw=body_with_data(project_key, data)).status_code == 200
    stored = rows()[0]["data"]
    assert exact(stored) == exact(data)
    assert json.loads(stored)["text"] == "café 😀 日本"


def test_integer_only_data_takes_the_fast_path_unchanged(
    api: Api, project_key: str, rows: Rows
) -> None:
    data = '{"a":3,"c":-7,"f":[10,0,-1],"s":"x","b":true,"n":null}'
    assert api.post(raw=body_with_data(project_key, data)).status_code == 200
    assert rows()[0]["data"] == data


@pytest.mark.parametrize(
    "data",
    ['{"a\\u0000b":1}', '{"k":"x\\u0000y"}', '{"k":["ok",{"deeper":"\\u0000"}]}'],
    ids=["key", "value", "nested"],
)
def test_nul_in_data_is_400_naming_the_field(
    api: Api, project_key: str, rows: Rows, data: str
) -> None:
    response = api.post(raw=body_with_data(project_key, data))
    assert response.status_code == 400
    fields = [d["field"] for d in response.get_json()["error"]["details"]]
    assert fields == ["data"]
    assert rows() == []


@pytest.mark.parametrize("number", ["1e-20000", "0." + "0" * 16383 + "1"], ids=["exp", "digits"])
def test_a_number_the_database_cannot_hold_is_400_naming_the_field(
    api: Api, project_key: str, rows: Rows, number: str
) -> None:
    """PostgreSQL keeps at most 16383 digits after the point; the rule is the same on SQLite."""
    response = api.post(raw=body_with_data(project_key, '{"n":' + number + "}"))
    assert response.status_code == 400
    fields = [d["field"] for d in response.get_json()["error"]["details"]]
    assert fields == ["data"]
    assert rows() == []


def test_nul_in_batch_data_names_the_event(api: Api, project_key: str, rows: Rows) -> None:
    body = {
        "projectKey": project_key,
        "events": [{"type": "a", "url": "/"}, {"type": "b", "url": "/", "data": {"k": "\x00"}}],
    }
    response = api.post(body)
    assert response.status_code == 400
    fields = [d["field"] for d in response.get_json()["error"]["details"]]
    assert fields == ["events[1].data"]
    assert rows() == []
