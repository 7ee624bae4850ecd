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


def test_granians_master_imports_the_app_before_forking_its_workers() -> None:
    """A worker forked with the app already imported serves, and stops on a signal, at once
    (gateway/serve.py says why; tests/ops/test_supervision.py failed without it)."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.serve; print(' '.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert {"gateway.app", "flask"} <= set(loaded)
