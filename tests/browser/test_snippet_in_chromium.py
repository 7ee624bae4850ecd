"""apex.js in real headless Chromium: a test site on its own origin loads the snippet from the
gateway, and every event is checked where it ends up, in the events table."""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import Event, EventsTable, Site

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.browser

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def loaded(tab: Page) -> None:
    """Wait until apex.js has run on the page."""
    tab.wait_for_function("window.apex && window.apex.loaded === true")


def mark(tab: Page, events: EventsTable, name: str) -> list[Event]:
    """Send a custom event and wait for it: events sent before it have had their chance to arrive.

    Used before asserting that something was *not* sent, with a short grace period for beacons
    that might travel out of order.
    """
    tab.evaluate("name => apex.track(name)", name)
    events.wait_for(lambda rows: any(e.type == name for e in rows), f"the {name!r} marker")
    time.sleep(0.5)
    return events.all()


def test_pageview_on_load(tab: Page, site: Site, events: EventsTable) -> None:
    tab.goto(site.url("/about"))
    (view,) = events.wait_count("pageview", 1)

    assert view.url == site.url("/about")
    assert view.referrer in ("", None)  # typed into the address bar: no referrer
    assert view.data == {}
    assert view.visitor_id is not None and HEX32.match(view.visitor_id)
    assert HEX32.match(view.event_id)
    assert view.user_agent is not None and "Chrome" in view.user_agent
    assert tab.evaluate("apex.visitorId") == view.visitor_id


