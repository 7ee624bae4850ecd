"""The gateway's drain before it stops (gateway/shutdown.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from apex_ingest.common.settings import Internal
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


def test_a_worker_whose_master_died_before_it_watched_stops() -> None:
    """The master's pid comes from gateway/serve.py: a worker that was still importing the app
    when its master was killed must not take its new parent for the master."""
    watcher = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "from gateway.shutdown import stop_when_orphaned\n"
        "stop_when_orphaned(interval=0.05)\n"
        "time.sleep(5)\n"
    )
    environment = {**os.environ, Internal.GATEWAY_MASTER_PID: "999999999"}  # long gone
    ran = subprocess.run([sys.executable, "-c", watcher], env=environment, timeout=20, check=False)
    assert ran.returncode == 7
