"""gateway/granian_hooks.py relies on granian internals: these fail loudly when granian changes."""

from __future__ import annotations

import inspect
import signal
from importlib.metadata import version

import granian._signals as granian_signals
import granian.server.mp as granian_mp
from granian.server.common import AbstractServer


def test_granian_is_a_tested_minor() -> None:
    major, minor = (int(part) for part in version("granian").split(".")[:2])
    assert (major, minor) in {(2, 5), (2, 6), (2, 7), (2, 8)}, (
        "granian changed: check gateway/granian_hooks.py against it, then widen this and the "
        "cap in pyproject.toml"
    )


def test_the_wsgi_worker_looks_up_set_sync_signals_when_it_starts() -> None:
    # Imported inside the worker function, so the module attribute we replace is what runs.
    source = inspect.getsource(granian_mp)
    assert "from granian._signals import set_sync_signals" in source
    assert "= set_sync_signals()" in source
    assert not inspect.signature(granian_signals.set_sync_signals).parameters


def test_set_sync_signals_returns_the_workers_stop_event() -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = granian_signals.set_sync_signals()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert callable(stop.set)


def test_the_master_has_the_interrupt_handler_and_flag() -> None:
    assert callable(AbstractServer.signal_handler_interrupt)
    assert "self.interrupt_signal" in inspect.getsource(AbstractServer)
