"""The queue behind ``Apex`` and the daemon thread that sends it.

Events arrive already serialised (``put``), each carrying its own ``userId``; the sender thread
cuts them into gzip-compressed batches within the request limits, whatever their users, and
delivers every batch or hands it to ``on_error``: retries with backoff and ``Retry-After``, a
``400`` that blames some events splits them out, a ``413`` halves the batch. It also owns the
process life cycle: a forked child starts with an empty queue, and every consumer is closed at
interpreter exit (and at the end of a ``multiprocessing`` child, which skips ``atexit``).
"""

from __future__ import annotations

import atexit
import gzip
import http.client
import json
import logging
import os
import random
import re
import sys
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any, Final

from apex_ingest_sdk.errors import ApexError, ErrorCallback, error_from_response
from apex_ingest_sdk.transport import NotAGateway, Transport

__all__ = ["Consumer"]

logger = logging.getLogger("apex_ingest_sdk")

USER_AGENT: Final = "apex-ingest-sdk-python/0.1.0"

_EVENT_PATH = re.compile(r"^events\[(\d+)\]")
# A full queue under sustained overload would otherwise log one line per dropped event.
_DROP_LOG_INTERVAL = 10.0
#: Answers that mean the URL is not an ingest endpoint at all: retrying cannot help.
_WRONG_ENDPOINT = frozenset({404, 405})


class _Batch:
    __slots__ = ("events", "head")

    def __init__(self, head: bytes, events: list[bytes]) -> None:
        self.head = head
        self.events = events

    def body(self) -> bytes:
        return self.head + b",".join(self.events) + b"]}"


def dumps(value: Any) -> bytes:
    """Compact JSON; ``allow_nan=False``: NaN is not JSON and would sink a whole batch."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def with_sent_at(body: bytes) -> bytes:
    """``body`` (a JSON object) with ``"sentAt"``: now, by this machine's clock, in RFC 3339."""
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return b'{"sentAt":"' + stamp.encode() + b'",' + body[1:]


#: What ``with_sent_at`` adds to a body: always the same length (a millisecond UTC stamp).
_SENT_AT_BYTES: Final = len(with_sent_at(b"{}")) - len(b"{}")


_NOT_A_GATEWAY = (
    "this is not an Apex Ingest gateway; host must be the gateway's base URL, scheme://host[:port]"
)


