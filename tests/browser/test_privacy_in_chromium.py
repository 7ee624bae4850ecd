"""apex.js privacy modes in headless Chromium (issue #19): cookieless (nothing stored in the
browser, the server derives the visitor), consent (opt_out / opt_in, Global Privacy Control),
and sentAt on every request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import create_project
from tests.browser.support import STUB, EventsTable, Site, page, serve_site, snippet_tag

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, Request

pytestmark = pytest.mark.browser

GPC = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"


@pytest.fixture
def project_key(database_url: str) -> str:
    """A cookieless project (overrides the conftest's): snippets may come without visitorId.
    A tag without data-cookieless still sends its own visitor id, which the project keeps."""
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, "privacy tests", cookieless=True).key
    finally:
        engine.dispose()


@pytest.fixture
def site(gateway_url: str, project_key: str) -> Iterator[Site]:
    src = f"{gateway_url}/apex.js"
    button = '<button id="b">Buy</button>'
    pages = {
        "/": page("Home", button, snippet_tag(src, project_key)),
        "/cookieless": page("Cookieless", button, snippet_tag(src, project_key, cookieless="")),
        # A consent banner's default: opted out before the tag, with the queue stub.
        "/consent-first": page(
            "Consent first",
            button,
            STUB
            + "<script>apex('track', 'early'); apex('opt_out')</script>"
            + snippet_tag(src, project_key),
        ),
    }
    with serve_site(pages) as running:
        yield running


@pytest.fixture
def sent(tab: Page) -> list[dict[str, Any]]:
    """Every body apex.js sent (fetch and beacon), as the browser sent it."""
    bodies: list[dict[str, Any]] = []

    def seen(request: Request) -> None:
        if request.url.endswith("/api/events") and request.method == "POST" and request.post_data:
            bodies.append(json.loads(request.post_data))

    tab.on("request", seen)
    return bodies


def loaded(tab: Page) -> None:
    tab.wait_for_function("window.apex && window.apex.loaded === true")


def browser_storage(context: BrowserContext, tab: Page) -> dict[str, Any]:
    """Everything the page's origin keeps in the browser."""
    stored: dict[str, Any] = tab.evaluate(
        """async () => ({
          local: Object.keys(localStorage), session: Object.keys(sessionStorage),
          indexedDB: (await indexedDB.databases()).map((db) => db.name),
          cookie: document.cookie})"""
    )
    stored["cookies"] = context.cookies()
    return stored


def test_cookieless_mode_stores_nothing_and_the_server_derives_the_visitor(
    context: BrowserContext, tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    tab.goto(site.url("/cookieless"))
    loaded(tab)
    tab.click("#b")
    tab.evaluate("apex('track', 'signup', {plan: 'pro'})")
    events.wait_count("signup", 1)
    tab.evaluate("apex('opt_out'); apex('opt_in')")  # stores nothing either
    tab.reload()
    loaded(tab)
    rows = events.wait_count("pageview", 2)

    everything = events.all()
    assert [e.type for e in everything] == ["pageview", "click", "signup", "pageview"]
    visitor = rows[0].visitor_id
    assert visitor is not None and visitor.startswith("cl_") and len(visitor) == 35
    # The same browser on the same network is one visitor for the day, across reloads.
    assert {e.visitor_id for e in everything} == {visitor}
    assert tab.evaluate("apex.visitorId") is None
    assert sent and all("visitorId" not in body for body in sent)
    # Nothing at all in the browser: no cookie, no storage of any kind (even after opt_out).
    assert browser_storage(context, tab) == {
        "local": [],
        "session": [],
        "indexedDB": [],
        "cookie": "",
        "cookies": [],
    }


def test_cookieless_opt_out_lasts_for_the_page_only(
    context: BrowserContext, tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    tab.goto(site.url("/cookieless"))
    events.wait_count("pageview", 1)
    tab.evaluate("apex('opt_out'); apex('track', 'hidden')")
    tab.reload()  # nothing remembered: the reloaded page sends again
    events.wait_count("pageview", 2)
    assert [body["type"] for body in sent] == ["pageview", "pageview"]
    assert browser_storage(context, tab)["local"] == []


def test_opt_out_sends_nothing_and_is_remembered_until_opt_in(
    tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    tab.goto(site.url("/"))
    loaded(tab)
    (first,) = events.wait_count("pageview", 1)
    tab.evaluate("apex('opt_out')")
    tab.click("#b")
    tab.evaluate("apex('track', 'hidden'); apex.pageview()")
    assert tab.evaluate("localStorage.getItem('apex_consent')") == "0"

    tab.reload()  # remembered: not even the pageview leaves
    loaded(tab)
    tab.click("#b")
    time.sleep(0.5)
    assert [body["type"] for body in sent] == ["pageview"]

    tab.evaluate("apex('opt_in'); apex('track', 'back')")
    events.wait_count("back", 1)
    tab.reload()  # remembered too
    rows = events.wait_count("pageview", 2)
    types = [e.type for e in events.all()]
    assert types == ["pageview", "back", "pageview"]
    # The visitor id kept in the browser is the same before and after.
    assert {e.visitor_id for e in events.all()} == {first.visitor_id}
    assert rows[1].visitor_id == first.visitor_id


def test_an_opt_out_queued_before_the_tag_comes_first(
    tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    """Queued consent calls take effect before anything is sent, the page's pageview included."""
    tab.goto(site.url("/consent-first"))
    loaded(tab)
    tab.click("#b")
    time.sleep(0.5)
    assert sent == []
    tab.evaluate("apex('opt_in')")  # the banner's "accept"
    tab.click("#b")
    events.wait_count("click", 1)
    assert [e.type for e in events.all()] == ["click"]


def test_opting_out_drops_the_queue(
    tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    tab.goto(site.url("/"))
    loaded(tab)
    events.wait_count("pageview", 1)
    # An event still waiting from an earlier page (as after an outage), then the opt-out.
    waiting = {
        "type": "queued",
        "visitorId": "v",
        "projectKey": "pk",
        "url": "/",
        "id": "q" * 32,
    }
    tab.evaluate(
        "body => { localStorage.setItem('apex_q', JSON.stringify([body]));"
        " localStorage.setItem('apex_consent', '0') }",
        json.dumps(waiting),
    )
    tab.reload()
    loaded(tab)
    time.sleep(0.5)
    assert [body["type"] for body in sent] == ["pageview"]
    assert tab.evaluate(
        "Object.keys(localStorage).filter(k => k.startsWith('apex_q'))"
        ".map(k => localStorage.getItem(k))"
    ) == ["[]"]


def test_global_privacy_control_means_opted_out(
    context: BrowserContext,
    tab: Page,
    site: Site,
    events: EventsTable,
    sent: list[dict[str, Any]],
) -> None:
    context.add_init_script(GPC)
    tab.goto(site.url("/"))
    loaded(tab)
    tab.click("#b")
    tab.evaluate("apex('track', 'hidden')")
    time.sleep(0.5)
    assert sent == []
    assert tab.evaluate("apex.visitorId") is None
    # No id was created, nothing was written: the browser never chose anything on this site.
    assert browser_storage(context, tab)["local"] == []

    # The visitor's explicit choice on this site wins over the browser-wide signal.
    tab.evaluate("apex('opt_in'); apex('track', 'chosen')")
    (chosen,) = events.wait_count("chosen", 1)
    assert chosen.visitor_id == tab.evaluate("apex.visitorId")
    tab.reload()
    events.wait_count("pageview", 1)
    assert [e.type for e in events.all()] == ["chosen", "pageview"]


def test_every_request_carries_sent_at_set_at_each_attempt(
    context: BrowserContext, tab: Page, site: Site, events: EventsTable, sent: list[dict[str, Any]]
) -> None:
    # The first request fails as a network failure does (Playwright cannot route keepalive
    # requests): apex.js keeps the event and tries again. Every attempt's body is recorded.
    context.add_init_script(
        """(() => {
          const real = window.fetch; window.attempts = [];
          window.fetch = function (url, init) {
            window.attempts.push(init.body);
            if (window.attempts.length == 1) return Promise.reject(new TypeError('offline'));
            return real.apply(this, arguments);
          };
        })()"""
    )
    tab.goto(site.url("/"))
    (view,) = events.wait_count("pageview", 1)

    attempts = [json.loads(body) for body in tab.evaluate("window.attempts")]
    assert len(attempts) >= 2 and {a["id"] for a in attempts} == {view.event_id}
    first_sent, retry_sent = (datetime.fromisoformat(a["sentAt"]) for a in attempts[:2])
    timestamp = datetime.fromisoformat(attempts[0]["timestamp"])
    assert timestamp <= first_sent < retry_sent  # set when each attempt leaves
    assert attempts[0]["timestamp"] == attempts[1]["timestamp"]  # the event itself unchanged
    # What reached the network carries it too (fetch, or sendBeacon as the page goes).
    tab.evaluate("apex('track', 'last')")
    tab.goto("about:blank")
    events.wait_count("last", 1)
    assert sent and all(body["sentAt"].endswith("Z") for body in sent)
