"""Fixtures for the browser tests: Debian's Chromium through Playwright, the real service
(`python -m apex_ingest serve`) on a database of the test's own, and a test site on another origin.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    STUB,
    EventsTable,
    Site,
    page,
    serve_site,
    snippet_tag,
)
from tests.conftest import make_project

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI, where the browser tests must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing: bash scripts/ensure-chromium.sh")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile: empty localStorage and cookies."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    yield context
    context.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught errors of the test's pages; the snippet must never throw into a page."""
    return []


@pytest.fixture
def tab(context: BrowserContext, page_errors: list[str]) -> Iterator[Page]:
    new_page = context.new_page()
    new_page.on("pageerror", lambda error: page_errors.append(str(error)))
    yield new_page
    assert page_errors == [], "uncaught errors in the page"


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL as in production (always in CI); SQLite where PostgreSQL is not reachable."""
    try:
        return str(request.getfixturevalue("postgres_url"))
    except pytest.skip.Exception:
        return str(request.getfixturevalue("sqlite_url"))


@pytest.fixture
def gateway_url(database_url: str, project_key: str) -> Iterator[str]:
    """The base URL of the real service (gRPC server and HTTP gateway) on `database_url`.

    Started after the project exists, so no cached "unknown key" can get in the way.
    """
    from tests.service import running_service

    with running_service(database_url) as service:
        yield service.base_url.rstrip("/")


@pytest.fixture
def project_key(database_url: str) -> str:
    return make_project(database_url, "browser tests")


@pytest.fixture
def events(database_url: str) -> Iterator[EventsTable]:
    table = EventsTable(database_url)
    yield table
    table.dispose()


def site_pages(gateway_url: str, key: str) -> dict[str, str]:
    """The test site: every page carries the install line pointing at the gateway."""
    src = f"{gateway_url}/apex.js"
    tag = snippet_tag(src, key)
    form = """
      <form id="signup" name="signup" action="/thanks" method="post">
        <input name="email" type="email">
        <input name="password" type="password">
        <input name="csrf" type="hidden" value="hidden-token-123">
        <input name="card" autocomplete="cc-number">
        <input name="expiry" autocomplete="billing cc-exp">
        <input name="note" data-apex-ignore>
        <fieldset data-apex-ignore><input name="phone"></fieldset>
        <select name="plan"><option>free</option><option>pro</option></select>
        <input name="newsletter" type="checkbox" value="yes">
        <input name="terms" type="checkbox" value="accepted">
        <textarea name="comment"></textarea>
        <button id="send">Sign up</button>
      </form>"""
    return {
        "/": page(
            "Home",
            '<h1>Home</h1><a id="to-about" href="/about">About <b>us</b></a>'
            '<button data-apex-plan="pro" data-apex-price="9">Buy   now</button>'
            '<main><div id="card"><h3>Card title</h3><p>Card text</p></div>'
            "<p>plain text, <span>nothing to track</span></p></main>",
            tag,
        ),
        "/about": page("About", "<h1>About</h1>", tag),
        "/queue": page(
            "Queue",
            "<h1>Queue</h1>",
            STUB
            + "<script>apex('track', 'early',"
            + " {n: 1, s: 'caf\\u00e9 \\u2615', nested: {a: [1, 2.5]}});"
            + "apex('track', 'early_two')</script>"
            + tag,
        ),
        "/spa": page("SPA", "<h1>SPA</h1>", tag),
        "/form": page("Form", form, tag),
        "/thanks": page("Thanks", "<h1>Thanks!</h1>", tag),
        "/unload": page(
            "Unload",
            '<h1>Unload</h1><a id="away" href="/about">away</a>',
            tag + "<script>addEventListener('pagehide', () => apex.track('bye', {n: 3}))</script>",
        ),
        "/noauto": page(
            "No auto",
            f'<a id="next" href="/noauto-2">next</a><button id="b">b</button>{form}',
            snippet_tag(src, key, auto="false"),
        ),
        "/noauto-2": page("No auto 2", "<h1>two</h1>", snippet_tag(src, key, auto="false")),
        "/dnt": page(
            "DNT",
            '<button id="b">b</button>',
            snippet_tag(src, key, respect_dnt=""),
        ),
        "/self-hosted": page(
            "Self-hosted",
            "<h1>self-hosted</h1>",
            snippet_tag("/self-hosted/apex.js", key, api=f"{gateway_url}/api/events"),
        ),
    }


@pytest.fixture
def site(gateway_url: str, project_key: str) -> Iterator[Site]:
    with serve_site(site_pages(gateway_url, project_key)) as running:
        yield running
