"""Graceful shutdown of a gateway worker: drain first, then stop accepting.

Granian stops a worker's listener the moment the worker gets SIGTERM or SIGINT. Connections
the kernel had already queued for that worker are then reset, and under load that cut
requests sent just before the signal. Instead, a worker that is told to stop keeps serving
for `APEX_SHUTDOWN_DRAIN` seconds while `/healthz` answers 503 (a load balancer takes it out
of rotation) and every answer carries `Connection: close` (keep-alive clients reconnect
elsewhere); only then does granian close the listener and finish what is in flight.

Every signal starts the same drain: the master relays SIGTERM to its workers, and a Ctrl-C
or a `kill` of the process group reaches them directly as well. A worker that does not stop
is killed by granian after its `workers_kill_timeout`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response

from apex_ingest.common.settings import Internal
from gateway import granian_hooks

log = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_draining = threading.Event()


_on_drain: list[Callable[[], None]] = []


def draining() -> bool:
    return _draining.is_set()


def on_drain(callback: Callable[[], None]) -> None:
    """Call `callback` once this worker starts draining: for what would otherwise hold the
    worker past its drain (a long-lived response, like the debugger's feed)."""
    _on_drain.append(callback)


def start_draining() -> None:
    """Mark this worker as draining and run the on_drain callbacks (their failures logged)."""
    _draining.set()
    for callback in list(_on_drain):
        try:
            callback()
        except Exception:
            log.exception("a drain callback failed")


def install_in_granian_worker(seconds: float) -> None:
    """Make this granian worker drain for `seconds` before its server stops.

    Must run while the app is imported: before granian starts the worker's threads and
    installs its signal handlers.

    SIGINT and SIGTERM are blocked here, so every thread started from now on (granian's
    runtime threads included) inherits the block, and one thread takes them with sigwait().
    With handlers instead, the kernel may deliver the signal to a runtime thread: Python then
    only flags it for the main thread, which sits blocked in granian's wait and never ran the
    handler, and the worker was killed 30 s later (seen, with Ctrl-C).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    def start_draining_thread(stop: Any) -> None:
        threading.Thread(
            target=_drain_on_signal, args=(stop, seconds), name="drain-on-signal", daemon=True
        ).start()

    granian_hooks.on_worker_signals(start_draining_thread)


def _drain_on_signal(stop: Any, seconds: float) -> None:
    # Later signals (the master relays the one the group got) stay pending: already draining.
    signum = signal.sigwait(_STOP_SIGNALS)
    start_draining()
    log.info(
        "received %s: draining for %.1f s, then stopping", signal.Signals(signum).name, seconds
    )
    time.sleep(seconds)
    stop.set()


def stop_when_orphaned(interval: float = 1.0) -> None:
    """Stop this worker (drain, then exit) once granian's master process is gone.

    A master killed with SIGKILL cannot stop its workers, and granian's workers do not notice
    on their own: they would keep the port and serve with no supervisor. The master's pid comes
    from gateway/serve.py (Internal.GATEWAY_MASTER_PID), not from getppid() here: a worker
    still importing the app when the master died would otherwise take its new parent (init,
    a subreaper) for the master and never stop.
    """
    master = Internal.get(Internal.GATEWAY_MASTER_PID)
    parent = int(master) if master.isdigit() else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the gateway's master process is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def install(app: Flask) -> None:
    @app.after_request
    def close_while_draining(response: Response) -> Response:
        if _draining.is_set():
            response.headers["Connection"] = "close"
        return response
