"""Multiprocess metric values that many threads can update cheaply (the one module that touches
prometheus-client's value classes).

In multiprocess mode every metric update of prometheus-client writes the process's file, under
one lock for the whole process held across two Python calls (its fork check and the write). The
gateway's and the gRPC server's many threads update a few metrics per request each, so they
queue on that lock: a thread that loses the GIL while holding it stalls every other one (without
those updates a snippet request costs the service ~5 % less: bench/README.md). Here an update
only changes the value in memory, under a lock of the value's own with no Python call inside,
and a flusher thread writes the values that changed to the file every FLUSH_SECONDS; a scrape
flushes its own process first (apex_ingest.common.metrics.registry), so another process's
samples are at most that old.

The flusher starts with a process's first update and is not a daemon thread: when the
interpreter (or a multiprocessing child, such as a granian worker) exits, it wakes, writes what
is left and ends. A process forked from one that has values starts them from zero in its own
file, as prometheus-client does, with its own flusher. A process killed outright loses at most
its last FLUSH_SECONDS of updates.

It relies on `prometheus_client.values.ValueClass`, the class every metric child instantiates
(the multiprocess one when PROMETHEUS_MULTIPROC_DIR is set at import), and on that class's
`get()`/`set(value, timestamp)`: tests/ops/test_metric_values.py fails loudly if either changes.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import weakref
from typing import Any

from prometheus_client import values

log = logging.getLogger(__name__)

#: How often changed values reach the multiprocess files (and so other processes' scrapes).
FLUSH_SECONDS = 0.1

_file_value_class: Any = None
_changed: collections.deque[DeferredValue] = collections.deque()
_all: weakref.WeakSet[DeferredValue] = weakref.WeakSet()
_all_lock = threading.Lock()
_flush_lock = threading.Lock()
_flusher: threading.Thread | None = None
_ASYNC_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
    signal.SIGALRM,
}


class DeferredValue:
    """A metric value kept in memory and written to the process's file by the flusher."""

    _multiprocess = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._file = _file_value_class(*args, **kwargs)
        self._lock = threading.Lock()
        self._value: float = self._file.get()
        self._timestamp: float = 0.0
        self._changed = False
        with _all_lock:
            _all.add(self)

    def inc(self, amount: float) -> None:
        with self._lock:
            self._value += amount
            if self._changed:
                return
            self._changed = True
        _changed.append(self)
        if _flusher is None:
            _start_flusher()

    def set(self, value: float, timestamp: float | None = None) -> None:
        with self._lock:
            self._value = value
            self._timestamp = timestamp or 0.0
            if self._changed:
                return
            self._changed = True
        _changed.append(self)
        if _flusher is None:
            _start_flusher()

    def get(self) -> float:
        return self._value

    def set_exemplar(self, exemplar: object) -> None:
        """Exemplars are not kept in multiprocess mode (as in prometheus-client)."""

    def get_exemplar(self) -> None:
        return None

    def _write(self) -> None:
        with self._lock:
            self._changed = False
            value, timestamp = self._value, self._timestamp
        self._file.set(value, timestamp)

    def _forget(self) -> None:
        # In a forked child: its file is its own, and starts from zero.
        self._lock = threading.Lock()
        self._value, self._timestamp, self._changed = 0.0, 0.0, False


def install() -> None:
    """Wrap prometheus-client's multiprocess value class (no-op without multiprocess mode).

    Must run before the first metric is created: a metric made earlier keeps writing directly.
    """
    global _file_value_class
    current = values.ValueClass
    if current is DeferredValue or not getattr(current, "_multiprocess", False):
        return
    _file_value_class = current
    values.ValueClass = DeferredValue


def installed() -> bool:
    return values.ValueClass is DeferredValue


def flush() -> None:
    """Write every changed value of this process to its file now."""
    with _flush_lock:  # one writer at a time, so an older value never lands after a newer one
        while _changed:
            _changed.popleft()._write()


def _start_flusher() -> None:
    global _flusher
    with _all_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_until_exit, name="metrics-flush")
            _flusher.start()


def _flush_until_exit() -> None:
    # Signals are for the main thread. One delivered here would wait for the main thread to run
    # its handler, and a granian worker's main thread never does (gateway/shutdown.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
    main = threading.main_thread()
    failing = False
    while main.is_alive():
        main.join(FLUSH_SECONDS)
        try:
            flush()
            failing = False
        except Exception:  # e.g. a full disk: metrics must never take the process down
            if not failing:
                log.exception("could not write metrics; trying again every %s s", FLUSH_SECONDS)
            failing = True


def _after_fork_in_child() -> None:
    global _flusher, _flush_lock, _all_lock
    _flush_lock, _all_lock = threading.Lock(), threading.Lock()
    _changed.clear()
    for value in _all:
        value._forget()
    _flusher = None  # the first update starts this process's own


os.register_at_fork(after_in_child=_after_fork_in_child)
