"""Enrichment rules (issue #19) on real User-Agents and URLs, and clock-skew correction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from apex_ingest.server import enrichment
from apex_ingest.server.errors import FieldViolation
from apex_ingest.server.validation import build_rows
from apex_ingest.v1 import ingest_pb2

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
SAFARI_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Mobile/15E148 Safari/604.1"
)
ANDROID_CHROME = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.6778.81 Mobile Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
AHREFS = "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)"
HEADLESS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/131.0.0.0 Safari/537.36"
)
CURL = "curl/8.5.0"
SDK = "apex-ingest-sdk-python/0.1.0"
REQUESTS = "python-requests/2.32.3"


@pytest.mark.parametrize(
    ("user_agent", "browser", "version", "os", "device_class", "is_bot"),
    [
        (CHROME, "Chrome", "131", "Windows", "desktop", False),
        (SAFARI_IOS, "Mobile Safari", "18", "iOS", "mobile", False),
        (IPAD, "Mobile Safari", "17", "iOS", "tablet", False),
        (ANDROID_CHROME, "Chrome Mobile", "131", "Android", "mobile", False),
        (FIREFOX, "Firefox", "133", "Ubuntu", "desktop", False),
        (GOOGLEBOT, "Googlebot", "2", None, "bot", True),
        (BINGBOT, "bingbot", "2", None, "bot", True),
        (AHREFS, "AhrefsBot", "7", None, "bot", True),
        (HEADLESS, "HeadlessChrome", "131", "Linux", "bot", True),
        # Backends sending their own events are not bots, whatever crawler lists say.
        (CURL, "curl", "8", None, None, False),
        (REQUESTS, "Python Requests", "2", None, None, False),
        (SDK, None, None, None, None, False),
    ],
)
def test_user_agents_are_parsed(
    user_agent: str,
    browser: str | None,
    version: str | None,
    os: str | None,
    device_class: str | None,
    is_bot: bool,
) -> None:
    agent = enrichment.parse_agent(user_agent)
    assert (agent.browser, agent.browser_version, agent.os) == (browser, version, os)
    assert (agent.device_class, agent.is_bot) == (device_class, is_bot)


def test_no_user_agent_is_no_browser_and_no_bot() -> None:
    assert enrichment.parse_agent(None) == enrichment.Agent()
    assert enrichment.parse_agent("") == enrichment.Agent()


def test_each_distinct_user_agent_is_parsed_once() -> None:
    enrichment.parse_agent.cache_clear()
    for _ in range(3):
        enrichment.parse_agent(CHROME)
        enrichment.parse_agent(FIREFOX)
    info = enrichment.parse_agent.cache_info()
    assert (info.misses, info.hits) == (2, 4)


def test_campaign_parameters_come_from_the_query() -> None:
    url = (
        "https://shop.example/landing?utm_source=newsletter&utm_medium=email&utm_campaign="
        "black%20friday&utm_term=shoes&utm_content=hero&gclid=abc123&fbclid=fb9&q=1"
    )
    assert enrichment.campaign(url) == (
        "newsletter",
        "email",
        "black friday",
        "shoes",
        "hero",
        "abc123",
        "fb9",
    )
    assert enrichment.campaign("https://shop.example/pricing?plan=pro") == (None,) * 7
    assert enrichment.campaign("/signup") == (None,) * 7
    # The first of each, names in any case, empty values as none, values cut to 256.
    assert enrichment.campaign("/a?UTM_SOURCE=x&utm_source=y&utm_medium=&utm_term=" + "t" * 300)[
        :4
    ] == ("x", None, None, "t" * 256)
    # A fragment is not the query.
    assert enrichment.campaign("/a#utm_source=x") == (None,) * 7


@pytest.mark.parametrize(
    ("referrer", "url", "host", "kind"),
    [
        ("", "https://shop.example/", None, "direct"),
        (None, "/signup", None, "direct"),
        ("https://www.google.com/", "https://shop.example/", "www.google.com", "search"),
        ("https://www.google.co.uk/search?q=x", "/x", "www.google.co.uk", "search"),
        ("https://duckduckgo.com/", "https://shop.example/", "duckduckgo.com", "search"),
        ("https://search.brave.com/search?q=a", "/", "search.brave.com", "search"),
        ("https://l.facebook.com/l.php?u=x", "https://shop.example/", "l.facebook.com", "social"),
        ("https://t.co/abc", "https://shop.example/", "t.co", "social"),
        ("https://news.ycombinator.com/item?id=1", "/", "news.ycombinator.com", "social"),
        ("https://mail.google.com/mail/u/0/", "/", "mail.google.com", "email"),
        ("https://outlook.live.com/mail/", "/", "outlook.live.com", "email"),
        ("https://shop.example/cart", "https://shop.example/checkout", "shop.example", "internal"),
        ("https://www.shop.example/", "https://shop.example/", "www.shop.example", "internal"),
        ("https://blog.shop.example/", "https://shop.example/", "blog.shop.example", "internal"),
        ("https://partner.example/post", "https://shop.example/", "partner.example", "other"),
        ("not a url", "https://shop.example/", None, "other"),
    ],
)
def test_referrer_host_and_class(
    referrer: str | None, url: str, host: str | None, kind: str
) -> None:
    assert enrichment.referrer(referrer, url) == (host, kind)


@pytest.mark.parametrize(
    ("ip", "mode", "kept"),
    [
        ("203.0.113.77", "full", "203.0.113.77"),
        ("203.0.113.77", "truncated", "203.0.113.0"),
        ("203.0.113.77", "none", None),
        ("2001:db8:abcd:12:34::1", "full", "2001:db8:abcd:12:34::1"),
        ("2001:db8:abcd:12:34::1", "truncated", "2001:db8:abcd::"),
        ("2001:db8:abcd:12:34::1", "none", None),
        (None, "full", None),
        ("203.0.113.77", "unknown-mode", None),
    ],
)
def test_ip_modes(ip: str | None, mode: str, kept: str | None) -> None:
    assert enrichment.scrub_ip(ip, mode) == kept


def test_country_of_global_addresses_only() -> None:
    assert enrichment.country("8.8.8.8") == "US"
    assert enrichment.country("81.2.69.142") == "GB"
    assert enrichment.country("2001:4860:4860::8888") == "US"
    for local in ("127.0.0.1", "10.1.2.3", "192.168.1.1", "::1", None, ""):
        assert enrichment.country(local) is None


# --- rows: enrichment and the clock ---------------------------------------------------------

RECEIVED = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def _request(
    sent_at: datetime | None = None,
    timestamps: tuple[datetime | None, ...] = (None,),
    user_agent: str = CHROME,
    client_ip: str = "81.2.69.142",
    url: str = "https://shop.example/?utm_source=news",
    referrer: str = "https://www.google.com/",
) -> ingest_pb2.IngestEventsRequest:
    request = ingest_pb2.IngestEventsRequest(
        project_key="pk",
        context=ingest_pb2.RequestContext(client_ip=client_ip, user_agent=user_agent),
    )
    for index, timestamp in enumerate(timestamps):
        event = request.events.add(
            id=f"e{index}", type="pageview", url=url, referrer=referrer, visitor_id="v"
        )
        if timestamp is not None:
            event.timestamp.FromDatetime(timestamp)
    if sent_at is not None:
        request.sent_at.FromDatetime(sent_at)
    return request


def _rows(
    request: ingest_pb2.IngestEventsRequest, ip_mode: str = "full"
) -> tuple[list[dict[str, object]], list[FieldViolation]]:
    violations: list[FieldViolation] = []
    rows = build_rows(request, RECEIVED, violations, ip_mode=ip_mode)
    return rows, violations


def test_a_row_carries_every_derived_column() -> None:
    rows, violations = _rows(_request())
    assert violations == []
    row = rows[0]
    assert {k: row[k] for k in enrichment.REQUEST_COLUMNS} == {
        "browser": "Chrome",
        "browser_version": "131",
        "os": "Windows",
        "device_class": "desktop",
        "is_bot": False,
        "country": "GB",
    }
    assert row["utm_source"] == "news" and row["gclid"] is None
    assert (row["referrer_host"], row["referrer_class"]) == ("www.google.com", "search")
    assert row["ip"] == "81.2.69.142"
    assert (row["client_occurred_at"], row["clock_skew_ms"]) == (None, None)
    assert set(enrichment.ENRICHED_COLUMNS) <= row.keys()


def test_the_country_is_found_before_the_ip_is_dropped() -> None:
    for mode, kept in (("truncated", "81.2.69.0"), ("none", None)):
        rows, _ = _rows(_request(), ip_mode=mode)
        assert (rows[0]["ip"], rows[0]["country"]) == (kept, "GB")


def test_enrichment_off_leaves_the_columns_null_but_keeps_ip_mode_and_clock() -> None:
    enrichment.configure(enabled=False)
    try:
        skewed = RECEIVED + timedelta(hours=3)
        rows, _ = _rows(_request(sent_at=skewed, timestamps=(skewed,)), ip_mode="truncated")
    finally:
        enrichment.configure(enabled=True)
    row = rows[0]
    assert all(
        row[name] is None
        for name in enrichment.ENRICHED_COLUMNS
        if name not in ("client_occurred_at", "clock_skew_ms")
    )
    assert row["ip"] == "81.2.69.0"
    assert row["occurred_at"] == RECEIVED and row["clock_skew_ms"] == 3 * 3600 * 1000


def test_a_browser_clock_hours_ahead_still_stores_the_right_time() -> None:
    """The browser's clock is 5 h ahead: the event happened 10 s before the request left."""
    skew = timedelta(hours=5)
    sent_at = RECEIVED + skew  # the request left "now" by the browser's clock
    happened = RECEIVED - timedelta(seconds=10)
    rows, violations = _rows(_request(sent_at=sent_at, timestamps=(happened + skew, None)))
    assert violations == []
    assert rows[0]["occurred_at"] == happened
    assert rows[0]["client_occurred_at"] == happened + skew
    assert rows[0]["clock_skew_ms"] == 5 * 3600 * 1000
    # An event without a timestamp is at the receipt time; the request's skew is still noted.
    assert (rows[1]["occurred_at"], rows[1]["client_occurred_at"]) == (RECEIVED, None)
    assert rows[1]["clock_skew_ms"] == 5 * 3600 * 1000