def _is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class Consumer:
    """Queue and sender of one ``Apex`` client (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        project_key: str,
        transport: Transport,
        *,
        max_batch: int,
        max_queue: int,
        flush_interval: float,
        timeout: float,
        max_retries: int,
        on_error: ErrorCallback | None,
        max_body_bytes: int,
        backoff_base: float,
        backoff_max: float,
        shutdown_timeout: float | None,
        compress: bool,
        partial: bool = False,
    ) -> None:
        self.url = url
        self.partial = partial
        self.transport = transport
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.flush_interval = flush_interval
        self.timeout = timeout
        self.max_retries = max_retries
        self.on_error = on_error
        self.max_body_bytes = max_body_bytes
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.shutdown_timeout = shutdown_timeout
        self.compress = compress
        # One head for every batch: each event carries its own userId (which overrides a
        # batch's), so the events of all users share batches; one batch per user would send a
        # request per user and run into the per-key rate limit.
        head = b'{"projectKey":' + dumps(project_key)
        if partial:
            head += b',"partial":true'
        self._head = head + b',"events":['
        # sentAt is added as each attempt leaves: count it now, or a batch filled up to the
        # limit would be refused (413) and then sent again in halves.
        self._empty_size = len(self._head) + len(b"]}") + _SENT_AT_BYTES
        self._closed = False
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._drops_unlogged = 0
        self._reset_state()
        _instances.add(self)

    def _reset_state(self) -> None:
        """Fresh queue, locks and (not yet started) sender: at construction and in a forked child.

        A child must not touch the parent's locks (another parent thread may have held them at
        fork time) and must not resend the parent's queue (the parent still owns those events).
        """
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._abort = threading.Event()
        # Full chunks of events, ready to leave; then the chunk being filled, and its body size.
        self._chunks: list[list[bytes]] = []
        self._current: list[bytes] = []
        self._current_size = self._empty_size
        self._pending = 0
        self._deadline: float | None = None
        self._busy = False
        # A "drain" sends everything queued when it starts; flush() waits for the first drain
        # that starts after it was called.
        self._drains_started = 0
        self._drains_done = 0
        self._flush_target = 0
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- caller side

    @property
    def pending(self) -> int:
        return self._pending

    def put(self, encoded: bytes) -> ApexError | None:
        """Queue one serialised event; the error when it was refused (closed, queue full)."""
        with self._lock:
            if self._closed:
                return ApexError("the client is closed", code="closed")
            if self._pending >= self.max_queue:
                return ApexError(
                    f"the queue is full ({self.max_queue} events); dropped the newest event",
                    code="queue_full",
                )
            self._append(encoded)
            return None

    def _append(self, encoded: bytes) -> None:
        added = len(encoded) + (1 if self._current else 0)
        if self._current and self._current_size + added > self.max_body_bytes:
            self._close_chunk()
            added = len(encoded)
        self._current.append(encoded)
        self._current_size += added
        if len(self._current) >= self.max_batch:
            self._close_chunk()
        self._pending += 1
        self._ensure_sender()
        if self._deadline is None:
            self._deadline = time.monotonic() + self.flush_interval
            self._cond.notify()

    def _close_chunk(self) -> None:
        self._chunks.append(self._current)
        self._current = []
        self._current_size = self._empty_size
        self._cond.notify()

    def _ensure_sender(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="apex-ingest-sender", daemon=True
            )
            self._thread.start()
            _hook_multiprocessing_exit()

    def flush(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is self._thread:
            return False
        with self._cond:
            if self._pending == 0 and not self._busy:
                return True
            self._ensure_sender()
            target = self._drains_started + 1
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._drains_done >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if not thread.is_alive():
            return True
        self._abort.set()
        # Still bounded: an in-flight request ends within `timeout`, then nothing is retried.
        thread.join(self.timeout + 1.0)
        return False

    # ----------------------------------------------------------------- sender thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    full = (
                        self._closed
                        or self._flush_target > self._drains_started
                        or (self._deadline is not None and now >= self._deadline)
                    )
                    if full or self._chunks:
                        break
                    self._cond.wait(None if self._deadline is None else self._deadline - now)
                drain = 0
                if full:
                    self._drains_started += 1
                    drain = self._drains_started
                batches = self._take(full)
                self._busy = True
            # _deliver never raises, so the bookkeeping below always runs and flush() wakes up.
            for batch in batches:
                self._deliver(batch)
            with self._cond:
                self._busy = False
                if drain:
                    self._drains_done = drain
                self._cond.notify_all()
                if self._closed and self._pending == 0:
                    return

    def _take(self, full: bool) -> list[_Batch]:
        """Take the events to send now: all of them, or only the chunks that are already full."""
        chunks, self._chunks = self._chunks, []
        if full and self._current:
            chunks.append(self._current)
            self._current = []
            self._current_size = self._empty_size
        self._pending -= sum(len(chunk) for chunk in chunks)
        if self._pending == 0:
            self._deadline = None
        return [_Batch(self._head, chunk) for chunk in chunks]

    def _deliver(self, batch: _Batch) -> None:
        try:
            self._send(batch)
        except Exception as exc:  # the sender must survive anything, and lose nothing silently
            logger.exception("apex_ingest_sdk: unexpected error while sending a batch")
            self.report(ApexError(repr(exc), code="internal_error"), _decode(batch))

    def _send(self, batch: _Batch) -> None:
        """Send one batch, retrying what can succeed later; report what cannot."""
        work = [batch]
        while work:
            batch = work.pop()
            error = self._post_with_retries(batch)
            if error is None:
                continue
            if isinstance(error, _Rejected):
                # A partial batch: the others are stored; these were not, and never will be.
                self.report(_renumber(error, error.indexes), _decode(batch, sorted(error.indexes)))
                continue
            if error.status == 413 and len(batch.events) > 1:
                # The server's limit is lower than ours: halve until it fits.
                half = len(batch.events) // 2
                work.append(_Batch(batch.head, batch.events[half:]))
                work.append(_Batch(batch.head, batch.events[:half]))
                continue
            bad = _invalid_events(error, batch) if error.status == 400 else None
            if bad:
                # One invalid event would otherwise sink the up to 499 valid ones with it.
                self.report(_renumber(error, bad), _decode(batch, sorted(bad)))
                rest = [e for i, e in enumerate(batch.events) if i not in bad]
                if rest:
                    work.append(_Batch(batch.head, rest))
                continue
            self.report(error, _decode(batch))

    def _post_with_retries(self, batch: _Batch) -> ApexError | None:
        raw = batch.body()
        attempt = 0
        while True:
            if self._abort.is_set():
                return ApexError("close() timed out before delivery", code="shutdown")
            # sentAt is stamped on each attempt, as it leaves: the server measures this
            # machine's clock skew with it (a stale one would shift the events by the wait).
            body = with_sent_at(raw)
            payload = gzip.compress(body, compresslevel=6) if self.compress else body
            error = self._post(payload)
            if error is None:
                return None
            if error.code == "not_a_gateway" or (
                error.status is not None and not _is_retryable(error.status)
            ):
                return error
            if attempt >= self.max_retries:
                return error
            delay = random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))
            if error.retry_after is not None:
                delay = max(delay, min(error.retry_after, self.backoff_max))
            attempt += 1
            self._abort.wait(delay)

    def _post(self, payload: bytes) -> ApexError | None:
        """One POST through the transport: None when accepted, else why not."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        if self.compress:
            headers["Content-Encoding"] = "gzip"
        try:
            response = self.transport.send(self.url, payload, headers, timeout=self.timeout)
        except NotAGateway as exc:
            return ApexError(f"{self.url}: {exc}: {_NOT_A_GATEWAY}", code="not_a_gateway")
        except (OSError, http.client.HTTPException) as exc:
            return ApexError(f"{self.url}: {exc}", code="network_error")
        if 200 <= response.status < 300:
            return _rejected(response.body, response.status) if self.partial else None
        error = error_from_response(response.status, response.header("Retry-After"), response.body)
        if response.status in _WRONG_ENDPOINT:
            # Not the ingest endpoint (a wrong host, port or path prefix): fail at once and say so.
            error.message = (
                f"POST {self.url} answered {response.status} ({error.message}): {_NOT_A_GATEWAY}"
            )
            error.args = (error.message,)
        return error

    def report(self, error: ApexError, events: list[dict[str, Any]]) -> None:
        """Hand undelivered events to ``on_error``, or log them without a callback."""
        if self.on_error is not None:
            try:
                self.on_error(error, events)
            except Exception:
                logger.exception("apex_ingest_sdk: the on_error callback raised")
            return
        if error.code == "queue_full":
            now = time.monotonic()
            with self._log_lock:
                self._drops_unlogged += len(events)
                if now - self._last_drop_log < _DROP_LOG_INTERVAL:
                    return
                count, self._drops_unlogged, self._last_drop_log = self._drops_unlogged, 0, now
            logger.warning("apex_ingest_sdk: %d event(s) dropped: %s", count, error)
            return
        logger.warning("apex_ingest_sdk: %d event(s) not delivered: %s", len(events), error)


