# ruff: noqa: E501  (the table reads best one case per line)
"""Secrets in query strings are stored as `[redacted]` (issue 16, item 7), on both databases."""

from __future__ import annotations

from typing import Any

import pytest

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import create_project
from apex_ingest.server.redaction import redact_url
from apex_ingest.v1 import ingest_pb2
from tests.conftest import RunningServer
from tests.server.test_grpc_integration import ingest, rows

Event = ingest_pb2.Event

#: (as sent, as stored): the table docs/snippet.md's rule is checked against (apex.js too, in
#: tests/browser/test_snippet_in_chromium.py).
CASES = [
    ("https://shop.example/login?email=a%40b.c&password=hunter2", "https://shop.example/login?email=a%40b.c&password=[redacted]"),
    ("/signup?PassWord=x&Passwd=y&pwd=z&pass=w", "/signup?PassWord=[redacted]&Passwd=[redacted]&pwd=[redacted]&pass=[redacted]"),
    ("/?token=t&access_token=a&refreshToken=r&csrf-token=c", "/?token=[redacted]&access_token=[redacted]&refreshToken=[redacted]&csrf-token=[redacted]"),
    ("/?api_key=1&apikey=2&X-Api-Key=3&client_secret=4&secret=5", "/?api_key=[redacted]&apikey=[redacted]&X-Api-Key=[redacted]&client_secret=[redacted]&secret=[redacted]"),
    ("/?card=4111&cc=4111&cardnumber=1&card_number=2&cvv=3&cvc=4&cc_exp=5", "/?card=[redacted]&cc=[redacted]&cardnumber=[redacted]&card_number=[redacted]&cvv=[redacted]&cvc=[redacted]&cc_exp=[redacted]"),
    ("/?auth=1&x-auth=2&author=jane&spin=1&passage=3&pin=4", "/?auth=[redacted]&x-auth=[redacted]&author=jane&spin=1&passage=3&pin=[redacted]"),
    ("/cb#access_token=abc&token_type=bearer&state=s", "/cb#access_token=[redacted]&token_type=[redacted]&state=s"),
    ("/app#/reset?token=abc&step=2", "/app#/reset?token=[redacted]&step=2"),
    ("/?pass%77ord=x&password=&password&q=token", "/?pass%77ord=[redacted]&password=&password&q=token"),
    ("/path/password=x/page", "/path/password=x/page"),  # a path is not a query
    ("https://example.com/", "https://example.com/"),
]  # fmt: skip


@pytest.mark.parametrize(("sent", "stored"), CASES)
def test_secret_parameters_keep_their_name_and_lose_their_value(sent: str, stored: str) -> None:
    assert redact_url(sent) == stored


def test_a_projects_own_names_match_whole_and_in_any_case() -> None:
    extra = frozenset({"email", "promo"})
    assert (
        redact_url("/?Email=a&emails=b&promo=c", extra)
        == "/?Email=[redacted]&emails=b&promo=[redacted]"
    )


def test_one_projects_names_never_apply_to_another() -> None:
    """Names are judged once per (name, project's names): the cache keeps projects apart."""
    assert redact_url("/?promo=c", frozenset({"promo"})) == "/?promo=[redacted]"
    assert redact_url("/?promo=c") == "/?promo=c"
    assert redact_url("/?promo=c", frozenset({"promo"})) == "/?promo=[redacted]"


def test_a_long_name_is_judged_without_the_cache() -> None:
    name = "x" * 100 + "_password"
    assert redact_url(f"/?{name}=1&q=2") == f"/?{name}=[redacted]&q=2"


def test_the_stored_url_still_fits_its_column() -> None:
    url = "/?" + "a" * 4080 + "&pwd=1"  # 4088 characters; redacted it would be 4097
    assert len(url) <= 4096 and len(redact_url(url)) == 4096


def _project(database_url: str, *redact: str) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            return create_project(session, "redacting", redact_params=redact).key
    finally:
        engine.dispose()


def test_the_server_stores_urls_and_referrers_redacted(stub: Any, server: RunningServer) -> None:
    key = _project(server.database_url, "Email", "coupon")
    sent_url = "https://shop.example/thanks?email=a%40b.c&password=hunter2&coupon=X1&plan=pro"
    referrer = "https://shop.example/login?next=%2F&token=abc"
    long_url = "https://shop.example/?" + "q" * 4060 + "&pwd=1"  # fits as sent, not redacted
    assert len(long_url) <= 4096
    received = ingest(
        stub,
        key,
        Event(id="a", type="pageview", url=sent_url, referrer=referrer, visitor_id="v"),
        Event(id="b", type="pageview", url=long_url, visitor_id="v"),
    )
    assert received == 2
    stored = {row["event_id"]: row for row in rows(server.database_url)}
    assert stored["a"]["url"] == (
        "https://shop.example/thanks?email=[redacted]&password=[redacted]"
        "&coupon=[redacted]&plan=pro"
    )
    assert stored["a"]["referrer"] == "https://shop.example/login?next=%2F&token=[redacted]"
    assert len(stored["b"]["url"]) == 4096 and "pwd=[redac" in stored["b"]["url"]


def test_another_projects_names_are_not_applied(stub: Any, server: RunningServer) -> None:
    _project(server.database_url, "email")
    key = _project(server.database_url)
    assert ingest(stub, key, Event(id="a", type="pageview", url="/?email=a&pwd=b")) == 1
    assert rows(server.database_url)[0]["url"] == "/?email=a&pwd=[redacted]"


def test_projects_create_takes_redact_params(sqlite_url: str) -> None:
    from tests.server.test_cli import run

    key = run(
        sqlite_url, "projects", "create", "Shop", "--redact-param", "Email",
        "--redact-param", "coupon",
    ).stdout.strip()  # fmt: skip
    assert (
        f"{key}\tShop\tactive\torigins=*\tredact=coupon,email"
        in run(sqlite_url, "projects", "list").stdout
    )
    bad = run(sqlite_url, "projects", "create", "X", "--redact-param", "a=b", check=False)
    assert bad.returncode == 2 and "--redact-param" in bad.stderr


def test_a_url_is_judged_again_for_a_project_with_other_names() -> None:
    """URLs are redacted once each (a cache): the project's own names are part of the key."""
    url = "https://shop.example/p?ref=mail&code=1234"
    for _ in range(2):
        assert redact_url(url) == url
        assert (
            redact_url(url, frozenset({"code"}))
            == "https://shop.example/p?ref=mail&code=[redacted]"
        )
