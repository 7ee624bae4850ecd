"""Process topology: several gRPC server processes, and `apex-ingest serve`.

gRPC servers are separate processes sharing one port through SO_REUSEPORT (the
kernel spreads connections between them): Python threads cannot use a second
core, processes can. They are started as fresh interpreters, never forked from
one that has gRPC state. A child that dies is restarted.

`serve` runs the gRPC processes in a session of their own, so a Ctrl-C aimed at
the terminal reaches the gateway first: the gateway drains, then the gRPC
servers drain, and nothing in flight is cut off.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

from apex_ingest.config import Settings

log = logging.getLogger(__name__)


class Supervised:
    """One child process, restarted after a second if it exits unexpectedly."""

    def __init__(self, argv: list[str], env: dict[str, str], stop_timeout: float) -> None:
        self._argv = argv
        self._env = env
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name="supervise", daemon=True).start()

    def begin_stop(self) -> None:
        """Ask the child to drain (SIGTERM) without waiting for it."""
        self._stopping.set()
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.begin_stop()
        with self._lock:
            process = self._process
        if process is None:
            return
        try:
            process.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", self._argv)
            process.kill()
            process.wait()

    def _spawn(self) -> None:
        with self._lock:
            self._process = subprocess.Popen(self._argv, env=self._env, start_new_session=True)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            _forget_metrics_of(self._process.pid)
            if self._stopping.is_set():
                return
            log.error("%s exited with %s; restarting it", " ".join(self._argv[-2:]), code)
            time.sleep(1.0)
            if not self._stopping.is_set():
                self._spawn()


def _forget_metrics_of(pid: int) -> None:
    """A dead child's live gauges (in flight, pool) must leave the multiprocess sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from apex_ingest.metrics import mark_process_dead

        mark_process_dead(pid)


def start_grpc_processes(settings: Settings, processes: int) -> list[Supervised]:
    """Migrate once, then start `processes` single-process gRPC servers on one port."""
    from apex_ingest.server import migrate_at_start

    migrate_at_start(settings.database_url)
    env = {
        **os.environ,
        "APEX_MIGRATE_ON_START": "0",
        "APEX_GRPC_PROCESSES": "1",
        # Children live in sessions of their own (see the module docstring), so a SIGKILL of
        # this process would not reach them: they stop by themselves when it is gone.
        "APEX_PARENT_PID": str(os.getpid()),
    }
    argv = [sys.executable, "-m", "apex_ingest", "grpc"]
    children = [Supervised(argv, env, settings.shutdown_grace + 5) for _ in range(processes)]
    for child in children:
        child.start()
    return children


def run_grpc_processes(settings: Settings, processes: int) -> None:
    children = start_grpc_processes(settings, processes)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(1.0):
        pass
    _stop_all(children)


def serve_all(settings: Settings, gateway_workers: int, grpc_processes: int) -> None:
    from gateway.serve import run_gateway

    os.environ.setdefault("APEX_GRPC_TARGET", f"{_local(settings.host)}:{settings.grpc_port}")
    children = start_grpc_processes(settings, grpc_processes)
    try:
        _wait_listening(_local(settings.host), settings.grpc_port, timeout=30.0)
        run_gateway(settings.host, settings.http_port, gateway_workers)
    finally:
        _stop_all(children)


def _stop_all(children: list[Supervised]) -> None:
    for child in children:
        child.begin_stop()  # all drain at once, then wait for each
    for child in children:
        child.stop()


def _wait_listening(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    log.warning("gRPC server not listening after %.0f s; starting the gateway anyway", timeout)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
