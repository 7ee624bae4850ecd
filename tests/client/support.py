"""What the SDK tests share: an on_error recorder, a spying transport, stored-event counts."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from apex_ingest_sdk import ApexError, Response, UrllibTransport
from sqlalchemy import create_engine, text


def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows ``sql`` selects, as tuples."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def count_rows(database_url: str) -> tuple[int, int]:
    """(stored events, distinct event ids)"""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT count(*), count(DISTINCT event_id) FROM events")
            ).one()
            return int(row[0]), int(row[1])
    finally:
        engine.dispose()


class Errors:
    """An on_error callback that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[ApexError, list[dict[str, Any]]]] = []
        self.lock = threading.Lock()

    def __call__(self, error: ApexError, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.calls.append((error, events))

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, batch in self.calls for e in batch]


class SpyTransport:
    """The default transport, recording the status of every answer."""

    def __init__(self) -> None:
        self.inner = UrllibTransport()
        self.statuses: list[int] = []

    def send(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout: float
    ) -> Response:
        response = self.inner.send(url, body, headers, timeout=timeout)
        self.statuses.append(response.status)
        return response
