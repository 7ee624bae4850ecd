"""Unit tests of the gateway's pure parts: field names, JSON codec, client IP, settings."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from apex_ingest.common.settings import GatewaySettings, load
from gateway import json_codec
from gateway.client_ip import client_ip
from gateway.errors import ApiError, retry_after_seconds
from gateway.payload import parse_timestamp, proto_field, public_field, to_request


@pytest.mark.parametrize(
    ("path", "snippet", "public"),
    [
        ("events[2].visitor_id", False, "events[2].visitorId"),
        ("events[0].url", False, "events[0].url"),
        ("events[0].url", True, "url"),
        ("events[0].visitor_id", True, "visitorId"),
        ("project_key", True, "projectKey"),
        ("project_key", False, "projectKey"),
        ("user_id", False, "userId"),
        ("events", False, "events"),
        ("events[0].data.some_key", True, "data.some_key"),  # the client's own keys stay
        ("events[12].data", False, "events[12].data"),
        ("context.client_ip", False, "context.client_ip"),  # not a JSON field: as is
        ("", False, ""),
    ],
)
def test_public_field(path: str, snippet: bool, public: str) -> None:
    assert public_field(path, snippet) == public


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [
        ("1970-01-01T00:00:00Z", 0, 0),
        ("1970-01-01T00:00:01", 1, 0),
        ("1970-01-01T01:00:00+01:00", 0, 0),
        ("2024-05-01T12:00:00.5Z", 1714564800, 500_000_000),
        ("2024-05-01T12:00:00.123456789Z", 1714564800, 123_456_000),
        ("2024-05-01", 1714521600, 0),
        ("2024-05-01 12:00:00Z", 1714564800, 0),
        ("2024-05-01t12:00:00z", 1714564800, 0),  # RFC 3339 5.6: "t" and "z" may be lower case
        ("2016-12-31T23:59:60Z", 1483228800, 0),  # a leap second: the next second
        ("2016-12-31T23:59:60.25Z", 1483228800, 250_000_000),
    ],
)
def test_parse_timestamp(text: str, seconds: int, nanos: int) -> None:
    parsed = parse_timestamp(text)
    assert parsed is not None
    assert (parsed.seconds, parsed.nanos) == (seconds, nanos)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2024-13-01T00:00:00Z",
        "2024-05-01T25:00:00Z",
        "1700000000",
        "2016-12-31T23:59:61Z",
        "2026-01-01T00:00:00Z\x00garbage",  # fromisoformat stopped at the NUL (issue #14)
        "2026-01-01T00:00:00+00:00\x00",
        "2026-01-01T00:00:00Z junk",
    ],
)
def test_parse_timestamp_refuses(text: str) -> None:
    assert parse_timestamp(text) is None


def test_snippet_and_batch_are_told_apart_by_events() -> None:
    snippet = to_request({"type": "t", "visitorId": "v", "projectKey": "k", "url": "/"})
    assert snippet.snippet
    assert len(snippet.request.events) == 1
    batch = to_request({"projectKey": "k", "events": [{"type": "t", "url": "/"}]})
    assert not batch.snippet
    # A batch's events need no visitorId.
    assert batch.request.events[0].visitor_id == ""


def test_ids_are_stamped_when_missing_and_unique() -> None:
    payload = to_request(
        {
            "projectKey": "k",
            "events": [{"type": "t", "url": "/"}] * 3 + [{"type": "t", "url": "/", "id": "given"}],
        }
    )
    ids = [event.id for event in payload.request.events]
    assert len(set(ids)) == 4
    assert ids[3] == "given"


def test_data_is_forwarded_as_compact_json_text() -> None:
    document = json_codec.parse(
        b'{"projectKey":"k","events":[{"type":"t","url":"/","data":{"a": [1, 2.50, "\xc3\xa9"]}}]}'
    )
    payload = to_request(document)
    assert payload.request.events[0].data == '{"a":[1,2.50,"é"]}'


def test_type_errors_are_all_noted_and_the_rest_kept() -> None:
    payload = to_request(
        {"projectKey": 1, "userId": [], "events": [{"type": None, "url": 5}, 7, {"type": "t"}]}
    )
    fields = [v.field for v in payload.violations]
    assert fields == ["projectKey", "userId", "events[0].url", "events[1]"]
    # Event indices stay those of the body, so the server's paths name the right events.
    assert [e.type for e in payload.request.events] == ["", "", "t"]


def test_a_body_that_is_not_an_object_is_refused_at_once() -> None:
    with pytest.raises(ApiError):
        to_request([{"type": "t"}])


# -- the JSON codec -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"n":9007199254740993}',
        b'{"n":123456789012345678901234567890}',
        b'{"n":3.14159265358979323846264}',
        b'{"n":1e400}',
        b'{"n":-1.5E-400}',
        b'{"a":[3,1.0,0.1,"x"],"b":{"c":12345678901234567.0}}',
        b'{"a":49.90,"b":1e5,"c":-0,"d":0.00001,"e":[1.50E+2]}',
    ],
)
def test_exact_path_writes_numbers_verbatim(text: bytes) -> None:
    assert json_codec.dumps(json_codec.parse(text)) == text


def test_fast_path_for_integer_only_bodies() -> None:
    parsed = json_codec.parse(b'{"n":3,"m":-7,"s":"x"}')
    assert parsed == {"n": 3, "m": -7, "s": "x"}
    assert json_codec.dumps(parsed) == b'{"n":3,"m":-7,"s":"x"}'


def test_long_digit_runs_inside_strings_are_harmless() -> None:
    # A false alarm (the digits are in a string) costs the slow path, never the output.
    text = b'{"s":"12345678901234567890","n":1,"f":2.50}'
    parsed = json_codec.parse(text)
    assert parsed["s"] == "12345678901234567890"
    assert json_codec.dumps(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        b"{",
        b"NaN",
        b'{"n":NaN,"m":12345678901234567890}',
        b'{"n":Infinity,"m":12345678901234567890}',
        b'["\\ud800",12345678901234567890]',
        b'["\xff",12345678901234567890]',
        b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000,
        b'{"a":1} x',
    ],
)
def test_parse_refuses(text: bytes) -> None:
    with pytest.raises(json_codec.JSONSyntaxError):
        json_codec.parse(text)


def test_bom_is_ignored() -> None:
    assert json_codec.parse(b'\xef\xbb\xbf{"a":1}') == {"a": 1}


def test_dumps_refuses_absurd_depth() -> None:
    value: Any = 1
    for _ in range(300):
        value = [value]
    with pytest.raises(json_codec.JSONSyntaxError):
        json_codec.dumps(value)


def test_fragments_are_what_orjson_writes() -> None:
    assert isinstance(json_codec.parse(b"[12345678901234567890]")[0], orjson.Fragment)


# -- client IP ----------------------------------------------------------------------------------

TRUSTED = load(GatewaySettings, trusted_proxies="10.0.0.0/8, 192.0.2.1, ::1").trusted_proxies


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.5", "", (), "203.0.113.5"),
        ("203.0.113.5", "1.2.3.4", (), "203.0.113.5"),  # no trusted proxies: ignored
        ("203.0.113.5", "1.2.3.4", TRUSTED, "203.0.113.5"),  # the peer is not trusted
        ("10.0.0.1", "1.2.3.4", TRUSTED, "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4", TRUSTED, "1.2.3.4"),  # left of the client: forged
        ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.9.9.9", TRUSTED, "1.2.3.4"),  # two proxies
        ("10.0.0.1", "10.0.0.2, 10.0.0.3", TRUSTED, "10.0.0.2"),  # all trusted: leftmost
        ("10.0.0.1", "", TRUSTED, "10.0.0.1"),
        ("10.0.0.1", "garbage, 1.2.3.4", TRUSTED, "1.2.3.4"),
        ("10.0.0.1", "1.2.3.4, garbage", TRUSTED, "10.0.0.1"),  # bad hop: stop at the proxy
        ("10.0.0.1", "1.2.3.4:5678", TRUSTED, "1.2.3.4"),
        ("10.0.0.1", "[2001:db8::1]:443", TRUSTED, "2001:db8::1"),
        ("::1", "2001:db8::7", TRUSTED, "2001:db8::7"),
        ("::ffff:10.0.0.1", "1.2.3.4", TRUSTED, "1.2.3.4"),
        ("", "1.2.3.4", TRUSTED, ""),
    ],
)
def test_client_ip(peer: str, forwarded: str, trusted: tuple[Any, ...], expected: str) -> None:
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert client_ip(environ, trusted) == expected


@pytest.mark.parametrize(
    ("seconds", "header"), [(None, 1), (0, 1), (0.2, 1), (1, 1), (1.01, 2), (30, 30)]
)
def test_retry_after_rounds_up(seconds: float | None, header: int) -> None:
    assert retry_after_seconds(seconds) == header


def test_stamped_event_ids_are_distinct_version_4_uuids_in_hex() -> None:
    import uuid

    from apex_ingest.common.rpc import new_event_ids

    ids = new_event_ids(500)
    assert len(set(ids)) == 500
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text  # 32 lower-case hex digits, as apex.js and the server make
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    payload = to_request({"projectKey": "k", "events": [{"type": "t", "url": "/"}] * 3})
    assert len({event.id for event in payload.request.events}) == 3


@pytest.mark.parametrize(
    ("public", "snippet", "proto"),
    [
        ("events[2].visitorId", False, "events[2].visitor_id"),
        ("events[0].data", False, "events[0].data"),
        ("userId", False, "user_id"),
        ("userId", True, "events[0].user_id"),
        ("timestamp", True, "events[0].timestamp"),
        ("previousId", True, "events[0].previous_id"),
        ("projectKey", True, "project_key"),
        ("sentAt", True, "sent_at"),
        ("events", False, "events"),
        ("partial", False, "partial"),
    ],
)
def test_proto_field_inverts_public_field(public: str, snippet: bool, proto: str) -> None:
    assert proto_field(public, snippet) == proto
    assert public_field(proto, snippet) == public