def test_spa_navigation_sends_pageviews_with_referrer(
    tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/spa"))
    loaded(tab)
    events.wait_count("pageview", 1)
    # Each step waits for its pageview, so that the order of the rows is the order of the steps.
    tab.evaluate("history.pushState({}, '', '/spa/step-2')")
    events.wait_count("pageview", 2)
    tab.evaluate("history.replaceState({s: 1}, '', '/spa/step-2')")  # same URL: no new pageview
    tab.evaluate("location.hash = 'details'")  # hashchange
    events.wait_count("pageview", 3)
    tab.evaluate("history.back()")  # popstate, back to /spa/step-2
    tab.wait_for_url(site.url("/spa/step-2"))
    events.wait_count("pageview", 4)
    views = [e for e in mark(tab, events, "done") if e.type == "pageview"]

    assert [(v.url, v.referrer or "") for v in views] == [
        (site.url("/spa"), ""),
        (site.url("/spa/step-2"), site.url("/spa")),
        (site.url("/spa/step-2#details"), site.url("/spa/step-2")),
        (site.url("/spa/step-2"), site.url("/spa/step-2#details")),
    ]
    assert len({v.visitor_id for v in views}) == 1
    assert len({v.event_id for v in views}) == 4


def test_click_on_a_link_to_another_page_arrives(
    tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/"))
    loaded(tab)
    with tab.expect_navigation():
        tab.click("#to-about b")  # inside the link
    assert tab.url == site.url("/about")

    (click,) = events.wait_count("click", 1)
    assert click.url == site.url("/")
    assert click.data == {
        "id": "to-about",
        "tag": "a",
        "text": "About us",
        "href": site.url("/about"),
    }
    views = events.wait_count("pageview", 2)
    assert views[-1].url == site.url("/about")
    assert views[-1].referrer == site.url("/")
    assert click.visitor_id == views[-1].visitor_id


def test_clicks_on_buttons_and_elements_with_an_id_or_data_apex(
    tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/"))
    loaded(tab)
    tab.click("button[data-apex-plan]")
    events.wait_count("click", 1)
    tab.click("#card h3")  # inside an element with an id
    events.wait_count("click", 2)
    tab.click("main p span")  # nothing trackable around it: no event
    clicks = [e for e in mark(tab, events, "done") if e.type == "click"]

    assert [c.data for c in clicks] == [
        {"id": "", "tag": "button", "text": "Buy now", "href": "", "plan": "pro", "price": "9"},
        {"id": "card", "tag": "div", "text": "Card title Card text", "href": ""},
    ]


def test_form_submit_keeps_secrets_out_and_still_submits(
    tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/form"))
    loaded(tab)
    tab.fill("[name=email]", "ada@example.com")
    tab.fill("[name=password]", "hunter2-secret")
    tab.fill("[name=card]", "4111111111111111")
    tab.fill("[name=expiry]", "12/34")
    tab.fill("[name=note]", "private-note")
    tab.fill("[name=phone]", "555-0100")
    tab.select_option("[name=plan]", "pro")
    tab.check("[name=newsletter]")
    tab.fill("[name=comment]", "hello\nworld")
    with tab.expect_navigation():
        tab.click("#send")

    # The submit went through, untouched: the site got every field, the password included.
    tab.wait_for_selector("text=Thanks!")
    assert tab.url == site.url("/thanks")
    path, posted = site.posts[-1]
    assert path == "/thanks"
    assert posted["password"] == ["hunter2-secret"]
    assert posted["csrf"] == ["hidden-token-123"]

    (submit,) = events.wait_count("form_submit", 1)
    assert submit.url == site.url("/form")
    assert submit.data == {
        "id": "signup",
        "name": "signup",
        "action": site.url("/thanks"),
        "method": "post",
        "fields": {
            "email": "ada@example.com",
            "plan": "pro",
            "newsletter": "yes",
            "comment": "hello\nworld",
        },
    }
    stored = json.dumps([e.data for e in events.all()])
    for secret in ("hunter2", "hidden-token", "4111", "12/34", "private-note", "555-0100"):
        assert secret not in stored
    # The page that the form led to counts too.
    views = events.wait_count("pageview", 2)
    assert views[-1].url == site.url("/thanks")


def test_track_before_and_after_load(tab: Page, site: Site, events: EventsTable) -> None:
    tab.goto(site.url("/queue"))  # calls apex('track', ...) through the stub before apex.js loads
    loaded(tab)
    tab.evaluate("apex.track('after_load', {plan: 'pro', count: 3, ok: true, none: null})")
    tab.evaluate("window.apex('track', 'after_load_2', {big: 9007199254740991})")
    rows = events.wait_for(
        lambda rows: {"early", "early_two", "after_load", "after_load_2"} <= {e.type for e in rows},
        "the queued and the direct custom events",
    )
    by_type = {e.type: e for e in rows}

    assert by_type["early"].data == {"n": 1, "s": "café ☕", "nested": {"a": [1, 2.5]}}
    assert by_type["early_two"].data == {}
    assert by_type["after_load"].data == {"plan": "pro", "count": 3, "ok": True, "none": None}
    assert by_type["after_load_2"].data == {"big": 9007199254740991}
    assert by_type["early"].url == site.url("/queue")
    assert len({e.visitor_id for e in rows}) == 1


def test_visitor_id_is_stable_across_reloads_and_pages(
    browser: Browser, tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/about"))
    events.wait_count("pageview", 1)
    tab.reload()
    events.wait_count("pageview", 2)
    tab.goto(site.url("/spa"))
    views = events.wait_count("pageview", 3)

    visitor = views[0].visitor_id
    assert visitor is not None and HEX32.match(visitor)
    assert [v.visitor_id for v in views] == [visitor] * 3
    assert tab.evaluate("localStorage.getItem('apex_vid')") == visitor

    # Another browser profile is another visitor.
    other = browser.new_context()
    try:
        other.new_page().goto(site.url("/about"))
        views = events.wait_count("pageview", 4)
    finally:
        other.close()
    assert views[-1].visitor_id != visitor


def test_visitor_id_falls_back_to_a_cookie(
    context: BrowserContext, tab: Page, site: Site, events: EventsTable
) -> None:
    # localStorage that throws, as with storage blocked or in some private modes
    context.add_init_script(
        "Object.defineProperty(window, 'localStorage', {get() {"
        " throw new DOMException('blocked', 'SecurityError') }})"
    )
    tab.goto(site.url("/about"))
    events.wait_count("pageview", 1)
    tab.goto(site.url("/spa"))
    views = events.wait_count("pageview", 2)

    assert views[0].visitor_id == views[1].visitor_id
    cookie = next(c for c in context.cookies(site.base_url) if c["name"] == "apex_vid")
    assert cookie["value"] == views[0].visitor_id
    assert cookie["sameSite"] == "Lax"


def test_auto_false_sends_no_automatic_events(tab: Page, site: Site, events: EventsTable) -> None:
    tab.goto(site.url("/noauto"))
    loaded(tab)
    tab.click("#b")
    tab.evaluate("history.pushState({}, '', '/noauto/spa')")
    with tab.expect_navigation():
        tab.click("#next")
    loaded(tab)
    tab.evaluate("apex.pageview()")  # manual pageviews still work
    rows = mark(tab, events, "done")

    assert [(e.type, e.url) for e in rows] == [
        ("pageview", site.url("/noauto-2")),
        ("done", site.url("/noauto-2")),
    ]


def test_do_not_track_is_respected_when_asked(
    context: BrowserContext, tab: Page, site: Site, events: EventsTable
) -> None:
    # Do Not Track (Global Privacy Control opts out with or without the attribute:
    # tests/browser/test_privacy_in_chromium.py).
    context.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'})"
    )
    tab.goto(site.url("/dnt"))
    loaded(tab)
    tab.click("#b")
    tab.evaluate("apex.track('custom'); apex('track', 'custom_2')")
    assert tab.evaluate("apex.visitorId") is None
    # The same browser on a page without data-respect-dnt is tracked (and proves delivery works).
    tab.goto(site.url("/about"))
    events.wait_count("pageview", 1)
    time.sleep(0.5)

    assert [(e.type, e.url) for e in events.all()] == [("pageview", site.url("/about"))]


def test_self_hosted_snippet_with_data_api(tab: Page, site: Site, events: EventsTable) -> None:
    tab.goto(site.url("/self-hosted"))
    (view,) = events.wait_count("pageview", 1)
    assert view.url == site.url("/self-hosted")


def test_events_sent_while_the_page_unloads_arrive(
    tab: Page, site: Site, events: EventsTable
) -> None:
    tab.goto(site.url("/unload"))
    loaded(tab)
    # Tracked right before leaving, and from the pagehide handler while leaving.
    with tab.expect_navigation():
        tab.evaluate("apex.track('leaving', {n: 1}); location.href = '/about'")
    rows = events.wait_for(
        lambda rows: {"leaving", "bye"} <= {e.type for e in rows}, "the events sent on unload"
    )
    bye = next(e for e in rows if e.type == "bye")
    assert bye.url == site.url("/unload")
    assert bye.data == {"n": 3}


def test_bad_calls_and_huge_data_never_break_the_page(
    tab: Page, site: Site, events: EventsTable, page_errors: list[str]
) -> None:
    tab.goto(site.url("/spa"))
    loaded(tab)
    tab.evaluate(
        """() => {
        const loop = {}; loop.self = loop;
        apex(); apex('no-such-command'); apex.track(); apex.track('');
        apex.track('circular', loop);
        apex.track('not_an_object', [1, 2]);
        apex.track('nul\\u0000name', {'k\\u0000': 'v\\u0000'});
        apex.track('x'.repeat(500), {});
        apex.track('huge', {blob: 'y'.repeat(200000), list: Array(5000).fill('z'.repeat(50))});
        let deep = {}; for (let i = 0; i < 40; i++) deep = {d: deep};
        apex.track('deep', deep);
    }"""
    )
    # The host's own errors still reach it: the history patch passes them through.
    assert tab.evaluate(
        "() => { try { history.pushState({}, '', 'https://elsewhere.example/'); return false }"
        " catch (e) { return e.name === 'SecurityError' } }"
    )
    rows = mark(tab, events, "done")
    by_type = {e.type: e for e in rows}

    assert by_type["circular"].data == {}
    assert by_type["not_an_object"].data == {"value": [1, 2]}
    assert by_type["nulname"].data == {"k": "v"}
    assert "x" * 100 in by_type
    huge = by_type["huge"].data
    assert len(json.dumps(huge, separators=(",", ":")).encode()) < 32 * 1024
    assert huge["blob"].startswith("yyyy") and huge["list"][0].startswith("zzzz")
    deep = by_type["deep"].data
    assert "d" in deep and json.dumps(deep).count("{") <= 16
    assert page_errors == []
