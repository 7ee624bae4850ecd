"""Every contract rule on events, checked on the plain validation functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from apex_ingest.server.errors import FieldViolation
from apex_ingest.server.validation import build_rows, check_request_shape, data_problem
from apex_ingest.v1 import ingest_pb2

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def event(**fields: object) -> ingest_pb2.Event:
    base: dict[str, object] = {"type": "pageview", "visitor_id": "v1", "url": "https://a.example/"}
    base.update(fields)
    return ingest_pb2.Event(**base)  # type: ignore[arg-type]


def request(*events: ingest_pb2.Event, **fields: object) -> ingest_pb2.IngestEventsRequest:
    base: dict[str, object] = {"project_key": "pk_live_x", "events": list(events)}
    base.update(fields)
    return ingest_pb2.IngestEventsRequest(**base)  # type: ignore[arg-type]


def violations_of(req: ingest_pb2.IngestEventsRequest) -> dict[str, str]:
    found = check_request_shape(req)
    build_rows(req, NOW, found)
    return {v.field: v.description for v in found}


def test_valid_event_becomes_a_row() -> None:
    found: list[FieldViolation] = []
    rows = build_rows(
        request(event(id="e1", data='{"n":3}', referrer="https://r.example/"), user_id="u1"),
        NOW,
        found,
    )
    assert found == []
    assert rows[0]["event_id"] == "e1"
    assert rows[0]["data"] == '{"n":3}'
    assert rows[0]["user_id"] == "u1"
    assert rows[0]["referrer"] == "https://r.example/"
    assert rows[0]["occurred_at"] == NOW
    assert rows[0]["received_at"] == NOW


def test_missing_id_gets_a_server_generated_one() -> None:
    rows = build_rows(request(event(), event()), NOW, [])
    assert rows[0]["event_id"] and rows[1]["event_id"]
    assert rows[0]["event_id"] != rows[1]["event_id"]


def test_empty_data_and_referrer_mean_none() -> None:
    row = build_rows(request(event()), NOW, [])[0]
    assert row["data"] == "{}"
    assert row["referrer"] is None
    assert row["visitor_id"] == "v1"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": ""}, "events[0].type"),
        ({"type": "x" * 101}, "events[0].type"),
        ({"type": "page\nview"}, "events[0].type"),
        ({"type": "a\x00b"}, "events[0].type"),
        ({"type": "a\x7fb"}, "events[0].type"),  # DEL: ASCII, not printable
        ({"type": "terminé\x85"}, "events[0].type"),  # a C1 control beside other non-ASCII
        ({"visitor_id": "v\x9f"}, "events[0].visitor_id"),
        ({"visitor_id": "v" * 129}, "events[0].visitor_id"),
        ({"url": ""}, "events[0].url"),
        ({"url": "ftp://a.example/"}, "events[0].url"),
        ({"url": "javascript:alert(1)"}, "events[0].url"),
        ({"url": "relative/path"}, "events[0].url"),
        ({"url": "//evil.example/"}, "events[0].url"),
        ({"url": "https://"}, "events[0].url"),
        ({"url": "http://[::1"}, "events[0].url"),
        ({"url": "https://exa mple.com/"}, "events[0].url"),
        ({"url": "https://x.example:abc/"}, "events[0].url"),
        ({"url": "https://x.example:99999/"}, "events[0].url"),
        ({"url": "/\\evil.example"}, "events[0].url"),
        ({"url": "/" + "a" * 4096}, "events[0].url"),
        ({"url": "/a\x00"}, "events[0].url"),
        ({"url": "https://a.example/é\x85"}, "events[0].url"),
        ({"referrer": "r" * 4097}, "events[0].referrer"),
        ({"referrer": "https://x/\x00"}, "events[0].referrer"),
        ({"id": "i" * 65}, "events[0].id"),
        ({"id": "a\nb"}, "events[0].id"),
        ({"data": "[1, 2]"}, "events[0].data"),
        ({"data": '"text"'}, "events[0].data"),
        ({"data": "{bad json"}, "events[0].data"),
        ({"data": '{"a": NaN}'}, "events[0].data"),
        ({"data": '{"a": "\\u0000"}'}, "events[0].data"),
        ({"data": '{"\\u0000": 1}'}, "events[0].data"),
        ({"data": '{"a": "\\ud800"}'}, "events[0].data"),
        ({"data": '{"a": ' + "9" * 5000 + "}"}, "events[0].data"),
    ],
)
def test_each_rule_names_its_field(fields: dict[str, object], field: str) -> None:
    assert field in violations_of(request(event(**fields)))


def test_type_and_url_limits_are_inclusive() -> None:
    assert violations_of(request(event(type="x" * 100, url="/" + "a" * 4095))) == {}
    assert violations_of(request(event(id="i" * 64, visitor_id="v" * 128))) == {}


def test_urls_that_are_allowed() -> None:
    for url in (
        "https://a.example/p?q=1#h",
        "HTTP://A.EXAMPLE",
        "/",
        "/pricing?x=1",
        "https://a.example:8443/p%20q",
        "/search?q=two words",
    ):
        assert violations_of(request(event(url=url))) == {}, url


def test_a_url_is_judged_the_same_every_time() -> None:
    """URL forms are cached (validation._url_form_problem): the second answer is the first's."""
    for _ in range(2):
        assert violations_of(request(event(url="https://a.example/x?q=1"))) == {}
        assert "events[0].url" in violations_of(request(event(url="ftp://a.example/")))
        long_path = "/" + "p" * 600  # beyond the cached length: judged each time
        assert violations_of(request(event(url=long_path))) == {}
        assert "events[0].url" in violations_of(request(event(url=long_path + "\x00")))


