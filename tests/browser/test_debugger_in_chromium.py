"""The live event debugger (/debugger) in real Chromium, against the real service (issue #17):
events sent with plain HTTP appear within 2 s, rejected ones with their reasons; a wrong secret
sees nothing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pytest
import requests

from tests.gateway.test_debugger import secret_for

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = pytest.mark.browser


def connect(tab: Page, gateway_url: str, secret: str) -> None:
    tab.goto(f"{gateway_url}/debugger")
    tab.fill("#secret", secret)
    tab.click("#start")


def send(gateway_url: str, body: Mapping[str, object]) -> int:
    return requests.post(f"{gateway_url}/api/events", json=body, timeout=10).status_code


def test_events_and_rejections_appear_live(
    tab: Page, gateway_url: str, project_key: str, database_url: str
) -> None:
    secret = secret_for(database_url, project_key)
    connect(tab, gateway_url, secret)
    tab.wait_for_selector("#status:has-text('live')")
    assert secret not in tab.url

    sent = time.monotonic()
    ok = {"type": "dbg_signup", "visitorId": "v-dbg", "projectKey": project_key, "url": "/w"}
    assert send(gateway_url, ok) == 200
    tab.wait_for_selector("li.event >> text=dbg_signup", timeout=2000)
    assert time.monotonic() - sent < 2.5

    bad = {"type": "dbg_bad", "visitorId": "v-other", "projectKey": project_key, "url": "nope"}
    assert send(gateway_url, bad) == 400
    rejected = tab.wait_for_selector("li.dead_letter >> text=dbg_bad", timeout=2000)
    assert rejected is not None
    assert "events[0].url" in tab.inner_text("li.dead_letter .reasons")

    # Newest first.
    assert "dbg_bad" in tab.inner_text("#feed li:first-child")
    # Filter by type, then by visitor.
    tab.fill("#filter-type", "dbg_signup")
    assert tab.is_hidden("li.dead_letter") and tab.is_visible("li.event")
    tab.fill("#filter-type", "")
    tab.fill("#filter-visitor", "v-other")
    assert tab.is_hidden("li.event") and tab.is_visible("li.dead_letter")
    tab.fill("#filter-visitor", "")
    # Expandable to JSON.
    tab.click("li.event")
    assert '"visitor_id": "v-dbg"' in tab.inner_text("li.event pre")
    # The key lives in this tab's sessionStorage only: a reload reconnects by itself.
    assert tab.evaluate("sessionStorage.getItem('apex-debugger-secret')") == secret
    assert tab.evaluate("document.cookie") == ""


def test_a_wrong_secret_sees_nothing(
    context: BrowserContext, tab: Page, gateway_url: str, project_key: str
) -> None:
    connect(tab, gateway_url, "sk_live_wrong_guess_1234567890")
    tab.wait_for_selector("#status.error")
    ok = {"type": "dbg_hidden", "visitorId": "v", "projectKey": project_key, "url": "/"}
    assert send(gateway_url, ok) == 200
    time.sleep(2)
    assert tab.query_selector_all("#feed li") == []
    # Nor does a public key.
    other = context.new_page()
    connect(other, gateway_url, project_key)
    other.wait_for_selector("#status.error")
    assert "secret" in other.inner_text("#status")
    assert other.query_selector_all("#feed li") == []
    other.close()
