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
from types import FrameType
from typing import Any

from flask import Flask, Response

log = logging.getLogger(__name__)

#: Seconds a worker keeps serving after it is told to stop.
DEFAULT_DRAIN_SECONDS = 2.0

_draining = threading.Event()


def draining() -> bool:
    return _draining.is_set()


def drain_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    raw = environ.get("APEX_SHUTDOWN_DRAIN", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_DRAIN_SECONDS
    except ValueError:
        raise ValueError(f"APEX_SHUTDOWN_DRAIN must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= 300:
        raise ValueError(f"APEX_SHUTDOWN_DRAIN must be between 0 and 300 seconds, got {raw!r}")
    return value


def install_in_granian_worker(seconds: float) -> None:
    """Make this granian worker drain for `seconds` before its server stops.

    Must run while the app is imported, which granian does before it installs the worker's
    signal handlers: ours replace its handlers and delay its stop event.
    """
    import granian._signals as granian_signals

    set_sync_signals = granian_signals.set_sync_signals

    def set_draining_signals() -> Any:
        stop = set_sync_signals()  # type: ignore[no-untyped-call]

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if _draining.is_set():
                return  # the master relays the signal the worker already got from the group
            _draining.set()
            log.info(
                "received %s: draining for %.1f s, then stopping",
                signal.Signals(signum).name,
                seconds,
            )
            timer = threading.Timer(seconds, stop.set)
            timer.daemon = True
            timer.start()

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, on_signal)
        return stop

    granian_signals.set_sync_signals = set_draining_signals


def stop_when_orphaned(interval: float = 1.0) -> None:
    """Stop this worker (drain, then exit) once granian's master process is gone.

    A master killed with SIGKILL cannot stop its workers, and granian's workers do not notice
    on their own: they would keep the port and serve with no supervisor.
    """
    parent = os.getppid()

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
