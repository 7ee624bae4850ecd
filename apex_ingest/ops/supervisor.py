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
from collections.abc import Callable

from apex_ingest.common.settings import (
    Internal,
    ServerSettings,
    child_environment,
    reachable_host,
    variable,
)
from apex_ingest.common.stop_signals import StopSignals

log = logging.getLogger(__name__)


#: A child that exits this soon after starting, this many times in a row, cannot start at all
#: (its port taken, its code broken): restarting it forever would only fill the log.
QUICK_EXIT_SECONDS = 10.0
QUICK_EXITS_TO_GIVE_UP = 5


def _stop_this_process() -> None:
    # The caller's own stop-signal handling then stops every child (see serve_all).
    os.kill(os.getpid(), signal.SIGTERM)


class Supervised:
    """One child process, restarted after a second if it exits unexpectedly.

    If it keeps exiting right after it starts, it is given up: `gave_up` is set and `give_up`
    called (by default: SIGTERM to this process, which stops the rest).
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        stop_timeout: float,
        give_up: Callable[[], None] = _stop_this_process,
        restart_delay: float = 1.0,
    ) -> None:
        self._argv = argv
        self._env = env
        self._stop_timeout = stop_timeout
        self._give_up = give_up
        self._restart_delay = restart_delay
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.gave_up = False

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name="supervise", daemon=True).start()

    def begin_stop(self) -> None:
        """Ask the child to drain (SIGTERM, once) without waiting for it."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
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
            self._started_at = time.monotonic()
            self._process = subprocess.Popen(self._argv, env=self._env, start_new_session=True)

    def _watch(self) -> None:
        quick_exits = 0
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            _forget_metrics_of(self._process.pid)
            if self._stopping.is_set():
                return
            name = " ".join(self._argv[-2:])
            quick = time.monotonic() - self._started_at < QUICK_EXIT_SECONDS
            quick_exits = quick_exits + 1 if quick else 0
            if quick_exits >= QUICK_EXITS_TO_GIVE_UP:
                log.error("%s exited with %s at start, %d times in a row", name, code, quick_exits)
                self.gave_up = True
                self._give_up()
                return
            log.error("%s exited with %s; restarting it", name, code)
            time.sleep(self._restart_delay)
            if not self._stopping.is_set():
                self._spawn()


def _forget_metrics_of(pid: int) -> None:
    """A dead child's live gauges (in flight, pool) must leave the multiprocess sums."""
    if Internal.get(Internal.PROMETHEUS_MULTIPROC_DIR):
        from apex_ingest.common.metrics import mark_process_dead

        mark_process_dead(pid)


def start_grpc_processes(
    settings: ServerSettings, processes: int, stopping: Callable[[], bool]
) -> list[Supervised]:
    """Migrate once, then start `processes` single-process gRPC servers on one port (none if
    `stopping()` turned true while migrating)."""
    if settings.migrate_on_start:
        migrate_at_start(stopping)
        if stopping():
            return []
    env = child_environment(
        **{
            variable("migrate_on_start"): "0",
            variable("grpc_processes"): "1",
            # Children live in sessions of their own (see the module docstring), so a SIGKILL
            # of this process would not reach them: they stop by themselves when it is gone.
            Internal.PARENT_PID: str(os.getpid()),
        }
    )
    argv = [sys.executable, "-m", "apex_ingest", "grpc"]
    children = [Supervised(argv, env, settings.shutdown_grace + 5) for _ in range(processes)]
    for child in children:
        child.start()
    return children


#: Seconds before the migration at start is tried again after it failed (the database down),
#: doubled after each failure up to MIGRATION_RETRY_MAX_SECONDS.
MIGRATION_RETRY_SECONDS = 10.0
MIGRATION_RETRY_MAX_SECONDS = 300.0


