"""apex('identify') and apex('reset') in headless Chromium (issue #18): events after identify
carry the user id, a reload keeps it, reset forgets it and starts a new visitor; the server
links the visitor to the user so its earlier anonymous pageview is attributed too."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from tests.browser.support import EventsTable, Site

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

USER = "ada@example.com"  # an email: not a token-like id, kept intact across pages


def loaded(tab: Page) -> None:
    tab.wait_for_function("window.apex && window.apex.loaded === true")


def test_identify_reload_and_reset(tab: Page, site: Site, events: EventsTable) -> None:
    tab.goto(site.url("/about"))
    (anonymous,) = events.wait_count("pageview", 1)
    assert anonymous.user_id is None
    first_visitor = anonymous.visitor_id
    loaded(tab)

    tab.evaluate("user => apex('identify', user, {plan: 'pro'})", USER)
    (identify,) = events.wait_count("identify", 1)
    assert (identify.user_id, identify.visitor_id) == (USER, first_visitor)
    assert identify.data == {"plan": "pro"}
    # Identifying again as the same user without traits sends nothing more.
    tab.evaluate("user => apex.identify(user)", USER)
    tab.evaluate("apex.track('after_identify')")
    (after,) = events.wait_count("after_identify", 1)
    assert (after.user_id, after.visitor_id) == (USER, first_visitor)

    tab.reload()
    reloaded = events.wait_count("pageview", 2)[1]
    assert (reloaded.user_id, reloaded.visitor_id) == (USER, first_visitor)
    loaded(tab)

    tab.evaluate("apex('reset')")
    second_visitor = tab.evaluate("apex.visitorId")
    assert second_visitor and second_visitor != first_visitor
    tab.evaluate("apex.track('after_reset')")
    (after_reset,) = events.wait_count("after_reset", 1)
    assert (after_reset.user_id, after_reset.visitor_id) == (None, second_visitor)

    tab.reload()
    third = events.wait_count("pageview", 3)[2]
    assert (third.user_id, third.visitor_id) == (None, second_visitor)
    time.sleep(0.3)
    assert len(events.of_type("identify")) == 1

    with events.engine.connect() as connection:
        resolved: dict[str, str | None] = dict(
            connection.execute(
                text("SELECT event_id, resolved_user_id FROM events_with_user")
            ).all()
        )
    assert resolved[anonymous.event_id] == USER  # attributed by the link, not rewritten
    assert resolved[after_reset.event_id] is None
