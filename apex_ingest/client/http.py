"""Batching HTTP client for customers' backends.

``Apex.track`` only serialises the event and appends it to an in-memory queue; a daemon thread
turns the queue into gzip-compressed batches for ``POST /api/events``. Standard library only, so a
customer's backend installs nothing heavy and the module can be vendored as a single file.
"""

from __future__ import annotations

import atexit
import email.utils
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
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["DEFAULT_HOST", "Apex", "ApexError", "ErrorCallback"]

logger = logging.getLogger("apex_ingest.client")

DEFAULT_HOST: Final = "http://127.0.0.1:8080"
#: The contract's limits for one request: 500 events and 1 MiB of (decompressed) JSON.
MAX_BATCH_EVENTS: Final = 500
MAX_BODY_BYTES: Final = 1024 * 1024
USER_AGENT: Final = "apex-ingest-python/0.1"

_EVENT_PATH = re.compile(r"^events\[(\d+)\]")
# A full queue under sustained overload would otherwise log one line per dropped event.
_DROP_LOG_INTERVAL = 10.0


class ApexError(Exception):
    """Why events were not delivered; handed to ``on_error`` together with those events.

    ``code`` is the server's error code (``"invalid_argument"``, ``"unauthenticated"``, ...) or,
    for failures that never got an answer, one of the client's own: ``"queue_full"``,
    ``"closed"`` (tracked after ``close()``), ``"network_error"``, ``"shutdown"`` (``close()``
    gave up waiting) and ``"internal_error"``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: HTTP status of the final answer; None when no answer was received.
        self.status = status
        #: ``(field, description)`` pairs from the server's error details. Field paths such as
        #: ``events[2].url`` index the ``events`` list handed to ``on_error`` with this error.
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        text = f"{where}{self.code}: {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text

    def __repr__(self) -> str:
        return f"ApexError({self.message!r}, code={self.code!r}, status={self.status!r})"


#: ``on_error(error, events)``: ``events`` are the undelivered events as JSON objects, as they
#: were (or would have been) sent, plus ``"userId"`` when the event had one.
ErrorCallback = Callable[[ApexError, list[dict[str, Any]]], None]


class _Buffer:
    """The queued events of one user_id, already cut into request-sized chunks."""

    __slots__ = ("closed", "current", "current_size", "head", "user_id")

    def __init__(self, user_id: str | None, head: bytes) -> None:
        self.user_id = user_id
        self.head = head
        self.closed: list[list[bytes]] = []
        self.current: list[bytes] = []
        self.current_size = len(head) + 2  # the closing b"]}"


class _Batch:
    __slots__ = ("events", "head", "user_id")

    def __init__(self, user_id: str | None, head: bytes, events: list[bytes]) -> None:
        self.user_id = user_id
        self.head = head
        self.events = events

    def body(self) -> bytes:
        return self.head + b",".join(self.events) + b"]}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would replay a redirected POST as a body-less GET; an ingest endpoint that redirects
    # is misconfigured, and that should surface as an error rather than as lost events.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _dumps(value: Any) -> bytes:
    # allow_nan=False: NaN is not JSON, and the server would reject the whole batch for it.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def format_timestamp(value: datetime | str | float) -> str:
    """RFC 3339 with an explicit offset; naive datetimes and epoch seconds are UTC."""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"timestamp must be a datetime, str or epoch seconds, not {value!r}")
    return datetime.fromtimestamp(value, UTC).isoformat()


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_from_response(status: int, retry_after_header: str | None, body: bytes) -> ApexError:
    retry_after = _parse_retry_after(retry_after_header)
    try:
        payload = json.loads(body)
        error = payload["error"]
        code = str(error.get("code") or f"http_{status}")
        message = str(error.get("message") or "")
        violations = [
            (str(d.get("field", "")), str(d.get("description", "")))
            for d in error.get("details") or []
            if isinstance(d, dict)
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        # Not our server's JSON (a proxy's HTML page, say): keep a readable excerpt.
        code = f"http_{status}"
        message = body[:500].decode("utf-8", "replace").strip()
        violations = []
    return ApexError(
        message or http.client.responses.get(status, "error"),
        code=code,
        status=status,
        field_violations=violations,
        retry_after=retry_after,
    )


def _is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class Apex:
    """Batching, non-blocking client for ``POST /api/events``.

    >>> apex = Apex("pk_live_...", "https://ingest.example.com")
    >>> apex.track("signup", "/welcome", {"plan": "pro"}, user_id="u_42")
    >>> apex.flush()  # optional: close() runs at interpreter exit

    Delivery is at least once on the wire and exactly once in storage: every event is given an id
    when tracked and the server stores a repeated id once, so retries never duplicate. Events that
    cannot be delivered are handed to ``on_error(error, events)``, called on the sender thread
    (or on the caller's thread for ``queue_full`` and ``closed``); without a callback they are
    logged as warnings on the ``apex_ingest.client`` logger.
    """

    def __init__(
        self,
        project_key: str,
        host: str = DEFAULT_HOST,
        *,
        max_batch: int = MAX_BATCH_EVENTS,
        max_queue: int = 10_000,
        flush_interval: float = 2.0,
        timeout: float = 10.0,
        max_retries: int = 6,
        on_error: ErrorCallback | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        shutdown_timeout: float | None = 30.0,
        compress: bool = True,
    ) -> None:
        if not project_key:
            raise ValueError("project_key is required")
        if not 1 <= max_batch <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch must be between 1 and {MAX_BATCH_EVENTS}")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.project_key = project_key
        self.url = host.rstrip("/") + "/api/events"
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
        self._key_json = _dumps(project_key)
        self._opener = urllib.request.build_opener(_NoRedirect())
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
        self._buffers: dict[str | None, _Buffer] = {}
        self._ready: set[str | None] = set()
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

    def track(
        self,
        type: str,
        url: str,
        data: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        timestamp: datetime | str | float | None = None,
        id: str | None = None,
        visitor_id: str | None = None,
    ) -> str:
        """Queue one event and return its id; never waits for the network.

        ``data`` is serialised immediately, so later changes to the caller's dict are not sent,
        and values JSON cannot represent raise ``TypeError``/``ValueError`` here rather than
        failing a whole batch later. ``timestamp`` defaults to now: batches are sent seconds
        later (longer under retries), so the server's receipt time would be wrong.
        """
        if not isinstance(type, str) or not isinstance(url, str):
            raise TypeError("type and url must be strings")
        if data is not None and not isinstance(data, Mapping):
            raise TypeError("data must be a mapping (a JSON object)")
        for name, value in (("user_id", user_id), ("id", id), ("visitor_id", visitor_id)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
        if user_id == "":
            user_id = None  # the server treats "" as no user: batch them with the anonymous ones
        event: dict[str, Any] = {"id": id if id is not None else str(uuid.uuid4())}
        event["type"] = type
        event["url"] = url
        event["timestamp"] = format_timestamp(timestamp if timestamp is not None else time.time())
        if visitor_id is not None:
            event["visitorId"] = visitor_id
        if data is not None:
            event["data"] = dict(data)  # json only encodes real dicts
        encoded = _dumps(event)

        rejected: ApexError | None = None
        with self._lock:
            if self._closed:
                rejected = ApexError("the client is closed", code="closed")
            elif self._pending >= self.max_queue:
                rejected = ApexError(
                    f"the queue is full ({self.max_queue} events); dropped the newest event",
                    code="queue_full",
                )
            else:
                self._append(user_id, encoded)
        if rejected is not None:
            snapshot: dict[str, Any] = json.loads(encoded)
            if user_id is not None:
                snapshot["userId"] = user_id
            self._report(rejected, [snapshot])
        return str(event["id"])

    def _append(self, user_id: str | None, encoded: bytes) -> None:
        buffer = self._buffers.get(user_id)
        if buffer is None:
            head = b'{"projectKey":' + self._key_json
            if user_id is not None:
                head += b',"userId":' + _dumps(user_id)
            buffer = self._buffers[user_id] = _Buffer(user_id, head + b',"events":[')
        added = len(encoded) + (1 if buffer.current else 0)
        if buffer.current and buffer.current_size + added > self.max_body_bytes:
            self._close_chunk(buffer)
            added = len(encoded)
        buffer.current.append(encoded)
        buffer.current_size += added
        if len(buffer.current) >= self.max_batch:
            self._close_chunk(buffer)
        self._pending += 1
        self._ensure_sender()
        if self._deadline is None:
            self._deadline = time.monotonic() + self.flush_interval
            self._cond.notify()

    def _close_chunk(self, buffer: _Buffer) -> None:
        buffer.closed.append(buffer.current)
        buffer.current = []
        buffer.current_size = len(buffer.head) + 2
        self._ready.add(buffer.user_id)
        self._cond.notify()

    def _ensure_sender(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="apex-ingest-sender", daemon=True
            )
            self._thread.start()
            _hook_multiprocessing_exit()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every event tracked before this call is sent or handed to ``on_error``.

        Returns False if ``timeout`` (seconds) passed first, or when called from ``on_error``
        (the sender thread cannot wait for itself).
        """
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
        """Send everything queued, then stop the sender; later ``track`` calls are reported.

        If ``timeout`` passes first, retries are abandoned and what is left is handed to
        ``on_error`` with code ``"shutdown"``; returns False in that case. Runs at interpreter
        exit with ``shutdown_timeout``.
        """
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

    def __enter__(self) -> Apex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Events queued and not yet taken by the sender (in-flight batches not counted)."""
        return self._pending

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
                    if full or self._ready:
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
        batches: list[_Batch] = []
        if full:
            for buffer in self._buffers.values():
                chunks = [*buffer.closed, buffer.current] if buffer.current else buffer.closed
                batches.extend(_Batch(buffer.user_id, buffer.head, c) for c in chunks)
            self._buffers.clear()
            self._pending = 0
        else:
            for user_id in self._ready:
                buffer = self._buffers[user_id]
                for chunk in buffer.closed:
                    batches.append(_Batch(user_id, buffer.head, chunk))
                    self._pending -= len(chunk)
                buffer.closed = []
        self._ready.clear()
        if self._pending == 0:
            self._deadline = None
        return batches

    def _deliver(self, batch: _Batch) -> None:
        try:
            self._send(batch)
        except Exception as exc:  # the sender must survive anything, and lose nothing silently
            logger.exception("apex_ingest: unexpected error while sending a batch")
            self._report(ApexError(repr(exc), code="internal_error"), self._decode(batch))

    def _send(self, batch: _Batch) -> None:
        """Send one batch, retrying what can succeed later; report what cannot."""
        work = [batch]
        while work:
            batch = work.pop()
            error = self._post_with_retries(batch)
            if error is None:
                continue
            if error.status == 413 and len(batch.events) > 1:
                # The server's limit is lower than ours: halve until it fits.
                half = len(batch.events) // 2
                work.append(_Batch(batch.user_id, batch.head, batch.events[half:]))
                work.append(_Batch(batch.user_id, batch.head, batch.events[:half]))
                continue
            bad = self._invalid_events(error, batch) if error.status == 400 else None
            if bad:
                # One invalid event would otherwise sink the up to 499 valid ones with it.
                self._report(_renumber(error, bad), self._decode(batch, sorted(bad)))
                rest = [e for i, e in enumerate(batch.events) if i not in bad]
                if rest:
                    work.append(_Batch(batch.user_id, batch.head, rest))
                continue
            self._report(error, self._decode(batch))

    @staticmethod
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

    def _post_with_retries(self, batch: _Batch) -> ApexError | None:
        raw = batch.body()
        payload = gzip.compress(raw, compresslevel=6) if self.compress else raw
        attempt = 0
        while True:
            if self._abort.is_set():
                return ApexError("close() timed out before delivery", code="shutdown")
            try:
                status, retry_after, body = self._post(payload)
            except (OSError, http.client.HTTPException) as exc:
                error = ApexError(f"{self.url}: {exc}", code="network_error")
            else:
                if 200 <= status < 300:
                    return None
                error = _error_from_response(status, retry_after, body)
                if not _is_retryable(status):
                    return error
            if attempt >= self.max_retries:
                return error
            delay = random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))
            if error.retry_after is not None:
                delay = max(delay, min(error.retry_after, self.backoff_max))
            attempt += 1
            self._abort.wait(delay)

    def _post(self, payload: bytes) -> tuple[int, str | None, bytes]:
        """One POST: the status, the Retry-After header and the body, whatever the status."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        if self.compress:
            headers["Content-Encoding"] = "gzip"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.headers.get("Retry-After"), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers.get("Retry-After"), exc.read()

    @staticmethod
    def _decode(batch: _Batch, indexes: list[int] | None = None) -> list[dict[str, Any]]:
        chosen = batch.events if indexes is None else [batch.events[i] for i in indexes]
        events: list[dict[str, Any]] = [json.loads(e) for e in chosen]
        if batch.user_id is not None:
            for event in events:
                event["userId"] = batch.user_id
        return events

    def _report(self, error: ApexError, events: list[dict[str, Any]]) -> None:
        if self.on_error is not None:
            try:
                self.on_error(error, events)
            except Exception:
                logger.exception("apex_ingest: the on_error callback raised")
            return
        if error.code == "queue_full":
            now = time.monotonic()
            with self._log_lock:
                self._drops_unlogged += len(events)
                if now - self._last_drop_log < _DROP_LOG_INTERVAL:
                    return
                count, self._drops_unlogged, self._last_drop_log = self._drops_unlogged, 0, now
            logger.warning("apex_ingest: %d event(s) dropped: %s", count, error)
            return
        logger.warning("apex_ingest: %d event(s) not delivered: %s", len(events), error)


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
_instances: weakref.WeakSet[Apex] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for client in list(_instances):
        client.close(client.shutdown_timeout)


def _reset_all_in_child() -> None:
    for client in list(_instances):
        client._reset_state()


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
