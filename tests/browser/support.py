"""Helpers for the browser tests: a test site on its own origin, and reading the events table."""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import Engine, create_engine, text

APEX_JS = Path(__file__).resolve().parents[2] / "gateway" / "static" / "apex.js"

#: The queue stub a site puts before the tag so that calls made before apex.js loads are kept.
STUB = "<script>window.apex=window.apex||function(){(apex.q=apex.q||[]).push(arguments)}</script>"

#: Chromium as Debian installs it; Playwright's own browser builds cannot be downloaded here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: How long an event may take to reach the database before a test gives up.
EVENT_TIMEOUT = 10.0


@dataclass
class Event:
    """One row of the events table."""

    type: str
    event_id: str
    visitor_id: str | None
    user_id: str | None
    url: str
    referrer: str | None
    data: Any
    user_agent: str | None

    def __repr__(self) -> str:  # short, for assertion messages
        return f"<{self.type} {self.url} ref={self.referrer!r} data={self.data!r}>"


class EventsTable:
    """Reads the events table; waits (bounded) for the rows a test expects."""

    def __init__(self, database_url: str) -> None:
        self.engine: Engine = create_engine(database_url)

    def all(self) -> list[Event]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT type, event_id, visitor_id, user_id, url, referrer, data, user_agent"
                    " FROM events ORDER BY occurred_at, id"
                )
            ).all()
        events = []
        for row in rows:
            data = row.data
            if isinstance(data, str | bytes):  # SQLite keeps the JSON text; psycopg parses JSONB
                data = json.loads(data)
            events.append(
                Event(
                    type=row.type,
                    event_id=row.event_id,
                    visitor_id=row.visitor_id,
                    user_id=row.user_id,
                    url=row.url,
                    referrer=row.referrer,
                    data=data,
                    user_agent=row.user_agent,
                )
            )
        return events

    def of_type(self, event_type: str) -> list[Event]:
        return [event for event in self.all() if event.type == event_type]

    def wait_for(
        self, done: Callable[[list[Event]], bool], what: str, timeout: float = EVENT_TIMEOUT
    ) -> list[Event]:
        """All events, once `done(events)` holds; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.all()
            if done(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; have {events}"
                )
            time.sleep(0.1)

    def wait_count(self, event_type: str, count: int) -> list[Event]:
        """The events of `event_type`, once there are at least `count` of them."""
        self.wait_for(
            lambda events: sum(e.type == event_type for e in events) >= count,
            f"{count} {event_type} event(s)",
        )
        return self.of_type(event_type)

    def dispose(self) -> None:
        self.engine.dispose()


@dataclass
class Site:
    """A website on an origin of its own, whose pages carry the snippet tag."""

    base_url: str
    pages: dict[str, str]
    #: (path, decoded form fields) of every POST the site received.
    posts: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path


def snippet_tag(src: str, project_key: str, **attrs: str) -> str:
    """The install line, with extra data-* attributes (respect_dnt -> data-respect-dnt)."""
    extra = "".join(
        f' data-{name.replace("_", "-")}="{html.escape(value)}"' for name, value in attrs.items()
    )
    return (
        f'<script async src="{html.escape(src)}"'
        f' data-project-key="{html.escape(project_key)}"{extra}></script>'
    )


def page(title: str, body: str, head: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>{head}</head>"
        f"<body>{body}</body></html>"
    )


@contextmanager
def serve_site(pages: dict[str, str]) -> Iterator[Site]:
    """Serve `pages` (path -> HTML) on 127.0.0.1 and a free port, in a thread.

    GET and POST both answer with the page at the path (query ignored); POST bodies are recorded.
    ``/self-hosted/apex.js`` serves a copy of the snippet, as a site hosting it itself would.
    """
    site = Site(base_url="", pages=pages)
    snippet = APEX_JS.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/self-hosted/apex.js":
                body, content_type = snippet, "application/javascript; charset=utf-8"
            elif path in site.pages:
                body, content_type = site.pages[path].encode(), "text/html; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            fields = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
            site.posts.append((self.path, fields))
            self._answer()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    site.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-site", daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
