"""Stream mode: accepted requests go to a NATS JetStream stream; loaders write the database.

The message format (`FORMAT`, version 1) is a msgpack array (msgspec):

    [1, project_id, published_at, [column, ...], [[value, ...], ...]]

the rows exactly as the database sink would have inserted them (validated, redacted, ids
assigned, whatever later features add to a row: the columns are named in the message, so a new
column travels without a new version), `project_id` once. `published_at` is the server's wall
clock (seconds since the epoch) when it published: the loaders measure the delay from
acknowledgement to row with it. Times are msgpack timestamps (UTC), `data` the event's JSON
text as validated. A reader meeting a version it does not know leaves the message in the
stream (see `decode`); a new version is added beside this one, never in its place.

A message holds whole requests of one project: the accepted requests of one project that one
call carries (an IngestMany call of the gateway holds the concurrent HTTP requests of a worker)
travel as one message, split to stay under GROUP_BYTES and the NATS server's max_payload (a
request bigger than GROUP_BYTES travels alone; one bigger than max_payload fails, as it always
did). A message is stored and loaded all or nothing, so each request stays all-or-nothing;
NATS's and the loaders' work per message (replication, acknowledgements, fetches) is shared by
the requests in it (bench/README.md, stream mode). Loaders commit whole messages in
transactions of bounded rows (apex_ingest/ops/loader.py).

Subjects: `<APEX_STREAM_SUBJECT>.<shard>`, shard = project id % SHARDS, so one project's
requests stay on one subject (in order) and a later split of the stream by subject is possible.
JetStream's message id (`Nats-Msg-Id`) is a hash of the project and the message's sorted event
ids: a retried call inside the stream's duplicate window is stored in the stream once. The real
dedup is the loaders' insert, which skips ids already stored (a request retried alone travels
in another message, and its rows are loaded once).

nats-py is asyncio and the gRPC server is threaded: each server process runs one event loop in a
thread of its own (`StreamSink`), and the request threads hand their publishes to it. Concurrent
publishes share one connection: nats-py writes them out together and JetStream acknowledges
each.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from apex_ingest.server import metrics
from apex_ingest.server.errors import DeadlinePassed, IngestError, StorageUnavailable
from apex_ingest.server.storage import COLUMN_NAMES, Row

log = logging.getLogger(__name__)

FORMAT = "apex-rows"
VERSION = 1
#: Subjects per stream: `<prefix>.0` ... `<prefix>.15`.
SHARDS = 16
#: Header naming the payload's format and version, for readers that are not loaders.
FORMAT_HEADER = "Apex-Format"
#: Bytes of a message's max_payload left for its headers and framing.
HEADROOM = 4096
#: Bytes of a message of several requests at most: a loader holds APEX_LOADER_BATCH messages at
#: once, so one of several requests is kept about as big as one big request (a request
#: bigger than this travels alone, up to the NATS server's max_payload).
GROUP_BYTES = 1024 * 1024


class StreamedRequest(msgspec.Struct, array_like=True, frozen=True):
    """Version 1 of a message: one accepted request's rows, their columns named once."""

    version: int
    project_id: int
    published_at: float
    columns: list[str]
    rows: list[list[Any]]