def migrate_at_start(stopping: Callable[[], bool]) -> None:
    """Apply pending migrations before the servers start. Never fatal: if the database cannot
    be migrated now (it is down), the servers start NOT_SERVING and the migration is tried
    again in the background until it is applied or `stopping()`; health turns SERVING then."""
    if _migrate(stopping) or stopping():
        return
    threading.Thread(
        target=_migrate_until_applied, args=(stopping,), name="migrate", daemon=True
    ).start()


def _migrate_until_applied(stopping: Callable[[], bool]) -> None:
    wait = MIGRATION_RETRY_SECONDS
    while True:
        next_try = time.monotonic() + wait
        while time.monotonic() < next_try:
            if stopping():
                return
            time.sleep(0.2)
        wait = min(2 * wait, MIGRATION_RETRY_MAX_SECONDS)
        if _migrate(stopping, wait):
            return


def _migrate(stopping: Callable[[], bool], next_wait: float = MIGRATION_RETRY_SECONDS) -> bool:
    """`db upgrade` in a process of its own (True: applied): Alembic and SQLAlchemy would
    otherwise stay in this one, and in the gateway workers it forks (~20 MB of resident memory
    in each). A stop signal meanwhile ends it (its transaction rolls back) rather than waiting
    for a database that may never answer."""
    child = subprocess.Popen(
        [sys.executable, "-m", "apex_ingest", "db", "upgrade"],
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = err = ""
    while child.returncode is None:
        try:
            out, err = child.communicate(timeout=0.2)
        except subprocess.TimeoutExpired:
            if stopping():
                child.terminate()
                try:
                    out, err = child.communicate(timeout=5)
                except subprocess.TimeoutExpired:  # a pipe held open elsewhere: do not hang
                    child.kill()
                    child.wait()
    if child.returncode == 0:
        log.info("%s", out.strip())  # in this process's log format
        return True
    if stopping():  # ended by us, or by the Ctrl-C that reached it too: nothing to retry
        log.warning("stopped before the migrations were applied")
        return False
    reason = (err.strip().splitlines() or ["no message"])[-1]
    log.warning(
        "could not apply migrations at start (trying again in %.0f s): %s", next_wait, reason
    )
    return False


def run_grpc_processes(settings: ServerSettings, processes: int) -> None:
    stop = StopSignals()
    children = start_grpc_processes(settings, processes, lambda: bool(stop.received))
    stop.wait()
    _stop_all(children)
    _exit_if_given_up(children)


def serve_all(settings: ServerSettings, gateway_workers: int, grpc_processes: int) -> None:
    from gateway.serve import run_gateway

    # The gateway's default APEX_GRPC_TARGET is this host and APEX_GRPC_PORT.
    host = reachable_host(settings.host)
    # Until granian installs its own handlers: a stop signal (or a child given up, which sends
    # one) while waiting for the gRPC server must stop everything in order, not kill us.
    early = StopSignals()
    stopped = threading.Event()  # for a migration still being retried (granian owns signals)
    children = start_grpc_processes(
        settings, grpc_processes, lambda: bool(early.received) or stopped.is_set()
    )
    try:
        _wait_listening(
            host,
            settings.grpc_port,
            timeout=30.0,
            give_up=lambda: bool(early.received) or any(child.gave_up for child in children),
        )
        if not early.received:
            run_gateway(settings.host, settings.http_port, gateway_workers)
    finally:
        stopped.set()
        _stop_all(children)
    _exit_if_given_up(children)


def _exit_if_given_up(children: list[Supervised]) -> None:
    if any(child.gave_up for child in children):
        raise SystemExit("a gRPC server process could not start; see the log above")


def _stop_all(children: list[Supervised]) -> None:
    for child in children:
        child.begin_stop()  # all drain at once, then wait for each
    for child in children:
        child.stop()


def _wait_listening(
    host: str, port: int, timeout: float, give_up: Callable[[], bool] = lambda: False
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if give_up():
            return
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    log.warning("gRPC server not listening after %.0f s; starting the gateway anyway", timeout)