class _Rejected(ApexError):
    """The events of a partial batch that the server did not store (the others are)."""

    def __init__(self, indexes: set[int], violations: list[tuple[str, str]], status: int) -> None:
        super().__init__(
            f"{len(indexes)} event(s) of a partial batch rejected (the others were stored)",
            code="rejected",
            status=status,
            field_violations=violations,
        )
        self.indexes = indexes


def _rejected(body: bytes, status: int) -> _Rejected | None:
    """The rejected events a partial batch's answer lists, or None."""
    try:
        answer = json.loads(body)
        listed = answer.get("rejected") or [] if isinstance(answer, dict) else []
        indexes = {int(item["index"]) for item in listed}
        violations = [
            (str(d["field"]), str(d["description"])) for item in listed for d in item["details"]
        ]
    except (ValueError, TypeError, KeyError):
        return None  # stored all the same; an answer we cannot read has nothing to add
    return _Rejected(indexes, violations, status) if indexes else None


def _decode(batch: _Batch, indexes: list[int] | None = None) -> list[dict[str, Any]]:
    chosen = batch.events if indexes is None else [batch.events[i] for i in indexes]
    return [json.loads(e) for e in chosen]


def _invalid_events(error: ApexError, batch: _Batch) -> set[int] | None:
    """Indexes of the events the 400 blames, if it blames only events of this batch."""
    if not error.field_violations:
        return None
    bad: set[int] = set()
    for field, _ in error.field_violations:
        match = _EVENT_PATH.match(field)
        if match is None or int(match.group(1)) >= len(batch.events):
            return None
        bad.add(int(match.group(1)))
    return bad


def _renumber(error: ApexError, bad: set[int]) -> ApexError:
    """Point field paths at the events handed to on_error instead of the request's events."""
    position = {index: n for n, index in enumerate(sorted(bad))}

    def rename(field: str) -> str:
        match = _EVENT_PATH.match(field)
        assert match is not None  # _invalid_events accepted only such paths
        return f"events[{position[int(match.group(1))]}]{field[match.end() :]}"

    return ApexError(
        error.message,
        code=error.code,
        status=error.status,
        field_violations=[(rename(f), d) for f, d in error.field_violations],
        retry_after=error.retry_after,
    )


# Weak, so that neither atexit nor the fork hook keeps a discarded client alive.
_instances: weakref.WeakSet[Consumer] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for consumer in list(_instances):
        consumer.close(consumer.shutdown_timeout)


def _reset_all_in_child() -> None:
    for consumer in list(_instances):
        consumer._reset_state()


_exit_hook_pid = 0


def _hook_multiprocessing_exit() -> None:
    """Also close at the exit of a multiprocessing child, which ends in os._exit and so skips
    atexit: without this, events tracked in a Process target or Pool worker would be lost.

    Registered when a sender starts, i.e. inside the child's own code: multiprocessing clears
    the finalizers a child inherits or registers before its target runs.
    """
    global _exit_hook_pid
    if _exit_hook_pid == os.getpid():
        return
    mp = sys.modules.get("multiprocessing")
    if mp is None or mp.parent_process() is None:
        return
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _close_all_at_exit, exitpriority=100)
    _exit_hook_pid = os.getpid()


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_reset_all_in_child)
