"""Run the gateway under granian, a production WSGI server (never Flask's development server)."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from granian import Granian
from granian.constants import Interfaces
from granian.http import HTTP1Settings

# The app's modules are imported here, in granian's master, before it forks the workers: a
# worker then serves (and handles a stop signal) within milliseconds of the fork. Imported in
# each worker instead, a worker killed or signalled during its ~1 s import under load stopped
# late or not at all (tests/ops/test_supervision.py failed twice), to save ~15 MB of summed
# RSS that is the same memory counted twice (summed PSS unchanged).
import gateway.app  # noqa: F401
from apex_ingest.common.logs import granian_log_config
from apex_ingest.common.settings import GatewaySettings, Internal, load
from gateway.granian_hooks import ignore_repeated_interrupts
from gateway.shared_windows import create_table

#: Pending connections the kernel queues per listening socket before refusing more.
BACKLOG = 2048
#: A client must send its request headers within this time: a connection that trickles bytes
#: (slowloris) is dropped instead of holding a worker thread.
HEADER_READ_TIMEOUT_MS = 10_000
#: On shutdown, a worker gets this long to finish in-flight requests before it is killed.
WORKER_KILL_TIMEOUT_S = 30


def run_gateway(host: str, port: int, workers: int | None = None) -> None:
    """Serve ``gateway.wsgi:app`` on host:port until SIGINT/SIGTERM; blocks.

    ``workers`` processes (default: one per CPU core). Each worker imports the app itself and
    opens its own gRPC channel on first use, so nothing gRPC crosses a fork. With in-memory rate
    limits, the workers count in one table (gateway/shared_windows.py), removed at exit.
    """
    settings = load(GatewaySettings)
    Internal.set(Internal.GATEWAY_MASTER_PID, str(os.getpid()))  # granian's master: this one
    if not Internal.get(Internal.RATE_LIMIT_TABLE):
        descriptor, path = tempfile.mkstemp(prefix="apex-ratelimit-")
        os.close(descriptor)
        create_table(path)
        atexit.register(Path(path).unlink, missing_ok=True)
        Internal.set(Internal.RATE_LIMIT_TABLE, path)  # the workers inherit it
    server = Granian(
        "gateway.wsgi:app",
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers or os.cpu_count() or 1,
        # A request holds its thread while its body arrives, so many threads (granian's default,
        # 512 here) keep clients that trickle bodies from starving the rest
        # (tests/reliability/test_slow_clients.py fails with 8). Behind a proxy that buffers
        # bodies, 8 gave the same throughput and half the p99 (less GIL contention).
        blocking_threads=settings.http_threads,
        backlog=BACKLOG,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_READ_TIMEOUT_MS),
        workers_kill_timeout=WORKER_KILL_TIMEOUT_S,
        respawn_failed_workers=True,  # a crashed worker is replaced, the gateway stays up
        log_access=False,
        log_dictconfig=granian_log_config(),
    )
    ignore_repeated_interrupts(server)
    server.serve()
