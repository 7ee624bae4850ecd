"""The only module that touches granian's private API (granian is capped in pyproject.toml).

granian has no public option for either need (checked against 2.8):

- `on_worker_signals`: a worker must keep serving for APEX_SHUTDOWN_DRAIN seconds after a stop
  signal before granian closes its listener (gateway/shutdown.py says why). granian's workers
  build their stop Event in `granian._signals.set_sync_signals()`; we wrap that function.
- `ignore_repeated_interrupts`: granian's master handler sets a threading.Event; a second
  signal arriving while the first handler holds that Event's lock deadlocked the master.

tests/gateway/test_granian_hooks.py fails loudly when granian changes either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def on_worker_signals(start: Callable[[Any], None]) -> None:
    """Call `start(stop_event)` in each granian worker once it has made its stop Event.

    The worker stops when that Event is set; `start` decides when (it must return at once).
    """
    import granian._signals as granian_signals

    set_sync_signals = granian_signals.set_sync_signals

    def set_signals_then_start() -> Any:
        stop = set_sync_signals()  # type: ignore[no-untyped-call]
        start(stop)
        return stop

    granian_signals.set_sync_signals = set_signals_then_start


def ignore_repeated_interrupts(server: Any) -> None:
    """Once the master is interrupted, further signals are no-ops (seen with `timeout -s INT`,
    which signals the process and then its group)."""
    interrupt = server.signal_handler_interrupt

    def interrupt_once(*args: Any, **kwargs: Any) -> None:
        if not server.interrupt_signal:
            interrupt(*args, **kwargs)

    server.signal_handler_interrupt = interrupt_once
