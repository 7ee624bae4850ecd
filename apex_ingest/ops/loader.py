"""Stream mode's other half: `apex-ingest stream setup` and `apex-ingest loader`.

A loader drains the stream into the database through the loaders' durable pull consumer
(`APEX_STREAM_CONSUMER`): every loader pulls from the same consumer, so JetStream hands each
message to one of them (a work queue; run more loaders to load faster). Per batch:

    fetch up to APEX_LOADER_BATCH messages -> decode -> in runs of whole messages of at most
    MAX_COMMIT_ROWS rows: row filters -> insert (one transaction per run, the store's
    insert-or-ignore on (project_id, event_id)) -> commit -> ack each message of the run

A message is acknowledged only after its rows are committed. A loader killed anywhere in
between leaves its messages unacknowledged: JetStream redelivers them after
APEX_STREAM_ACK_WAIT seconds, to this loader or another, and the insert skips the ids already
stored. Once-only therefore rests on the event ids, as it does in direct mode.

Per-row work that must happen at load time goes in one place: the row filters (`RowFilter`),
called inside the loading transaction, before the insert, with the batch's rows. That is the
hook for whatever must be judged against the database as it is when the rows land rather than
when they were published (a person deleted or suppressed after their events were accepted):
a filter drops or rewrites rows, and what it returns is inserted in the same transaction.

A filter that honours a deletion must not race it: a deletion committed between the filter's
read and the loader's commit would miss the rows this transaction inserts. The simple rule is a
per-project transaction-level advisory lock: the filter takes it shared
(`pg_advisory_xact_lock_shared(project_id)`) before reading the deletions, the deleting
transaction takes it exclusive while it records the deletion and removes the stored events. On
SQLite the single writer already serializes them. Dedup needs no filter: the insert skips ids
already stored. `privacy_filter.honour_privacy` is that filter (people.lock_project is the lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import faulthandler
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from sqlalchemy import Connection, Engine

from apex_ingest.common.settings import ServerSettings, cannot_listen, variable
from apex_ingest.server import metrics
from apex_ingest.server.database import create_db_engine
from apex_ingest.server.privacy_filter import honour_privacy
from apex_ingest.server.storage import (
    UNAVAILABLE_ERRORS,
    Row,
    insert_events_fast,
    storage_reachable,
)
from apex_ingest.server.stream import SHARDS, UnknownFormat, decode, rows_of

log = logging.getLogger(__name__)

#: Per-row work at load time: given the loading transaction and a batch's rows, the rows to
#: insert (see the module's docstring).
RowFilter = Callable[[Connection, list[Row]], list[Row]]

#: Row filters every loader applies, in order. Features that must honour a change made after
#: publication add theirs here: deletions and suppressions (privacy_filter.py).
ROW_FILTERS: list[RowFilter] = [honour_privacy]

#: Seconds before a message whose rows could not be committed is delivered again.
RETRY_DELAY = 1.0
#: Seconds before a message no loader can read (another format version) is offered again.
UNREADABLE_DELAY = 60.0
#: A loader's statement timeout: a batch is large, but a blocked database must still fail.
LOADER_STATEMENT_TIMEOUT_MS = 60_000
#: Rows in one loader transaction at most (whole messages; a bigger message alone): about what
#: APEX_LOADER_BATCH (256) messages of one 100-event request each used to make.
MAX_COMMIT_ROWS = 25_000


# --- stream setup --------------------------------------------------------------------------


def stream_config(settings: ServerSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=settings.stream_name,
        subjects=[f"{settings.stream_subject}.>"],
        # A work queue: a message is removed once a loader acknowledged it, so the stream holds
        # exactly what is not yet in the database (and its disk use says how far behind).
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=settings.stream_replicas,
        # When full, refuse new messages (the servers answer UNAVAILABLE) rather than drop
        # acknowledged ones.
        discard=api.DiscardPolicy.NEW,
        duplicate_window=120.0,
    )


def consumer_config(settings: ServerSettings) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=settings.stream_consumer,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=settings.stream_ack_wait,
        max_ack_pending=max(10_000, 8 * settings.loader_batch),
        max_waiting=512,
    )


async def setup_stream(settings: ServerSettings) -> list[str]:
    """Create the stream and the loaders' consumer, or check and update them; what was done."""
    client = await _connect(settings, "apex-ingest-setup")
    done = []
    try:
        js = client.jetstream(timeout=10)
        wanted = stream_config(settings)
        try:
            info = await js.stream_info(settings.stream_name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(wanted)
            done.append(
                f"created stream {wanted.name} (subjects {wanted.subjects}, "
                f"{wanted.num_replicas} replica(s), work queue)"
            )
        else:
            current = info.config
            if current.retention != wanted.retention:
                raise RuntimeError(
                    f"stream {wanted.name} exists with retention {current.retention}, not "
                    "work queue: delete it or choose another APEX_STREAM_NAME"
                )
            changes = {
                name: (getattr(current, name), getattr(wanted, name))
                for name in ("subjects", "num_replicas", "discard", "duplicate_window")
                if getattr(current, name) != getattr(wanted, name)
            }
            if changes:
                merged = dataclasses.replace(
                    current, **{name: new for name, (_, new) in changes.items()}
                )
                await js.update_stream(merged)
                done.append(f"updated stream {wanted.name}: {changes}")
            else:
                done.append(f"stream {wanted.name} is as configured")
        consumer = consumer_config(settings)
        try:
            existing = await js.consumer_info(settings.stream_name, settings.stream_consumer)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(settings.stream_name, consumer)
            done.append(f"created consumer {consumer.durable_name}")
        else:
            if existing.config.ack_wait != consumer.ack_wait:
                await js.add_consumer(settings.stream_name, consumer)  # updates it
                done.append(f"updated consumer {consumer.durable_name} (ack_wait)")
            else:
                done.append(f"consumer {consumer.durable_name} is as configured")
    finally:
        await client.close()
    return done


async def _connect(settings: ServerSettings, name: str) -> Client:
    return await nats.connect(
        servers=settings.stream_servers,
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=_quiet,
    )


async def _quiet(error: Exception) -> None:
    log.debug("stream connection: %r", error)


# --- the loader ----------------------------------------------------------------------------


class _Outcome(enum.Enum):
    COMMITTED = "committed"
    UNAVAILABLE = "unavailable"  # the database cannot take it now: all of it waits
    FAILED = "failed"  # something in the rows: tried again message by message


@dataclass
class LoaderState:
    """What /healthz reports."""

    lag: int | None = None
    stream_reachable: bool = False
    database_reachable: bool | None = None
    loaded_messages: int = 0
    last_commit: float | None = None  # time.time()


@dataclass
class Loader:
    """Drains the stream into the database; see the module's docstring."""

    settings: ServerSettings
    engine: Engine
    filters: Sequence[RowFilter] = field(default_factory=lambda: list(ROW_FILTERS))
    state: LoaderState = field(default_factory=LoaderState)
    #: time.monotonic() of the fetch or the last in-progress mark of the messages being loaded:
    #: the next mark is due a third of the ack wait later.
    _marked: float = field(default=0.0, init=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Load until `stop` is set (a batch in progress is finished and acknowledged)."""
        while True:  # NATS may not be up yet: wait for it, as the servers do
            try:
                client = await _connect(self.settings, "apex-ingest-loader")
                break
            except (OSError, TimeoutError, nats.errors.Error) as error:
                log.warning("cannot reach the stream yet: %r", error)
                self.state.stream_reachable = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_DELAY)
                if stop.is_set():
                    return
        try:
            js = client.jetstream(timeout=10)
            subscription = await js.pull_subscribe_bind(
                durable=self.settings.stream_consumer, stream=self.settings.stream_name
            )
            lag_task = asyncio.create_task(self._watch_lag(subscription, stop))
            try:
                while not stop.is_set():
                    try:
                        await self.load_batch(subscription)
                    except Exception:  # a bug or an unforeseen error: never lose the loop
                        log.exception("loading failed; retrying")
                        await asyncio.sleep(RETRY_DELAY)
            finally:
                lag_task.cancel()
        finally:
            await client.close()

    async def load_batch(self, subscription: Any, wait: float = 1.0) -> int:
        """Fetch and load one batch; the number of messages loaded (0: none waiting)."""
        try:
            messages: list[Msg] = await subscription.fetch(self.settings.loader_batch, timeout=wait)
        except TimeoutError:  # nats-py raises its own and asyncio's: nothing waiting
            return 0
        except nats.errors.Error as error:  # reconnecting, no leader: try again shortly
            log.warning("could not fetch from the stream: %r", error)
            self.state.stream_reachable = False
            await asyncio.sleep(RETRY_DELAY)
            return 0
        self.state.stream_reachable = True
        return await self.load(messages)

    async def load(self, messages: list[Msg]) -> int:
        """Commit the messages' rows, then acknowledge them; the number loaded."""
        readable: list[tuple[Msg, float, list[Row]]] = []
        for message in messages:
            try:
                request = decode(message.data)
            except UnknownFormat as error:
                # Another version (a newer server, an older loader) or not ours: left in the
                # stream for a loader that can read it; never acknowledged, never lost.
                log.error(
                    "cannot read message %s (%s): left in the stream",
                    message.metadata.sequence.stream,
                    error,
                )
                metrics.LOADER_MESSAGES.labels("unreadable").inc()
                await message.nak(delay=UNREADABLE_DELAY)
                continue
            readable.append((message, request.published_at, rows_of(request)))
        if not readable:
            return 0
        # A message may hold many requests (stream.pack): the fetched batch is committed in
        # transactions of at most MAX_COMMIT_ROWS rows (whole messages), not all at once.
        chunks = _chunks(readable, MAX_COMMIT_ROWS)
        loaded, self._marked = 0, time.monotonic()
        for index, chunk in enumerate(chunks):
            waiting = [item for later in chunks[index + 1 :] for item in later]
            if self._mark_due():
                await self._in_progress(chunk + waiting)
            done = await self._commit_and_ack(chunk, waiting)
            if done is None:  # the database is unavailable: what was left waits, together
                break
            loaded += done
        return loaded

    async def _commit_and_ack(
        self, batch: list[tuple[Msg, float, list[Row]]], waiting: list[tuple[Msg, float, list[Row]]]
    ) -> int | None:
        """Commit the batch's rows in one transaction and acknowledge its messages; the number
        loaded, or None if the database is unavailable: then every message of `batch` and
        `waiting` (the fetched messages still to commit) waits RETRY_DELAY, together. When the
        batch fails otherwise (something in one message), each is tried on its own, and one
        that still fails waits UNREADABLE_DELAY (left in the stream, never lost). `waiting` is
        kept in progress meanwhile."""
        outcome = await self._commit_in_time(batch, batch + waiting)
        if outcome is _Outcome.COMMITTED:
            return await self._ack(batch)
        if outcome is _Outcome.UNAVAILABLE:
            await self._defer(batch + waiting)
            return None
        if len(batch) == 1:
            await self._set_aside(batch[0][0])
            return 0
        loaded = 0
        for index, one in enumerate(batch):
            if self._mark_due():
                # The messages not yet tried stay in progress while the earlier ones are loaded
                # (a long commit marks them itself, in _commit_in_time).
                await self._in_progress(batch[index:] + waiting)
            outcome = await self._commit_in_time([one], batch[index:] + waiting)
            if outcome is _Outcome.COMMITTED:
                loaded += await self._ack([one])
            elif outcome is _Outcome.UNAVAILABLE:
                # The database went away meanwhile: the rest waits for it, together.
                await self._defer(batch[index:] + waiting)
                return None
            else:
                await self._set_aside(one[0])
        return loaded

    async def _ack(self, batch: list[tuple[Msg, float, list[Row]]]) -> int:
        committed = time.time()
        self.state.database_reachable = True
        self.state.loaded_messages += len(batch)
        self.state.last_commit = committed
        for message, published_at, _ in batch:
            # Fire and forget: an ack that is lost only means a redelivery, which the insert
            # skips.
            await message.ack()
            metrics.LOADER_DELAY.observe(max(0.0, committed - published_at))
        metrics.LOADER_MESSAGES.labels("loaded").inc(len(batch))
        metrics.LOADER_ROWS.inc(sum(len(rows) for _, _, rows in batch))
        return len(batch)

    def _mark_due(self) -> bool:
        return time.monotonic() - self._marked > self.settings.stream_ack_wait / 3

    async def _in_progress(self, batch: list[tuple[Msg, float, list[Row]]]) -> None:
        self._marked = time.monotonic()
        for message, _, _ in batch:
            try:
                await message.in_progress()
            except nats.errors.Error as error:  # reconnecting: the work goes on
                log.debug("could not mark a message in progress: %r", error)

    async def _defer(self, batch: list[tuple[Msg, float, list[Row]]]) -> None:
        log.warning("%d messages deferred until the database answers", len(batch))
        self.state.database_reachable = False
        metrics.LOADER_MESSAGES.labels("deferred").inc(len(batch))
        for message, _, _ in batch:
            await message.nak(delay=RETRY_DELAY)
        await asyncio.sleep(RETRY_DELAY)

    async def _set_aside(self, message: Msg) -> None:
        metrics.LOADER_MESSAGES.labels("deferred").inc()
        await message.nak(delay=UNREADABLE_DELAY)

    async def _commit_in_time(
        self,
        batch: list[tuple[Msg, float, list[Row]]],
        hold: list[tuple[Msg, float, list[Row]]],
    ) -> _Outcome:
        """Commit `batch`'s rows in a worker thread; while it takes long, tell JetStream that
        the messages of `hold` are in progress, so that a slow commit is not redelivered to
        another loader.

        `asyncio.wait`, not `wait_for`: a commit that itself fails with a TimeoutError must
        end as that failure, not be taken for "still running" (and held in progress forever).
        """
        rows = [row for _, _, message_rows in batch for row in message_rows]
        commit = asyncio.ensure_future(asyncio.to_thread(self._commit, rows))
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({commit}, timeout=self.settings.stream_ack_wait / 3)
            if done:
                break
            log.warning(
                "a commit of %d rows has taken %.0f s so far", len(rows), time.monotonic() - started
            )
            await self._in_progress(hold)
        try:
            commit.result()
        except UNAVAILABLE_ERRORS as error:
            log.warning("database unavailable: %r", error)
            return _Outcome.UNAVAILABLE
        except Exception:
            log.exception(
                "could not load %d messages (stream sequences %s...)",
                len(batch),
                batch[0][0].metadata.sequence.stream,
            )
            return _Outcome.FAILED
        return _Outcome.COMMITTED

    def _commit(self, rows: list[Row]) -> None:
        with self.engine.begin() as connection:
            for keep in self.filters:
                rows = keep(connection, rows)
            if rows:
                insert_events_fast(connection, rows)

    async def _watch_lag(self, subscription: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                info = await subscription.consumer_info()
                self.state.lag = int(info.num_pending) + int(info.num_ack_pending)
                self.state.stream_reachable = True
                metrics.LOADER_LAG.set(self.state.lag)
            except (TimeoutError, nats.errors.Error) as error:
                log.debug("could not read the consumer's lag: %r", error)
                self.state.stream_reachable = False
            if self.state.database_reachable is False:
                self.state.database_reachable = await asyncio.to_thread(
                    storage_reachable, self.engine
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


def _chunks(
    batch: list[tuple[Msg, float, list[Row]]], max_rows: int
) -> list[list[tuple[Msg, float, list[Row]]]]:
    """`batch` in consecutive runs of whole messages of at most `max_rows` rows each (a message
    with more is a run of its own)."""
    chunks: list[list[tuple[Msg, float, list[Row]]]] = []
    rows = 0
    for item in batch:
        if not chunks or rows + len(item[2]) > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(item)
        rows += len(item[2])
    return chunks


def loader_engine(settings: ServerSettings) -> Engine:
    """The database engine of a loader: one connection at a time, a longer statement timeout
    (batches are large)."""
    tuned = dataclasses.replace(
        settings,
        db_pool_size=2,
        db_statement_timeout_ms=max(settings.db_statement_timeout_ms, LOADER_STATEMENT_TIMEOUT_MS),
    )
    return create_db_engine(settings.database_url, tuned)


def run_loader(settings: ServerSettings) -> None:
    """`apex-ingest loader`: load until SIGTERM/SIGINT, finishing the batch in progress."""
    from apex_ingest.common.stop_signals import StopSignals

    # `kill -USR1` writes every thread's stack to stderr: what a loader that stopped loading is
    # waiting on, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    engine = loader_engine(settings)
    loader = Loader(settings, engine)
    if settings.loader_port is not None:
        serve_loader_health(settings.host, settings.loader_port, loader.state)
    signals = StopSignals()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def forward_stop() -> None:
            signals.wait()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=forward_stop, name="loader-signals", daemon=True).start()
        log.info(
            "loader started: stream %s, consumer %s, %d subjects",
            settings.stream_name,
            settings.stream_consumer,
            SHARDS,
        )
        await loader.run(stop)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()
    log.info("loader stopped")


def serve_loader_health(host: str, port: int, state: LoaderState) -> int:
    """GET /healthz (JSON: lag, stream, database; 503 while the stream is unreachable) and
    GET /metrics on host:port, in a daemon thread; the port bound."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from apex_ingest.common.metrics import registry

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, kind, status = generate_latest(registry()), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                status = 200 if state.stream_reachable else 503
                body = json.dumps(
                    {
                        "status": "ok" if status == 200 else "stream unreachable",
                        "lag": state.lag,
                        "stream": state.stream_reachable,
                        "database": state.database_reachable,
                        "loaded_messages": state.loaded_messages,
                        "last_commit": state.last_commit,
                    }
                ).encode()
                kind = "application/json"
            else:
                body, kind, status = b"not found\n", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes are not worth a log line

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:  # taken since the command checked it: one line, not a traceback
        raise cannot_listen(host, port, variable("loader_port"), error) from None
    threading.Thread(target=server.serve_forever, name="loader-health", daemon=True).start()
    return int(server.server_address[1])
