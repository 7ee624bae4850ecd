"""`apex-ingest serve`: the gRPC server and the HTTP gateway as one unit.

The gRPC server runs as a child process in its own session, so a Ctrl-C aimed at
the terminal reaches the gateway first: the gateway drains, then the gRPC server
drains, and nothing in flight is cut off. A gRPC server that dies is restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

from apex_ingest.config import Settings

log = logging.getLogger(__name__)


class GrpcChild:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="grpc-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()
        self._wait_listening(timeout=30.0)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self._settings.shutdown_grace + 5)
        except subprocess.TimeoutExpired:
            log.warning("gRPC server did not stop in time; killing it")
            process.kill()
            process.wait()

    def _spawn(self) -> None:
        with self._lock:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "apex_ingest", "grpc"], start_new_session=True
            )

    def _watch(self) -> None:
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            if self._stopping.is_set():
                return
            log.error("gRPC server exited with %s; restarting it", code)
            time.sleep(1.0)
            if not self._stopping.is_set():
                self._spawn()

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        host = "127.0.0.1" if self._settings.host in ("0.0.0.0", "::") else self._settings.host
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, self._settings.grpc_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        log.warning("gRPC server not listening after %.0f s; starting the gateway anyway", timeout)


def serve_all(settings: Settings, gateway_workers: int) -> None:
    from gateway.serve import run_gateway

    os.environ.setdefault("APEX_GRPC_TARGET", f"{_local(settings.host)}:{settings.grpc_port}")
    child = GrpcChild(settings)
    child.start()
    try:
        run_gateway(settings.host, settings.http_port, gateway_workers)
    finally:
        child.stop()


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
