"""The gateway's drain before it stops (gateway/shutdown.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from gateway import shutdown


@pytest.fixture
def draining() -> Iterator[None]:
    shutdown._draining.set()
    yield
    shutdown._draining.clear()


def test_healthz_is_503_while_draining(client: FlaskClient, draining: None) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.get_json() == {"status": "DRAINING"}
    assert answer.headers["Connection"] == "close"


def test_answers_say_connection_close_only_while_draining(client: FlaskClient) -> None:
    assert "Connection" not in client.get("/").headers
    shutdown._draining.set()
    try:
        assert client.get("/").headers["Connection"] == "close"
    finally:
        shutdown._draining.clear()
