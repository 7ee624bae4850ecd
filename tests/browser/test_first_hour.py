"""Issue 16 in Chromium: the tag `apex-ingest demo` (what `make run` prints) works as printed on
a page of another origin, and secrets in query strings never leave the browser (nor reach the
events table)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import EventsTable, page, serve_site, snippet_tag
from tests.service import free_port, running_service

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request

pytestmark = pytest.mark.browser

TAG = re.compile(r'^\s*(<script async src="[^"]+" data-project-key="[^"]+"></script>)$', re.M)


def test_the_tag_apex_ingest_demo_prints_works_as_printed(
    tab: Page, database_url: str, events: EventsTable
) -> None:
    port = free_port()
    env = {**os.environ, "APEX_DATABASE_URL": database_url, "APEX_HTTP_PORT": str(port)}
    env["APEX_HOST"] = "127.0.0.1"
    printed = subprocess.run(
        [sys.executable, "-m", "apex_ingest", "demo"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    match = TAG.search(printed)
    assert match, printed
    tag = match[1]
    assert f'src="http://127.0.0.1:{port}/apex.js"' in tag  # http: what the gateway speaks
    with (
        running_service(database_url, env={"APEX_HTTP_PORT": str(port)}),
        serve_site({"/": page("Demo", "<h1>demo</h1>", tag)}) as site,
    ):
        tab.goto(site.url("/"))
        (view,) = events.wait_count("pageview", 1)
        assert view.url == site.url("/")


@pytest.fixture
def beacons(tab: Page) -> list[dict[str, object]]:
    """The bodies apex.js sent, as the browser sent them (before the server saw them)."""
    sent: list[dict[str, object]] = []

    def seen(request: Request) -> None:
        if request.url.endswith("/api/events") and request.method == "POST" and request.post_data:
            sent.append(json.loads(request.post_data))

    tab.on("request", seen)
    return sent


@pytest.fixture
def gateway(database_url: str, project_key: str) -> Iterator[str]:
    with running_service(database_url) as service:
        yield service.base_url


def test_a_get_form_with_a_password_reaches_no_one(
    tab: Page, gateway: str, project_key: str, events: EventsTable, beacons: list[dict[str, object]]
) -> None:
    form = (
        '<form action="/welcome" method="get"><input name="email" value="ann@example.com">'
        '<input name="password" type="password" value="hunter2"><button id="go">Log in</button>'
        "</form>"
    )
    tag = snippet_tag(f"{gateway}/apex.js", project_key)
    with serve_site(
        {"/login": page("Login", form, tag), "/welcome": page("Welcome", "<h1>hi</h1>", tag)}
    ) as site:
        tab.goto(site.url("/login"))
        tab.wait_for_function("window.apex && window.apex.loaded === true")
        tab.click("#go")
        tab.wait_for_url(re.compile(r"/welcome\?"))
        views = events.wait_count("pageview", 2)
        expected = site.url("/welcome?email=ann%40example.com&password=[redacted]")
        # Playwright hands its request events over only while the test calls it: the database
        # saw the welcome pageview, so its request was made; let the events in.
        for _ in range(40):
            if any(body.get("url") == expected for body in beacons):
                break
            tab.wait_for_timeout(50)
    assert [view.url for view in views] == [site.url("/login"), expected]
    assert "hunter2" not in json.dumps(beacons)  # apex.js redacted it, not only the server
    assert any(body.get("url") == expected for body in beacons), [b.get("url") for b in beacons]


def test_a_sites_own_names_are_redacted_in_the_browser(
    tab: Page, gateway: str, project_key: str, events: EventsTable, beacons: list[dict[str, object]]
) -> None:
    tag = snippet_tag(f"{gateway}/apex.js", project_key, redact="Email, coupon")
    with serve_site({"/": page("Home", "<h1>home</h1>", tag)}) as site:
        tab.goto(site.url("/?email=ann%40example.com&coupon=X1&plan=pro#access_token=abc"))
        (view,) = events.wait_count("pageview", 1)
    expected = site.url("/?email=[redacted]&coupon=[redacted]&plan=pro#access_token=[redacted]")
    assert [body.get("url") for body in beacons] == [expected]
    assert view.url == expected