def test_a_clock_days_behind_is_corrected_too() -> None:
    skew = -timedelta(days=3, hours=2)
    happened = RECEIVED - timedelta(minutes=1)
    rows, violations = _rows(_request(sent_at=RECEIVED + skew, timestamps=(happened + skew,)))
    assert violations == []
    assert rows[0]["occurred_at"] == happened


def test_a_skew_under_the_threshold_is_not_corrected() -> None:
    sent_at = RECEIVED - timedelta(seconds=5)  # a slow upload: time in transit, not skew
    happened = RECEIVED - timedelta(minutes=2)
    rows, _ = _rows(_request(sent_at=sent_at, timestamps=(happened,)))
    assert rows[0]["occurred_at"] == happened
    assert rows[0]["clock_skew_ms"] == 0


def test_what_stays_in_the_future_is_clamped_to_the_receipt() -> None:
    # Correct clock, but the event claims to happen an hour after the request left.
    rows, violations = _rows(
        _request(sent_at=RECEIVED, timestamps=(RECEIVED + timedelta(hours=1),))
    )
    assert violations == []
    assert rows[0]["occurred_at"] == RECEIVED
    assert rows[0]["client_occurred_at"] == RECEIVED + timedelta(hours=1)


def test_more_than_a_day_ahead_once_corrected_is_still_refused() -> None:
    skew = timedelta(hours=5)
    request = _request(sent_at=RECEIVED + skew, timestamps=(RECEIVED + skew + timedelta(days=2),))
    rows, violations = _rows(request)
    assert rows == []
    assert [v.field for v in violations] == ["events[0].timestamp"]
    assert "clock skew" in violations[0].description


