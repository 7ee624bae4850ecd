"""Run the gateway under granian, a production WSGI server (never Flask's development server)."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Any

from granian import Granian
from granian.constants import Interfaces
from granian.http import HTTP1Settings

from apex_ingest.logs import granian_log_config
from gateway.config import positive_int_env
from gateway.shared_windows import create_table

SHARED_FILE_ENV = "APEX_RATE_LIMIT_SHARED_FILE"

#: Pending connections the kernel queues per listening socket before refusing more.
BACKLOG = 2048
#: A client must send its request headers within this time: a connection that trickles bytes
#: (slowloris) is dropped instead of holding a worker thread.
HEADER_READ_TIMEOUT_MS = 10_000
#: On shutdown, a worker gets this long to finish in-flight requests before it is killed.
WORKER_KILL_TIMEOUT_S = 30


def threads_per_worker() -> int | None:
    """APEX_HTTP_THREADS, else granian's default (half its backpressure: 512 here).

    A request holds its thread while its body arrives, so many threads are what keeps clients
    that trickle bodies from starving the rest (tests/reliability/test_slow_clients.py fails
    with 8). Behind a proxy that buffers request bodies, 8 threads gave the same throughput and
    half the p99 latency (fewer threads contending for the GIL).
    """
    return positive_int_env("APEX_HTTP_THREADS")


def run_gateway(host: str, port: int, workers: int | None = None) -> None:
    """Serve ``gateway.wsgi:app`` on host:port until SIGINT/SIGTERM; blocks.

    ``workers`` processes (default: one per CPU core). Each worker imports the app itself and
    opens its own gRPC channel on first use, so nothing gRPC crosses a fork. With in-memory rate
    limits, the workers count in one table (gateway/shared_windows.py), removed at exit.
    """
    if not os.environ.get(SHARED_FILE_ENV):
        descriptor, path = tempfile.mkstemp(prefix="apex-ratelimit-")
        os.close(descriptor)
        create_table(path)
        atexit.register(Path(path).unlink, missing_ok=True)
        os.environ[SHARED_FILE_ENV] = path  # the workers inherit it
    server = Granian(
        "gateway.wsgi:app",
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers or os.cpu_count() or 1,
        blocking_threads=threads_per_worker(),
        backlog=BACKLOG,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS),
        workers_kill_timeout=WORKER_KILL_TIMEOUT_S,
        respawn_failed_workers=True,  # a crashed worker is replaced, the gateway stays up
        log_access=False,
        log_dictconfig=granian_log_config(),
    )
    ignore_repeated_interrupts(server)
    server.serve()


def ignore_repeated_interrupts(server: Any) -> None:
    """granian's master handler sets a threading.Event: a second signal arriving while the first
    handler holds that Event's lock deadlocked the master for good (seen with `timeout -s INT`,
    which signals the process and then its group). Once interrupted, further signals are no-ops.
    """
    interrupt = server.signal_handler_interrupt

    def interrupt_once(*args: Any, **kwargs: Any) -> None:
        if not server.interrupt_signal:
            interrupt(*args, **kwargs)

    server.signal_handler_interrupt = interrupt_once
