"""How `gateway/serve.py` runs granian."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

from granian.server.common import AbstractServer

from gateway.granian_hooks import ignore_repeated_interrupts


def test_a_signal_during_the_masters_interrupt_handler_is_ignored() -> None:
    """granian's master handler sets a threading.Event; a second signal landing while that
    Event's lock is held ran the handler again, which waited for the lock forever (a `serve`
    that never stopped, seen with `timeout -s INT`)."""

    class SignalledDuringSet:
        """The master's Event, with a second signal arriving while set() holds its lock."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.arrived = False

        def set(self) -> None:
            assert self.lock.acquire(timeout=2), "the second handler waited for the first's lock"
            try:
                if not self.arrived:
                    self.arrived = True
                    master.signal_handler_interrupt(signal.SIGINT, None)
            finally:
                self.lock.release()

    master = SimpleNamespace(interrupt_signal=False, main_loop_interrupt=SignalledDuringSet())
    master.signal_handler_interrupt = functools.partial(
        AbstractServer.signal_handler_interrupt,
        master,  # type: ignore[arg-type]  # a stand-in for granian's master
    )
    ignore_repeated_interrupts(master)
    master.signal_handler_interrupt(signal.SIGINT, None)
    assert master.interrupt_signal and master.main_loop_interrupt.arrived


def test_the_process_that_runs_granian_holds_no_app() -> None:
    """`serve`'s supervisor imports gateway.serve to run granian; the app (Flask, gRPC, the
    rate limiter...) is imported by each worker for itself. The supervisor needs none of it,
    and pages it held were counted again in every forked worker's RSS (~15 MB of issue #21's
    summed-RSS budget; the summed PSS is the same either way)."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, gateway.serve; print(' '.join(sorted(sys.modules)))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert not {"flask", "grpc", "gateway.app", "limits", "prometheus_client"} & set(loaded)