def test_a_timestamp_a_day_ahead_is_accepted_when_sent_at_shows_the_clock_was() -> None:
    """Without sent_at this event would be refused (more than a day after the receipt)."""
    skew = timedelta(days=2)
    happened = RECEIVED - timedelta(seconds=5)
    rows, violations = _rows(_request(timestamps=(happened + skew,)))
    assert [v.field for v in violations] == ["events[0].timestamp"]
    rows, violations = _rows(_request(sent_at=RECEIVED + skew, timestamps=(happened + skew,)))
    assert violations == [] and rows[0]["occurred_at"] == happened


def test_without_sent_at_timestamps_are_stored_as_sent() -> None:
    ahead = RECEIVED + timedelta(hours=2)  # within the day allowed, kept as sent
    rows, _ = _rows(_request(timestamps=(ahead,)))
    assert rows[0]["occurred_at"] == ahead
    assert rows[0]["client_occurred_at"] == ahead
    assert rows[0]["clock_skew_ms"] is None


def test_an_invalid_sent_at_is_a_violation_naming_it() -> None:
    request = _request()
    request.sent_at.seconds, request.sent_at.nanos = 100, -5
    _, violations = _rows(request)
    assert [v.field for v in violations] == ["sent_at"]
    request.sent_at.seconds, request.sent_at.nanos = -1, 0
    _, violations = _rows(request)
    assert [v.field for v in violations] == ["sent_at"]


def test_a_correction_before_1970_is_refused() -> None:
    request = _request(
        sent_at=RECEIVED + timedelta(days=365 * 30),
        timestamps=(datetime(1980, 1, 1, tzinfo=UTC),),
    )
    rows, violations = _rows(request)
    assert rows == [] and [v.field for v in violations] == ["events[0].timestamp"]


def test_a_request_refused_before_authentication_parses_nothing() -> None:
    from apex_ingest.server.errors import InvalidRequest
    from apex_ingest.server.ingest import prepare

    request = _request(user_agent="Mozilla/5.0 (never seen) Gecko/1 Firefox/1")
    request.project_key = ""  # refused before any project is looked up
    enrichment.parse_agent.cache_clear()
    with pytest.raises(InvalidRequest):
        prepare(request, projects=None, received_at=RECEIVED)  # type: ignore[arg-type]
    assert enrichment.parse_agent.cache_info().currsize == 0