class UnknownFormat(ValueError):
    """A message this reader cannot decode (another version, or not ours)."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StreamedRequest)


def encode(project_id: int, rows: Sequence[Row], published_at: float | None = None) -> bytes:
    """The message of one request's rows. Their columns are `build_rows`', and some rows have
    one more (an alias's previous id, which becomes an identity link): the union is sent."""
    columns = [
        name for name in dict.fromkeys(key for row in rows for key in row) if name != "project_id"
    ]
    return _encoder.encode(
        StreamedRequest(
            VERSION,
            project_id,
            time.time() if published_at is None else published_at,
            columns,
            [[row.get(name) for name in columns] for row in rows],
        )
    )


def decode(payload: bytes) -> StreamedRequest:
    """The message's request; UnknownFormat if it is not version 1 of ours."""
    try:
        request = _decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise UnknownFormat(str(error)) from error
    if request.version != VERSION:
        raise UnknownFormat(f"version {request.version}")
    return request


def rows_of(request: StreamedRequest) -> list[Row]:
    """The rows to insert, as the database sink builds them (project_id included). A column the
    store has and the message lacks (published by an older server) is None: new columns are
    nullable; one the store does not have is carried along and ignored by the insert."""
    missing = [name for name in COLUMN_NAMES if name not in request.columns]
    rows = []
    for values in request.rows:
        row: Row = dict(zip(request.columns, values, strict=True))
        for name in missing:
            row[name] = None
        row["project_id"] = request.project_id
        rows.append(row)
    return rows


class Message(NamedTuple):
    project_id: int
    #: Indexes of the requests it holds, in the call's order.
    requests: list[int]
    payload: bytes
    id: str


def pack(
    requests: Sequence[tuple[int, list[Row]]], published_at: float, max_bytes: int
) -> list[Message]:
    """The messages carrying `requests` (project_id, rows): one per project, halved until each
    is at most `max_bytes` or holds one request (which is then sent as it is, and refused by
    the server if too big: see StreamSink._outcome)."""
    by_project: dict[int, list[int]] = {}
    for index, (project_id, _) in enumerate(requests):
        by_project.setdefault(project_id, []).append(index)
    messages: list[Message] = []
    pending = list(by_project.items())
    while pending:
        project_id, indexes = pending.pop(0)
        rows = [row for index in indexes for row in requests[index][1]]
        payload = encode(project_id, rows, published_at)
        if len(payload) > max_bytes and len(indexes) > 1:
            half = len(indexes) // 2
            pending[:0] = [(project_id, indexes[:half]), (project_id, indexes[half:])]
            continue
        messages.append(Message(project_id, indexes, payload, message_id(project_id, rows)))
    return messages


def subject(prefix: str, project_id: int) -> str:
    return f"{prefix}.{project_id % SHARDS}"


def message_id(project_id: int, rows: Sequence[Row]) -> str:
    """JetStream's Nats-Msg-Id: the same rows sent again have the same one."""
    digest = hashlib.sha256(str(project_id).encode())
    for event_id in sorted(row["event_id"] for row in rows):
        digest.update(b"\0" + event_id.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


#: What "the stream cannot take this now" looks like in nats-py.
_UNAVAILABLE = (
    nats.errors.Error,  # timeouts, no responders, connection closed or reconnecting
    nats.js.errors.Error,  # API errors: no stream, no quorum, storage full
    OSError,
    TimeoutError,  # also asyncio's and concurrent.futures' (Python 3.11)
)

T = TypeVar("T")


class StreamSink:
    """The EventSink of stream mode: a request is durable once JetStream acknowledged it."""

    def __init__(
        self,
        servers: list[str],
        stream: str,
        subject_prefix: str,
        retry_after_seconds: int,
        ack_timeout: float = 2.0,
    ) -> None:
        self._servers = servers
        self._stream = stream
        self._prefix = subject_prefix
        self._retry_after = retry_after_seconds
        self._ack_timeout = ack_timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting: asyncio.Lock | None = None

    # --- the event loop thread --------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coroutine` on the sink's loop and wait for it at most `timeout` seconds."""
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                # Started on first use, so a process forked after creating the sink gets its own.
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve_loop, args=(loop, ready), name="stream-sink", daemon=True
                )
                thread.start()
                ready.wait()
                self._loop, self._client, self._js = loop, None, None
                self._connecting = None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    @staticmethod
    def _serve_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    async def _jetstream(self) -> JetStreamContext:
        """The connection's JetStream context, connecting first if needed (it reconnects by
        itself once made: a restarted or killed node is replaced by another of the list)."""
        if self._js is not None and self._client is not None and not self._client.is_closed:
            return self._js
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._js is None or self._client is None or self._client.is_closed:
                self._client = await nats.connect(
                    servers=self._servers,
                    connect_timeout=min(2.0, self._ack_timeout),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    # Publishes made while reconnecting wait in this buffer; the ack timeout
                    # still bounds every caller.
                    pending_size=64 * 1024 * 1024,
                    name="apex-ingest-server",
                    error_cb=_log_error,
                    disconnected_cb=_disconnected,
                    reconnected_cb=_reconnected,
                )
                self._js = self._client.jetstream(timeout=self._ack_timeout)
            return self._js

    # --- EventSink --------------------------------------------------------------------------

    def store(self, project_id: int, rows: list[Row], deadline: float | None = None) -> None:
        error = self.store_many([(project_id, rows)], deadline)[0]
        if error is not None:
            raise error

    def store_many(
        self, requests: Sequence[tuple[int, list[Row]]], deadline: float | None = None
    ) -> list[IngestError | None]:
        """Publish each request as one message; each one's error (None: acknowledged)."""
        if not requests:
            return []
        timeout = self._ack_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return [DeadlinePassed() for _ in requests]
        started = time.perf_counter()
        # The requests of one message share its failure: it is logged once, not once per request.
        logged: set[int] = set()
        try:
            results = self._run(self._publish_all(requests, timeout), timeout + 0.5)
        except _UNAVAILABLE as error:
            # Connecting failed, or the loop did not answer in time: nothing is known.
            log.warning("stream unavailable: %r", error)
            logged.add(id(error))
            results = [error for _ in requests]
        metrics.STREAM_PUBLISH_SECONDS.observe(time.perf_counter() - started)
        outcomes = []
        for result in results:
            first = id(result) not in logged
            logged.add(id(result))
            outcomes.append(self._outcome(result, log_it=first))
        return outcomes

    async def _publish_all(
        self, requests: Sequence[tuple[int, list[Row]]], timeout: float
    ) -> list[BaseException | None]:
        js = await self._jetstream()
        assert self._client is not None
        published_at = time.time()
        limit = min(self._client.max_payload - HEADROOM, GROUP_BYTES)
        messages = pack(requests, published_at, limit)
        publishes = [
            js.publish(
                subject(self._prefix, message.project_id),
                message.payload,
                timeout=timeout,
                stream=self._stream,
                headers={"Nats-Msg-Id": message.id, FORMAT_HEADER: f"{FORMAT}/{VERSION}"},
            )
            for message in messages
        ]
        outcomes = await asyncio.gather(*publishes, return_exceptions=True)
        results: list[BaseException | None] = [None] * len(requests)
        for message, outcome in zip(messages, outcomes, strict=True):
            for index in message.requests:
                results[index] = outcome if isinstance(outcome, BaseException) else None
        return results

    def _outcome(self, result: BaseException | None, log_it: bool = True) -> IngestError | None:
        if result is None:
            metrics.STREAM_PUBLISHED.labels("ok").inc()
            return None
        if isinstance(result, nats.errors.MaxPayloadError):
            # Retrying cannot help: the server's max_payload is below what one request may
            # hold (docs/deploy.md: set max_payload to 8MB).
            metrics.STREAM_PUBLISHED.labels("failed").inc()
            if log_it:
                log.error("a message is over the NATS server's max_payload: raise it (8MB)")
            return IngestError("could not store the events")
        if isinstance(result, _UNAVAILABLE):
            # A timeout may hide a message JetStream stored: the caller retries with the same
            # event ids, and the message id and the loaders' insert keep it once.
            maybe = isinstance(result, TimeoutError)
            metrics.STREAM_PUBLISHED.labels("unavailable").inc()
            if log_it:
                log.warning("stream did not acknowledge: %r", result)
            error = StorageUnavailable(self._retry_after, maybe_stored=maybe)
            error.__cause__ = result
            return error
        metrics.STREAM_PUBLISHED.labels("failed").inc()
        if log_it:
            log.error("could not publish a message", exc_info=result)
        return IngestError("could not store the events")

    # --- health -----------------------------------------------------------------------------

    def reachable(self) -> bool:
        """Whether the stream can take messages now: it answers, and has a leader."""
        try:
            return self._run(self._probe(), self._ack_timeout + 0.5)
        except _UNAVAILABLE as error:
            log.debug("stream probe failed: %r", error)
            return False

    async def _probe(self) -> bool:
        js = await self._jetstream()
        info = await js.stream_info(self._stream)
        cluster = info.cluster
        return cluster is None or bool(cluster.leader)

    def close(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        client = self._client
        if client is not None and not client.is_closed:
            try:
                self._run(client.drain(), 2.0)
            except Exception:  # closing anyway
                log.debug("could not drain the stream connection", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)


async def _log_error(error: Exception) -> None:
    log.warning("stream connection: %r", error)


async def _disconnected() -> None:
    log.warning("stream connection lost; reconnecting")


async def _reconnected() -> None:
    log.info("stream connection restored")
