"""What the SDK tests share: an on_error recorder and a count of the stored events."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import create_engine, text

from apex_ingest.client import ApexError


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