def test_unicode_type_names_are_fine() -> None:
    assert violations_of(request(event(type="achat_terminé 🎉"))) == {}


def test_every_violation_is_reported_with_its_index() -> None:
    found = violations_of(request(event(), event(url="x", type=""), event(data="[]")))
    assert set(found) == {"events[1].url", "events[1].type", "events[2].data"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"project_key": ""}, "project_key"),
        ({"project_key": "k" * 129}, "project_key"),
        ({"user_id": "u" * 129}, "user_id"),
        ({"user_id": "u\x00"}, "user_id"),
        ({"context": ingest_pb2.RequestContext(client_ip="not-an-ip")}, "context.client_ip"),
    ],
)
def test_request_level_rules(fields: dict[str, object], field: str) -> None:
    assert field in violations_of(request(event(), **fields))


def test_event_count_limits() -> None:
    assert "events" in violations_of(request())
    assert "events" in violations_of(request(*[event()] * 501))
    assert violations_of(request(*[event()] * 500)) == {}


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def test_timestamp_becomes_occurred_at() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    row = build_rows(request(event(timestamp=ts(when))), NOW, [])[0]
    assert row["occurred_at"] == when


@pytest.mark.parametrize(
    ("when", "ok"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), True),
        (NOW + timedelta(days=1), True),
        (NOW + timedelta(days=1, seconds=1), False),
        (datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), False),
        (datetime(9999, 12, 31, tzinfo=UTC), False),
    ],
)
def test_timestamp_range(when: datetime, ok: bool) -> None:
    found = violations_of(request(event(timestamp=ts(when))))
    assert ("events[0].timestamp" not in found) is ok


def test_invalid_nanos_are_rejected() -> None:
    found = violations_of(request(event(timestamp=Timestamp(seconds=10, nanos=-1))))
    assert "events[0].timestamp" in found


def test_user_agent_is_cleaned_and_truncated() -> None:
    context = ingest_pb2.RequestContext(user_agent="Mozilla\x00\r\n" + "x" * 2000, client_ip="::1")
    row = build_rows(request(event(), context=context), NOW, [])[0]
    assert row["user_agent"].startswith("Mozillax")
    assert len(row["user_agent"]) == 1024
    assert row["ip"] == "::1"


def test_an_ipv6_zone_is_dropped() -> None:
    """A trusted proxy may forward "fe80::1%<interface>": the zone would not fit the column."""
    context = ingest_pb2.RequestContext(client_ip="fe80::1%" + "z" * 60)
    violations: list[FieldViolation] = []
    assert check_request_shape(request(event(), context=context)) == []
    assert build_rows(request(event(), context=context), NOW, violations)[0]["ip"] == "fe80::1"


class TestData:
    def test_a_number_beyond_a_double_says_so(self) -> None:
        problem = data_problem('{"n":1e400}')
        assert problem is not None and "double" in problem

    def test_size_limit_counts_utf8_bytes(self) -> None:
        fits = '{"a":"' + "x" * (32 * 1024 - 8) + '"}'
        assert data_problem(fits) is None
        assert data_problem('{"a":"' + "é" * (16 * 1024) + '"}') is not None

    def test_depth_limit(self) -> None:
        assert data_problem('{"a":' * 15 + "1" + "}" * 15) is None
        assert data_problem('{"a":' * 16 + "1" + "}" * 16) is None
        assert data_problem('{"a":' * 17 + "1" + "}" * 17) is not None
        assert data_problem('{"a":' + "[" * 16 + "]" * 16 + "}") is not None

    def test_brackets_inside_strings_are_not_nesting(self) -> None:
        assert data_problem('{"a":"' + "{[" * 40 + '"}') is None

    def test_escaped_backslash_u0000_text_is_not_nul(self) -> None:
        assert data_problem('{"a":"\\\\u0000"}') is None

    def test_very_deep_nesting_is_a_violation_not_a_crash(self) -> None:
        assert data_problem('{"a":' * 100_000 + "1" + "}" * 100_000) is not None

    def test_nesting_past_the_parser_limit_is_a_violation(self) -> None:
        assert data_problem('{"a":' + "[" * 15000 + "]" * 15000 + "}") is not None


_DIGITS_16383 = "0." + "0" * 16382 + "1"
_DIGITS_16384 = "0." + "0" * 16383 + "1"


@pytest.mark.parametrize(
    "number",
    [
        "1e-16383",
        "1e-16384",
        "1.5e-16382",
        "1.5e-16383",
        "0e999999",
        "0e-16384",
        "1e-000000000000000000000016384",
        "1E-16384",
        "0E+1073741823",
        "1.0e+0000000000000000000000001",
        "0e1073741822",
        "0e1073741823",
        "1e308",
        _DIGITS_16383,
        _DIGITS_16384,
    ],
)
@pytest.mark.postgres
def test_numbers_in_data_are_accepted_exactly_when_postgresql_can_store_them(
    number: str, postgres_url: str
) -> None:
    """orjson reads 1e-20000 as 0.0; PostgreSQL refuses it. The rule follows PostgreSQL."""
    from sqlalchemy import create_engine, exc, text

    data = f'{{"n": {number}, "s": "1e-99999"}}'
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT CAST(:data AS jsonb)"), {"data": data})
        storable = True
    except exc.DataError:
        storable = False
    finally:
        engine.dispose()
    problem = data_problem(data)
    assert (problem is None) == storable, problem
    if problem is not None:
        assert "16383 digits" in problem
