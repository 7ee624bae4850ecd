"""Run the whole service (`python -m apex_ingest serve`) as a subprocess, for end-to-end tests.

with running_service(postgres_url) as service:
    requests.post(f"{service.base_url}/api/events", json=...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass
class Service:
    base_url: str
    grpc_target: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        """Everything the service printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def logged_process(
    argv: list[str], env: dict[str, str], prefix: str = "apex-"
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run argv with its stdout and stderr in a log file; on exit SIGTERM it (killed if it
    takes longer than STOP_TIMEOUT to stop) and remove the log.

    In a session of its own, so a test can signal its whole process group as a terminal would.
    """
    with tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process, log_path
    finally:
        _stop(process)
        log_path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_service(database_url: str, env: dict[str, str] | None = None) -> Iterator[Service]:
    """Start `apex_ingest serve` on two free ports; yield once GET /healthz answers 200.

    On exit: SIGTERM, and wait for the process to drain and stop (killed if it takes longer
    than STOP_TIMEOUT).
    """
    environment = service_environment(database_url, env)
    argv = [sys.executable, "-m", "apex_ingest", "serve"]
    with logged_process(argv, environment, prefix="apex-service-") as (process, log_path):
        service = Service(
            base_url=f"http://127.0.0.1:{environment['APEX_HTTP_PORT']}",
            grpc_target=f"127.0.0.1:{environment['APEX_GRPC_PORT']}",
            process=process,
            log_path=log_path,
        )
        _wait_healthy(service)
        yield service


def service_environment(database_url: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of `apex_ingest serve` on two free loopback ports (APEX_HTTP_PORT and
    APEX_GRPC_PORT), with `env` over it."""
    environment = {
        **os.environ,
        "APEX_DATABASE_URL": database_url,
        "APEX_HOST": "127.0.0.1",
        # A test may choose the HTTP port (e.g. to match a tag printed beforehand).
        "APEX_HTTP_PORT": str(free_port()),
        "APEX_GRPC_PORT": str(free_port()),
        "APEX_HTTP_WORKERS": "2",
        "APEX_SHUTDOWN_DRAIN": "0.2",  # tests stop services often; the drain has its own test
        **(env or {}),
    }
    # The service must find its own target from the ports, not from the caller's environment.
    if env is None or "APEX_GRPC_TARGET" not in env:
        environment.pop("APEX_GRPC_TARGET", None)
    return environment


def _wait_healthy(service: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"the service exited with {service.process.returncode} before it was healthy:\n"
                + service.output()
            )
        try:
            response = requests.get(f"{service.base_url}/healthz", timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        except requests.RequestException as error:
            last = str(error)
        time.sleep(0.2)
    raise RuntimeError(
        f"the service was not healthy after {START_TIMEOUT:.0f} s (last: {last}):\n"
        + service.output()
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until predicate() is true (an exception counts as not yet), or None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - start
        time.sleep(interval)
    return None
