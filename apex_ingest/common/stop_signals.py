"""Waiting for SIGTERM/SIGINT with a signal handler that takes no lock.

Python runs a handler in the main thread between two bytecodes, possibly while that thread is
inside threading code that holds a lock. `threading.Event.set()` in a handler then deadlocks
the process: seen with two signals back to back (`timeout -s INT` signals the process and its
group), the second handler waiting for the lock the first one held. So the handler only
records the signal, and the main thread polls.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType


class StopSignals:
    """Records SIGTERM and SIGINT from now on."""

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []
        signal.signal(signal.SIGTERM, self._record)
        signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum))  # list.append takes no lock

    def wait(self, until: Callable[[], bool] = lambda: False, interval: float = 0.2) -> str:
        """Block until a stop signal arrives (its name) or `until()` is true ("")."""
        while not self.received:
            if until():
                return ""
            time.sleep(interval)
        return self.received[0].name
