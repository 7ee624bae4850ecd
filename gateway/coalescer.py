"""Concurrent HTTP requests of one gateway worker, sent together in one IngestMany call.

Each request thread queues its IngestEventsRequest and waits for its own result. A sender
thread takes whatever is queued (up to MAX_REQUESTS requests and the server's receive limit in
bytes; a single bigger request goes alone), makes one IngestMany call, and hands each waiter
its result. A call leaves as soon as a sender is free: there is no fixed wait, so on a quiet
gateway a lone request is sent at once, and under load the requests that arrive during one
call make up the next. `APEX_GRPC_CALLS_IN_FLIGHT` senders (default 1) work from one queue.

- Linger: the view announces each request as it enters and when it is answered (announce(),
  Arrival.leave()). A call about to leave while other requests are in the view (being read
  and checked, or just answered: under load their clients' next requests follow within a
  round trip) waits up to APEX_COALESCE_LINGER_MS for as many more. Each IngestMany call costs
  both processes CPU of its own (gRPC's C core, the server's per-call work), so under load
  fewer, larger calls leave more CPU for requests; a lone request never waits.

- Deadlines: each request waits at most until its own deadline (APEX_GRPC_TIMEOUT), then
  answers 504; one whose deadline passes while still queued is dropped, never sent.
- Retries: a whole call that fails with UNAVAILABLE is retried by gRPC (the channel's retry
  policy). A request whose own result is UNAVAILABLE (storage down) is queued again after a
  short backoff, up to MAX_ATTEMPTS sends in all, within its deadline: the gateway stamped its
  event ids before the first send, so the server stores each event once whatever happens.
- A server older than IngestMany answers UNIMPLEMENTED: the worker then calls IngestEvents once
  per request (as before coalescing) and tries IngestMany again FALLBACK_SECONDS later.
- Fork: nothing is made at import; the queue and its threads belong to the process that first
  queued a request (granian imports the app, then forks its workers).
- Shutdown: drain() (called at exit) waits until what is queued has been answered.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence

import grpc
from flask import Flask, current_app
from google.rpc import code_pb2

from apex_ingest.v1 import ingest_pb2
from gateway.config import get_settings
from gateway.grpc_client import IngestClient
from gateway.observability import COALESCED_REQUESTS

log = logging.getLogger(__name__)

#: Requests in one IngestMany call at most (the server takes up to 1000).
MAX_REQUESTS = 256
#: Room left under the server's receive limit for the IngestManyRequest's own framing.
BYTES_MARGIN = 64 * 1024
#: Sends of one request at most when its result is UNAVAILABLE (as gRPC's retry policy).
MAX_ATTEMPTS = 3
#: Backoff before the first re-send of an UNAVAILABLE request; doubled each time, capped.
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 1.0
#: After an UNIMPLEMENTED answer, IngestEvents per request for this long, then IngestMany again.
FALLBACK_SECONDS = 60.0
#: How long drain() waits at most for queued requests at exit.
DRAIN_SECONDS = 10.0


class ResultError(grpc.RpcError):  # type: ignore[misc]
    """One request's refusal inside an IngestMany answer, shaped like a failed call.

    gateway.grpc_errors.to_api_error reads code(), details() and (through
    grpc_status.rpc_status.from_call) the rich status in the trailing metadata: the
    RequestStatus bytes parse as google.rpc.Status, so the HTTP answer is what the same
    refusal of an IngestEvents call gives.
    """

    def __init__(self, code: grpc.StatusCode, message: str, status_bytes: bytes = b"") -> None:
        super().__init__(message)
        self._code = code
        self._message = message
        self._status_bytes = status_bytes

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if not self._status_bytes:
            return ()
        return (("grpc-status-details-bin", self._status_bytes),)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _result_error(status: ingest_pb2.RequestStatus) -> ResultError:
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return ResultError(code, status.message, status.SerializeToString())


class _Fallback(Exception):
    """The server has no IngestMany: the waiter calls IngestEvents itself."""


_FALLBACK = _Fallback()


class _Item:
    __slots__ = ("attempts", "deadline", "done", "outcome", "request", "sent_at", "size", "state")

    def __init__(self, request: ingest_pb2.IngestEventsRequest, deadline: float) -> None:
        self.request = request
        self.deadline = deadline
        self.size = request.ByteSize()
        self.attempts = 0
        self.sent_at = 0.0
        # Held until the outcome is in: a bare lock is the cheapest thing to wait on (an Event
        # is a Condition around one, with a lock made per wait).
        self.done = threading.Lock()
        self.done.acquire()
        self.outcome: int | BaseException | None = None
        #: "queued", "sent", "dropped" (its waiter gave up while it was queued), "done".
        self.state = "queued"


class Coalescer:
    """The per-process queue in front of IngestMany (see the module's docstring)."""

    def __init__(
        self,
        client: IngestClient,
        max_bytes: int,
        senders: int = 1,
        max_requests: int = MAX_REQUESTS,
        linger: float = 0.0,
    ) -> None:
        self.client = client
        self.max_bytes = max(1, max_bytes - BYTES_MARGIN)
        self.max_requests = max_requests
        self.senders = senders
        self.linger = linger
        #: Requests inside the view (announced and not yet answered), with a linger.
        self._present = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        #: (when, tiebreak, item): requests waiting out their backoff before a re-send.
        self._later: list[tuple[float, int, _Item]] = []
        self._tiebreak = itertools.count()
        self._busy = 0
        self._pid: int | None = None
        self._fallback_until = 0.0
        self._closed = False

    # --- the request thread's side

    def announce(self) -> Arrival:
        """Say that a request has entered the view; Arrival.leave() when it is answered."""
        arrival = Arrival(self)
        if self.linger > 0:
            with self._lock:
                self._present += 1
            arrival.present = True
        return arrival

    def ingest(self, request: ingest_pb2.IngestEventsRequest) -> int:
        """Send `request` (with others) and return its `received`; raise grpc.RpcError."""
        now = time.monotonic()
        if now < self._fallback_until:
            return self.client.ingest(request)
        item = _Item(request, now + self.client.timeout)
        with self._lock:
            self._start_senders()
            self._queue.append(item)
            self._ready.notify()
        if not item.done.acquire(timeout=max(0.0, item.deadline - time.monotonic())):
            with self._lock:
                if item.state == "queued":
                    # Never sent: a sender skips it; nothing of it can be stored.
                    item.state = "dropped"
            if item.state != "done":
                raise ResultError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        outcome = item.outcome
        if isinstance(outcome, _Fallback):
            return self.client.ingest(request)
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def drain(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Wait until nothing is queued or being sent (at most `timeout`); True if so."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._later or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(min(left, 0.05))
            return True

    # --- the sender threads

    def _start_senders(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        # A queue inherited through fork() has no sender threads: start them in this process.
        # (_present is not reset: a request of this process may have announced itself already.)
        self._queue.clear()
        self._later.clear()
        self._busy = 0
        self._pid = pid
        for number in range(self.senders):
            threading.Thread(
                target=self._send_forever, name=f"coalescer-{number}", daemon=True
            ).start()

    def _send_forever(self) -> None:
        while True:
            batch = self._take()
            try:
                self._send(batch)
            except BaseException as error:  # a bug: answer every waiter, keep the thread
                log.exception("coalesced call failed")
                for item in batch:
                    self._finish(item, error)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._ready.notify_all()

    def _take(self) -> list[_Item]:
        """Wait for queued requests; take as many as one call may carry."""
        with self._lock:
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._queue.append(heapq.heappop(self._later)[2])
                batch: list[_Item] = []
                size, full = self._fill(batch, 0, now)
                if batch:
                    self._busy += 1
                    others = self._present - len(batch)
                    if self.linger > 0 and others > 0 and not full:
                        self._gather(batch, size, now + self.linger, len(batch) + others)
                    return batch
                wait = self._later[0][0] - now if self._later else None
                self._ready.wait(wait)

    def _gather(self, batch: list[_Item], size: int, until: float, wanted: int) -> None:
        """Wait (the lock held by the caller, released while waiting) until `until` at most
        for `batch` to reach `wanted` requests, adding queued ones as they come. `wanted`
        counts the requests present in the view besides the batch's own: each is being read
        and checked, or has just been answered, and under load its client's next request
        follows within a round trip. Fewer, larger calls then cost less CPU; on a quiet
        gateway no other request is present and nothing waits."""
        while len(batch) < wanted:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._ready.wait(left)
            size, full = self._fill(batch, size, time.monotonic())
            if full:
                return

    def _fill(self, batch: list[_Item], size: int, now: float) -> tuple[int, bool]:
        """Move queued requests into `batch` (`size` bytes so far) while one call may carry
        them, skipping those whose waiter gave up or is about to (never sent); the batch's
        size, and whether it is full (by count, or the next request would pass the byte bound;
        a single bigger request goes alone)."""
        while self._queue:
            if len(batch) >= self.max_requests:
                return size, True
            item = self._queue[0]
            if item.state == "dropped" or item.deadline <= now:
                self._queue.popleft()
                item.state = "dropped"
                continue
            if batch and size + item.size > self.max_bytes:
                return size, True
            self._queue.popleft()
            item.state = "sent"
            item.sent_at = now
            batch.append(item)
            size += item.size
        return size, len(batch) >= self.max_requests

    def _send(self, batch: Sequence[_Item]) -> None:
        if time.monotonic() < self._fallback_until:
            for item in batch:
                self._finish(item, _FALLBACK)
            return
        COALESCED_REQUESTS.observe(len(batch))
        timeout = max(item.deadline for item in batch) - time.monotonic()
        try:
            results = self.client.ingest_many([item.request for item in batch], timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning(
                    "the ingest server has no IngestMany; calling IngestEvents per request "
                    "for %.0f s",
                    FALLBACK_SECONDS,
                )
                self._fallback_until = time.monotonic() + FALLBACK_SECONDS
                error = _FALLBACK
            for item in batch:
                self._finish(item, error)
            return
        if len(results) != len(batch):
            mismatch = ResultError(grpc.StatusCode.INTERNAL, "results do not match requests")
            for item in batch:
                self._finish(item, mismatch)
            return
        for item, result in zip(batch, results, strict=True):
            code = result.status.code
            if code == code_pb2.OK:
                self._finish(item, int(result.received))
            elif code == code_pb2.UNAVAILABLE and self._again(item):
                continue
            else:
                self._finish(item, _result_error(result.status))

    def _again(self, item: _Item) -> bool:
        """Queue `item` for another send after its backoff, if attempts and deadline allow."""
        item.attempts += 1
        if item.attempts >= MAX_ATTEMPTS:
            return False
        backoff = min(MAX_BACKOFF, INITIAL_BACKOFF * 2 ** (item.attempts - 1))
        now = time.monotonic()
        when = now + backoff
        # Only if another attempt as long as this one still ends in time: a storage that took
        # seconds to fail (a lock held past the statement timeout) answers 503 now, not 504.
        if when + (now - item.sent_at) >= item.deadline:
            return False
        with self._lock:
            item.state = "queued"
            heapq.heappush(self._later, (when, next(self._tiebreak), item))
            self._ready.notify()
        return True

    def _finish(self, item: _Item, outcome: int | BaseException) -> None:
        if item.state == "done":
            return
        item.outcome = outcome
        item.state = "done"
        item.done.release()


class Arrival:
    """A request inside the view, announced to the coalescer (Coalescer.announce)."""

    __slots__ = ("coalescer", "present")

    def __init__(self, coalescer: Coalescer) -> None:
        self.coalescer = coalescer
        self.present = False

    def leave(self) -> None:
        """The request has been answered (whichever way)."""
        if not self.present:
            return
        self.present = False
        with self.coalescer._lock:
            self.coalescer._present -= 1


_EXTENSION_KEY = "apex_gateway.coalescer"
_coalescers: list[Coalescer] = []


def install(app: Flask, client: IngestClient) -> Coalescer:
    settings = get_settings(app)
    coalescer = Coalescer(
        client,
        settings.grpc_max_message_bytes,
        settings.grpc_calls_in_flight,
        linger=settings.coalesce_linger_ms / 1000,
    )
    app.extensions[_EXTENSION_KEY] = coalescer
    _coalescers.append(coalescer)
    return coalescer


def get_coalescer() -> Coalescer:
    coalescer: Coalescer = current_app.extensions[_EXTENSION_KEY]
    return coalescer


@atexit.register
def _drain_all() -> None:
    for coalescer in _coalescers:
        if coalescer._pid == os.getpid():
            coalescer.drain()
