"""apex.js survives outages (issue #17): in Chromium, against a gateway that answers 503 for a
while, every event arrives once after it recovers, including those queued before a navigation."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tests.browser.support import EventsTable, Site, page, serve_site, snippet_tag

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

#: Every event body held in the page's origin's send queues (one `apex_q...` key per page).
QUEUED = (
    "Object.keys(localStorage).filter(k => k.startsWith('apex_q'))"
    ".flatMap(k => JSON.parse(localStorage.getItem(k)))"
)


class Outage:
    """An HTTP front for the gateway's /api/events that answers 503 (Retry-After: 1) while
    `down`, and forwards to the gateway otherwise. Records (time, status, body) of each POST."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.down = True
        self.posts: list[tuple[float, int, bytes]] = []
        outage = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _cors(self) -> None:
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Expose-Headers", "Retry-After")

            def do_OPTIONS(self) -> None:
                self.send_response(204)
                self._cors()
                self.send_header("Access-Control-Allow-Headers", "Content-Type")
                self.end_headers()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if outage.down:
                    status, answer = 503, b'{"error":{"code":"unavailable","message":"down"}}'
                else:
                    forwarded = requests.post(
                        outage.gateway_url + "/api/events",
                        data=body,
                        headers={"Content-Type": self.headers.get("Content-Type", "")},
                        timeout=10,
                    )
                    status, answer = forwarded.status_code, forwarded.content
                outage.posts.append((time.monotonic(), status, body))
                self.send_response(status)
                self._cors()
                if status == 503:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def outage(gateway_url: str) -> Iterator[Outage]:
    front = Outage(gateway_url)
    yield front
    front.close()


@pytest.fixture
def outage_site(gateway_url: str, project_key: str, outage: Outage) -> Iterator[Site]:
    tag = snippet_tag(f"{gateway_url}/apex.js", project_key, api=f"{outage.url}/api/events")
    pages = {
        "/one": page("One", '<a id="next" href="/two">two</a>', tag),
        "/two": page("Two", "<h1>two</h1>", tag),
    }
    with serve_site(pages) as site:
        yield site


def test_every_event_arrives_once_after_a_503_outage(
    tab: Page, outage_site: Site, outage: Outage, events: EventsTable
) -> None:
    tab.goto(outage_site.url("/one"))
    tab.wait_for_function("window.apex && window.apex.loaded === true")
    for n in range(3):
        tab.evaluate("n => apex.track('during_outage', {n})", n)
    time.sleep(1.5)  # some 503s and retries
    assert any(status == 503 for _, status, _ in outage.posts)
    navigated = time.monotonic()
    tab.click("#next")  # navigate while the queue holds everything
    tab.wait_for_url("**/two")
    tab.wait_for_function("window.apex && window.apex.loaded === true")
    tab.evaluate("apex.track('after_navigation')")
    queued = len(tab.evaluate(QUEUED))
    assert queued >= 6  # 2 pageviews, 3 events, the click on the link, the one just tracked
    time.sleep(1)
    outage.down = False
    recovered = time.monotonic()

    stored = events.wait_for(
        lambda rows: (
            sum(e.type == "during_outage" for e in rows) >= 3
            and sum(e.type == "pageview" for e in rows) >= 2
            and any(e.type == "after_navigation" for e in rows)
        ),
        "every event after the outage",
        timeout=30,
    )
    took = time.monotonic() - recovered
    time.sleep(1.5)  # anything sent twice would have arrived by now
    stored = events.all()
    assert sorted(e.data.get("n") for e in stored if e.type == "during_outage") == [0, 1, 2]
    assert sum(e.type == "pageview" for e in stored) == 2
    assert sum(e.type == "after_navigation" for e in stored) == 1
    assert sum(e.type == "click" for e in stored) == 1  # the link to /two
    assert len({e.event_id for e in stored}) == len(stored) == 7
    assert took < 20
    # Retry-After honoured: on the first page no body was tried again within a second of its
    # 503 (leaving a page sends the queue at once, with sendBeacon, and the next page too).
    last_503: dict[bytes, float] = {}
    for at, status, body in outage.posts:
        if at >= navigated:
            break
        if body in last_503:
            assert at - last_503[body] >= 0.95, "retried before Retry-After"
        if status == 503:
            last_503[body] = at
        else:
            last_503.pop(body, None)
    assert tab.evaluate(QUEUED) == []


def test_tabs_queueing_at_once_lose_nothing(
    tab: Page, outage_site: Site, outage: Outage, events: EventsTable
) -> None:
    # Two tabs of one site during an outage, each adding to its queue after the other did, both
    # closed before it ends: one shared queue would keep only the last tab's writes.
    other = tab.context.new_page()
    for page_, path in ((tab, "/one"), (other, "/two")):
        page_.goto(outage_site.url(path))
        page_.wait_for_function("window.apex && window.apex.loaded === true")
    tab.evaluate("apex.track('first_tab')")
    other.evaluate("apex.track('second_tab')")
    tab.evaluate("apex.track('first_tab_again')")
    time.sleep(0.5)
    assert any(status == 503 for _, status, _ in outage.posts)
    tab.close()
    other.close()
    time.sleep(1)  # their last beacons meet the outage too

    outage.down = False
    later = tab.context.new_page()
    later.goto(outage_site.url("/two"))  # adopts what both tabs left
    wanted = {"first_tab", "second_tab", "first_tab_again"}
    events.wait_for(
        lambda rows: (
            wanted <= {e.type for e in rows} and sum(e.type == "pageview" for e in rows) >= 3
        ),
        "the events of both closed tabs",
        timeout=30,
    )
    time.sleep(1.5)  # anything sent twice would have arrived by now
    stored = events.all()
    assert sorted(e.type for e in stored if e.type in wanted) == sorted(wanted)
    assert sum(e.type == "pageview" for e in stored) == 3
    later.wait_for_function(f"({QUEUED}).length === 0")


def test_a_page_adopts_only_queues_of_its_own_and_skips_what_it_cannot_read(
    tab: Page, outage_site: Site, outage: Outage, events: EventsTable, project_key: str
) -> None:
    outage.down = False
    tab.goto(outage_site.url("/one"))
    tab.wait_for_function("window.apex && window.apex.loaded === true")
    events.wait_count("pageview", 1)
    left = {"type": "left_over", "visitorId": "v", "projectKey": project_key, "url": "/"}
    tab.evaluate(
        """body => {
            localStorage.setItem('apex_queue', "the site's own");
            localStorage.setItem('apex_q:bad', '{not json');
            localStorage.setItem('apex_q:odd', '[5, {"x": 1}, null]');
            localStorage.setItem('apex_q:good', JSON.stringify([body]));
        }""",
        json.dumps({**left, "id": "l" * 32}),
    )
    tab.reload()
    tab.wait_for_function("window.apex && window.apex.loaded === true")
    events.wait_count("left_over", 1)
    assert tab.evaluate("localStorage.getItem('apex_queue')") == "the site's own"
    keys = tab.evaluate("Object.keys(localStorage)")
    assert not {"apex_q:bad", "apex_q:odd", "apex_q:good"} & set(keys)
    tab.evaluate("apex.track('after')")  # the queue still moves
    events.wait_count("after", 1)
