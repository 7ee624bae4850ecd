"""Multiprocess metric values that many threads can update cheaply (the one module that touches
prometheus-client's value classes).

In multiprocess mode every metric update of prometheus-client writes the process's file, under
one lock for the whole process held across two Python calls (its fork check and the write). The
gateway's and the gRPC server's many threads update a few metrics per request each, so they
queue on that lock: a thread that loses the GIL while holding it stalls every other one
(16 threads updating one counter: ~6 µs of CPU per update instead of ~0.8 µs alone; with
metrics off entirely the service did 5 % more snippet requests, with this module 0-2 %:
bench/README.md). Here an update
only changes the value in memory, under a lock of the value's own with no Python call inside,
and a flusher thread hands what changed to prometheus-client's own value every FLUSH_SECONDS
(an increment as an increment, a gauge's set as a set), which writes the file; a scrape
flushes its own process first (apex_ingest.common.metrics.registry), so another process's
samples are at most that old. A write that fails is kept for the next flush.

The flusher starts with a process's first update. It is not a daemon thread (whatever thread
made that update): when the interpreter or a multiprocessing child, such as a granian worker,
exits, it wakes, writes what is left and ends; an atexit hook writes what atexit handlers
update after it. A forked child keeps none of its parent's pending updates, starts its own
flusher, and prometheus-client's value moves to the child's own file, as without this module.
prometheus-client's lock is only ever taken with this module's flush lock held, and a fork
waits for that lock, so no child inherits it held. A process killed outright loses at most its
last FLUSH_SECONDS of updates.

It relies on `prometheus_client.values.ValueClass`, the class every metric child instantiates
(the multiprocess one when PROMETHEUS_MULTIPROC_DIR is set at import), and on that class's
`get()`, `inc(amount)` and `set(value, timestamp)`: tests/ops/test_metric_values.py fails
loudly if they change.
"""

from __future__ import annotations

import atexit
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
#: Held while prometheus-client's values are used (they share one lock of theirs), and by fork.
_flush_lock = threading.Lock()
#: Guards _all and the start of the flusher.
_registry_lock = threading.Lock()
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
    """A metric value whose updates are kept in memory until the flusher hands them on."""

    _multiprocess = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _flush_lock:
            self._file = _file_value_class(*args, **kwargs)
            self._value: float = self._file.get()
        self._lock = threading.Lock()
        #: Since the last write: the value set (None: none), and what was added after it.
        self._set_to: float | None = None
        self._added = 0.0
        self._timestamp = 0.0
        self._changed = False
        with _registry_lock:
            _all.add(self)

    def inc(self, amount: float) -> None:
        with self._lock:
            self._value += amount
            self._added += amount
            if self._changed:
                return
            self._changed = True
        _changed.append(self)
        if _flusher is None:
            _start_flusher()

    def set(self, value: float, timestamp: float | None = None) -> None:
        with self._lock:
            self._value = self._set_to = value
            self._added = 0.0
            self._timestamp = timestamp or 0.0
            if self._changed:
                return
            self._changed = True
        _changed.append(self)
        if _flusher is None:
            _start_flusher()

    def get(self) -> float:
        """This process's value as it has been updated (a scrape reads the files instead)."""
        return self._value

    def set_exemplar(self, exemplar: object) -> None:
        """Exemplars are not kept in multiprocess mode (as in prometheus-client)."""

    def get_exemplar(self) -> None:
        return None

    def _write(self) -> None:
        """Hand the updates since the last write on (the caller holds _flush_lock)."""
        with self._lock:
            self._changed = False
            set_to, added, timestamp = self._set_to, self._added, self._timestamp
            self._set_to, self._added = None, 0.0
        try:
            if set_to is not None:
                self._file.set(set_to + added, timestamp)
            elif added:
                self._file.inc(added)
        except BaseException:
            self._keep(set_to, added)
            raise

    def _keep(self, set_to: float | None, added: float) -> None:
        """Put back updates whose write failed, for the next flush."""
        with self._lock:
            if self._set_to is None:  # else a newer set has replaced them
                self._set_to = set_to
                self._added += added
            if self._changed:
                return
            self._changed = True
        _changed.appendleft(self)

    def _forget(self) -> None:
        # In a forked child: the parent's pending updates are the parent's to write.
        self._lock = threading.Lock()
        self._set_to, self._added, self._changed = None, 0.0, False


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
    with _registry_lock:
        if _flusher is not None:
            return
        # Signals are for the main thread: one delivered to the flusher would wait for the main
        # thread to run its handler, and a granian worker's main thread never does
        # (gateway/shutdown.py). The new thread inherits the mask it is started with.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            flusher = threading.Thread(target=_flush_until_exit, name="metrics-flush", daemon=False)
            flusher.start()
        except RuntimeError:  # the interpreter is shutting down: the atexit hook writes
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _flusher = flusher


def _flush_until_exit() -> None:
    main = threading.main_thread()
    failing = False
    while main.is_alive():
        main.join(FLUSH_SECONDS)
        failing = not _flush_logged(failing)


def _flush_logged(failing: bool) -> bool:
    """flush(); False (logged once in a row of failures) if a write failed, e.g. a full disk:
    metrics must never take the process down."""
    try:
        flush()
    except Exception:
        if not failing:
            log.exception("could not write metrics; trying again every %s s", FLUSH_SECONDS)
        return False
    return True


def _after_fork_in_child() -> None:
    global _flusher, _flush_lock, _registry_lock
    _flush_lock, _registry_lock = threading.Lock(), threading.Lock()
    _changed.clear()
    for value in _all:
        value._forget()
    _flusher = None  # the first update starts this process's own


os.register_at_fork(
    before=lambda: _flush_lock.acquire(),
    after_in_parent=lambda: _flush_lock.release(),
    after_in_child=_after_fork_in_child,
)
atexit.register(_flush_logged, False)
