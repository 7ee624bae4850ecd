"""How `gateway/serve.py` sizes granian from the environment."""

from __future__ import annotations

import functools
import signal
import threading
from types import SimpleNamespace

import pytest
from granian.server.common import AbstractServer

from gateway.serve import ignore_repeated_interrupts, threads_per_worker


def test_threads_default_to_granians(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APEX_HTTP_THREADS", raising=False)
    assert threads_per_worker() is None
    monkeypatch.setenv("APEX_HTTP_THREADS", " ")
    assert threads_per_worker() is None


def test_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", " 8 ")
    assert threads_per_worker() == 8


@pytest.mark.parametrize("raw", ["0", "-4", "eight", "2.5"])
def test_threads_reject_nonsense(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", raw)
    with pytest.raises(ValueError, match="APEX_HTTP_THREADS"):
        threads_per_worker()


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
        AbstractServer.signal_handler_interrupt, master
    )
    ignore_repeated_interrupts(master)
    master.signal_handler_interrupt(signal.SIGINT, None)
    assert master.interrupt_signal and master.main_loop_interrupt.arrived
