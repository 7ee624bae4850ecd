"""gateway/granian_hooks.py relies on granian internals: these fail loudly when granian changes."""

from __future__ import annotations

import inspect
import signal
from importlib.metadata import version

import granian
import granian._signals as granian_signals
from granian._granian import WorkerSignal
from granian.server.common import AbstractServer
from granian.server.mp import MPServer, WorkerProcess


def test_granian_is_a_tested_minor() -> None:
    major, minor = (int(part) for part in version("granian").split(".")[:2])
    assert (major, minor) in {(2, 5), (2, 6), (2, 7), (2, 8)}, (
        "granian changed: check gateway/granian_hooks.py against it, then widen this and the "
        "cap in pyproject.toml"
    )


def test_the_server_is_the_multiprocess_one() -> None:
    # On a free-threaded build it would be MTServer, whose workers the hook never reaches.
    assert granian.Granian is MPServer


def test_the_wsgi_worker_makes_its_stop_event_through_set_sync_signals() -> None:
    source = inspect.getsource(MPServer._spawn_wsgi_worker)
    # Imported inside the worker function: the module attribute we replace is what runs.
    assert "from granian._signals import set_sync_signals" in source
    assert "shutdown_event = set_sync_signals()" in source
    assert "serve(scheduler, loop, shutdown_event)" in source
    assert not inspect.signature(granian_signals.set_sync_signals).parameters


def test_the_app_is_imported_before_the_worker_serves() -> None:
    # Importing gateway.wsgi installs the hook and blocks the stop signals: it must happen first.
    source = inspect.getsource(WorkerProcess.wrap_target)
    assert source.index("callback_loader()") < source.index("return target(")


def test_set_sync_signals_returns_the_workers_stop_event() -> None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = granian_signals.set_sync_signals()  # type: ignore[no-untyped-call]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert isinstance(stop, WorkerSignal)
    assert callable(stop.set)


def test_the_master_sets_its_flag_before_it_interrupts() -> None:
    source = inspect.getsource(AbstractServer.signal_handler_interrupt)
    assert source.index("self.interrupt_signal = True") < source.index(
        "self.main_loop_interrupt.set()"
    )
    # Looked up on the instance at startup: our wrapper must be in place before serve().
    assert "set_main_signals(self.signal_handler_interrupt" in inspect.getsource(
        AbstractServer.startup
    )
