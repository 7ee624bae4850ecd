"""Load generators, process control and the figures every reliability test prints.

A reliability test drives the real service (`python -m apex_ingest serve`, or its parts) with
client threads that behave like the SDK: 20-event batches whose events carry ids, retried with
the same ids on a 5xx or a network error. Afterwards the database is the judge:

- acked ⊆ stored: every event of a batch answered 200 is in the events table;
- no batch half-stored: per batch, 0 or 20 rows;
- no duplicates: no (project, event id) twice (the table has a unique key; this is counted anyway);
- no 500 at any time.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.service import free_port, logged_process

BATCH_SIZE = 20
FIGURES: list[dict[str, Any]] = []
FIGURES_FILE = Path(
    os.environ.get("APEX_RELIABILITY_FIGURES", ".pytest_cache/reliability-figures.json")
)


# --- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def spawn(args: list[str], env: dict[str, str]) -> Iterator[Proc]:
    """Run `python -m apex_ingest ARGS` with env on top of ours; SIGTERM (then kill) on exit."""
    environment = {**os.environ, "APEX_HOST": "127.0.0.1", **env}
    argv = [sys.executable, "-m", "apex_ingest", *args]
    with logged_process(argv, environment, prefix="apex-rel-") as (process, log_path):
        yield Proc(process, log_path)


def service_env(database_url: str, **extra: str) -> dict[str, str]:
    """Environment for `serve` on two free ports; generous rate limit, 2 gRPC processes."""
    return {
        "APEX_DATABASE_URL": database_url,
        "APEX_HTTP_PORT": str(free_port()),
        "APEX_GRPC_PORT": str(free_port()),
        "APEX_HTTP_WORKERS": "2",
        "APEX_GRPC_PROCESSES": "2",
        "APEX_RATE_LIMIT": "100000/second",
        "APEX_PROJECT_CACHE_TTL": "0",
        "APEX_SHUTDOWN_DRAIN": "0.2",
        **extra,
    }


def healthz(base_url: str) -> int:
    try:
        return requests.get(f"{base_url}/healthz", timeout=3).status_code
    except requests.RequestException:
        return 0


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of pid's direct children, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(entry), cmd.strip()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def grpc_children(pid: int) -> list[int]:
    return [child for child, cmd in children(pid) if cmd.endswith("apex_ingest grpc")]


def proxied_url(database_url: str, port: int) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=port).render_as_string(False)


def pg_address(database_url: str) -> tuple[str, int]:
    url = make_url(database_url)
    return url.host or "127.0.0.1", url.port or 5432


# --- load ----------------------------------------------------------------------------------


@dataclass
class Attempt:
    thread: int
    batch: str
    start: float
    end: float
    status: int  # 0: network error
    error: str = ""
    retry_after: str | None = None


@dataclass(kw_only=True)
class ClientThreads:
    """`threads` client threads, each running `_run(number)` from start() until stop(); after
    stop() a client still retrying gives up `give_up` seconds later (`giving_up()`)."""

    threads: int = 4
    give_up: float = 20.0
    acked: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)
    _stopped_at: float = 0.0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for number in range(self.threads):
            worker = threading.Thread(target=self._run, args=(number,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stopped_at = time.monotonic()
        self._stop.set()
        for worker in self._workers:
            worker.join(self.give_up + 15)
        assert not any(w.is_alive() for w in self._workers), "a client thread hung"

    def giving_up(self) -> bool:
        return self._stop.is_set() and time.monotonic() - self._stopped_at > self.give_up

    def _run(self, number: int) -> None:
        raise NotImplementedError


@dataclass
class Load(ClientThreads):
    """Client threads posting BATCH_SIZE-event batches with ids, retrying like the SDK.

    retry=True: a batch is resent (same ids) after a 5xx, a 429 or a network error until it is
    acked or `give_up` seconds after stop(). retry=False: every attempt is a new batch.
    """

    base_url: str
    project_key: str
    retry: bool = True
    fresh_connections: bool = False
    pause: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)

    def _run(self, number: int) -> None:
        session = requests.Session()
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            batch = f"t{number}-{sequence}-{os.urandom(3).hex()}"
            body = json.dumps(
                {
                    "projectKey": self.project_key,
                    "userId": f"user-{number}",
                    "events": [
                        {
                            "id": f"{batch}-{index}",
                            "type": "reliability",
                            "url": "/load",
                            "data": {"batch": batch, "index": index},
                        }
                        for index in range(BATCH_SIZE)
                    ],
                }
            ).encode()
            with self._lock:
                self.sent.add(batch)
            while True:
                attempt = self._post(session, number, batch, body)
                if attempt.status == 200:
                    with self._lock:
                        self.acked.append(batch)
                    break
                retryable = attempt.status in (0, 429) or attempt.status >= 500
                if not self.retry or not retryable:
                    break
                if self.giving_up():
                    break
                time.sleep(0.05 if attempt.status == 0 else 0.2)
            if self.pause:
                time.sleep(self.pause)

    def _post(self, session: requests.Session, number: int, batch: str, body: bytes) -> Attempt:
        headers = {"Content-Type": "application/json"}
        if self.fresh_connections:
            headers["Connection"] = "close"
        start = time.monotonic()
        try:
            poster = requests.post if self.fresh_connections else session.post
            response = poster(f"{self.base_url}/api/events", data=body, headers=headers, timeout=15)
            attempt = Attempt(
                number,
                batch,
                start,
                time.monotonic(),
                response.status_code,
                response.text[:200] if response.status_code != 200 else "",
                response.headers.get("Retry-After"),
            )
        except requests.RequestException as error:
            attempt = Attempt(number, batch, start, time.monotonic(), 0, _kind(error))
        with self._lock:
            self.attempts.append(attempt)
        return attempt

    def statuses(self) -> collections.Counter[int]:
        return collections.Counter(a.status for a in self.attempts)


def _kind(error: BaseException) -> str:
    """'refused' for a connection never made; 'aborted' for one the server dropped; else 'other'."""
    seen: BaseException | None = error
    chain = []
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text_ = " ".join(repr(e) for e in chain) + " " + " ".join(repr(a) for a in error.args)
    if "ConnectionRefused" in text_ or "Connection refused" in text_:
        return "refused"
    if isinstance(error, requests.Timeout):
        return "timeout"
    if "RemoteDisconnected" in text_ or "ConnectionReset" in text_ or "aborted" in text_:
        return "aborted"
    return "other: " + repr(error)[:150]


# --- the database as judge ------------------------------------------------------------------


@dataclass
class Verdict:
    acked_batches: int
    acked_events: int
    stored_events: int
    duplicates: int
    partial_batches: int
    lost_events: int
    stored_unacked_batches: int


def judge(database_url: str, load: Load) -> Verdict:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            per_batch: dict[str, int] = dict(
                connection.execute(
                    text(
                        "SELECT data->>'batch' AS batch, count(*) FROM events "
                        "WHERE type = 'reliability' GROUP BY 1"
                    )
                ).all()
            )
            stored = sum(per_batch.values())
            duplicates = connection.execute(
                text(
                    "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM events "
                    "GROUP BY project_id, event_id HAVING count(*) > 1) AS d"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    acked = set(load.acked)
    assert len(acked) == len(load.acked), "a batch was acked twice"
    lost = sum(BATCH_SIZE - per_batch.get(batch, 0) for batch in acked)
    return Verdict(
        acked_batches=len(acked),
        acked_events=len(acked) * BATCH_SIZE,
        stored_events=stored,
        duplicates=int(duplicates),
        partial_batches=sum(1 for n in per_batch.values() if n not in (0, BATCH_SIZE)),
        lost_events=lost,
        stored_unacked_batches=sum(1 for b in per_batch if b not in acked),
    )


def record(name: str, verdict: Verdict | None, load: Load | None, **extra: Any) -> dict[str, Any]:
    """Print this test's figures and keep them for the session summary."""
    figures: dict[str, Any] = {"test": name}
    if verdict is not None:
        figures.update(vars(verdict))
    if load is not None:
        statuses = load.statuses()
        errors = collections.Counter(a.error for a in load.attempts if a.status == 0)
        figures.update(
            requests=len(load.attempts),
            statuses={str(k): v for k, v in sorted(statuses.items())},
            network_errors=dict(errors),
            five_xx=sum(v for k, v in statuses.items() if k >= 500),
            five_hundreds=statuses.get(500, 0),
        )
    figures.update(extra)
    FIGURES.append(figures)
    print(f"\nRELIABILITY {json.dumps(figures, sort_keys=False)}")
    return figures


def assert_clean(verdict: Verdict, load: Load) -> None:
    assert load.statuses().get(500, 0) == 0, "a 500 was answered"
    assert verdict.lost_events == 0, f"{verdict.lost_events} acknowledged events are not stored"
    assert verdict.partial_batches == 0, f"{verdict.partial_batches} batches are half-stored"
    assert verdict.duplicates == 0, f"{verdict.duplicates} duplicate events"
