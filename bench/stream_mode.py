"""`make bench`'s stream mode: the same loads as direct mode, through NATS JetStream.

Run after direct mode, in the same run and on the same database: a 3-node JetStream cluster on
loopback ports (tests/nats_cluster.py, Debian's nats-server), an R3 stream, `apex-ingest serve`
with APEX_STREAM_URL set (same workers and processes as direct mode), and 2 loaders. The same
2 cores then also run three NATS nodes and the loaders, so the ingest side is judged against
direct mode's figures of this run, not against an absolute:

- acknowledged (ingest side): snippet req/s at 32 connections, batch events/s over HTTP at 16
  connections, gRPC direct events/s; each as a ratio to direct mode (target >= 0.8);
- loaded (load side): rows the loaders committed per second while the loads ran, and the time
  they needed after the loads to empty the stream;
- ack -> row: the loaders' `apex_loader_delay_seconds` (publication to commit), p50 and p99
  (bucket bounds);
- lag: the consumer's pending messages sampled every second during the loads (max, and the
  mean of the first and the second half: bounded, not growing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apex_ingest.common.settings import ServerSettings
from apex_ingest.ops.loader import setup_stream
from bench import grpc_load, promstats
from tests.nats_cluster import nats_cluster

LOADERS = 2
STREAM = "APEX_BENCH"


@dataclass
class StreamFigures:
    snippet_rps: float
    snippet_p99_ms: float
    batch_events_per_s: float
    batch_p99_ms: float
    direct: grpc_load.GrpcLoad
    loaded_events_per_s: float  # while the loads ran
    drain_s: float  # after the loads, until the stream was empty
    delay: promstats.Distribution | None
    lag_max: int
    lag_first_half: float
    lag_second_half: float
    refused: int  # non-200 / failed calls, all loads
    acked_events: int
    stored_events: int


class LagSampler(threading.Thread):
    """The consumer's lag (a loader's /healthz) every second."""

    def __init__(self, health_url: str) -> None:
        super().__init__(daemon=True)
        self.health_url = health_url
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as answer:
                    lag = json.loads(answer.read()).get("lag")
                if lag is not None:
                    self.samples.append(int(lag))
            except OSError:
                continue


def _lag(health_url: str) -> int | None:
    try:
        with urllib.request.urlopen(health_url, timeout=2) as answer:
            lag = json.loads(answer.read()).get("lag")
            return None if lag is None else int(lag)
    except OSError:
        return None


def run_stream_mode(
    *,
    python: str,
    env: dict[str, str],
    key: str,
    manifest: Path,
    seconds: int,
    stored_events: Callable[[], int],
    wrk: Callable[..., Any],
    snippets: Path,
    free_port: Callable[[], int],
    wait_http: Callable[[str], None],
    batch_size: int,
) -> StreamFigures:
    """Measure stream mode on `env`'s database (the service of direct mode stopped)."""
    with (
        tempfile.TemporaryDirectory(prefix="apex-bench-nats-") as directory,
        nats_cluster(Path(directory)) as cluster,
    ):
        settings = ServerSettings(
            database_url=env["APEX_DATABASE_URL"],
            stream_url=cluster.url,
            stream_name=STREAM,
            stream_replicas=3,
        )
        deadline = time.monotonic() + 30
        while True:  # the cluster elects its meta leader first
            try:
                asyncio.run(setup_stream(settings))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        http_port, grpc_port = free_port(), free_port()
        stream_env = {
            **env,
            "APEX_HTTP_PORT": str(http_port),
            "APEX_GRPC_PORT": str(grpc_port),
            "APEX_STREAM_URL": cluster.url,
            "APEX_STREAM_NAME": STREAM,
        }
        loader_ports = [free_port() for _ in range(LOADERS)]
        service = subprocess.Popen(
            [python, "-m", "apex_ingest", "serve"], env=stream_env, start_new_session=True
        )
        loaders = [
            subprocess.Popen(
                [python, "-m", "apex_ingest", "loader"],
                env={**stream_env, "APEX_LOADER_PORT": str(port)},
                start_new_session=True,
            )
            for port in loader_ports
        ]
        try:
            wait_http(f"http://127.0.0.1:{http_port}/healthz")
            for port in loader_ports:
                wait_http(f"http://127.0.0.1:{port}/healthz")
            return _measure(
                http_port=http_port,
                grpc_port=grpc_port,
                loader_ports=loader_ports,
                key=key,
                manifest=manifest,
                seconds=seconds,
                stored_events=stored_events,
                wrk=wrk,
                snippets=snippets,
                batch_size=batch_size,
            )
        finally:
            for process in [service, *loaders]:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in [service, *loaders]:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


def _measure(
    *,
    http_port: int,
    grpc_port: int,
    loader_ports: list[int],
    key: str,
    manifest: Path,
    seconds: int,
    stored_events: Callable[[], int],
    wrk: Callable[..., Any],
    snippets: Path,
    batch_size: int,
) -> StreamFigures:
    url = f"http://127.0.0.1:{http_port}/api/events"
    health_url = f"http://127.0.0.1:{loader_ports[0]}/healthz"
    metrics_urls = [f"http://127.0.0.1:{port}/metrics" for port in loader_ports]
    wrk(url, 32, 3, manifest=snippets)  # warm-up
    wrk(url, 16, 2, manifest=manifest)
    _drain(health_url, 120)
    before_rows = stored_events()
    before = [promstats.scrape(u) for u in metrics_urls]
    sampler = LagSampler(health_url)
    sampler.start()
    started = time.monotonic()
    snippet = wrk(url, 32, seconds, manifest=snippets)
    batch = wrk(url, 16, seconds, manifest=manifest)
    direct = grpc_load.run_load(f"127.0.0.1:{grpc_port}", key, seconds)
    loads_ended = time.monotonic()
    rows_during = stored_events() - before_rows
    sampler.stopped.set()
    drain_s = _drain(health_url, 300)
    after = [promstats.scrape(u) for u in metrics_urls]
    delay = _summed_delay(before, after)
    stored = stored_events() - before_rows
    samples = sampler.samples or [0]
    half = max(1, len(samples) // 2)
    acked = snippet.ok + batch.ok * batch_size + direct.events
    return StreamFigures(
        snippet_rps=snippet.requests_per_s,
        snippet_p99_ms=snippet.p99_ms,
        batch_events_per_s=batch.requests_per_s * batch_size,
        batch_p99_ms=batch.p99_ms,
        direct=direct,
        loaded_events_per_s=rows_during / (loads_ended - started),
        drain_s=drain_s,
        delay=delay,
        lag_max=max(samples),
        lag_first_half=sum(samples[:half]) / half,
        lag_second_half=sum(samples[half:]) / max(1, len(samples) - half),
        refused=snippet.other + batch.other + sum(direct.failed.values()),
        acked_events=acked,
        stored_events=stored,
    )


def _drain(health_url: str, timeout: float) -> float:
    """Seconds until the loaders report no lag (a loader reads it every second)."""
    started = time.monotonic()
    time.sleep(1.5)
    while time.monotonic() - started < timeout:
        if _lag(health_url) == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    return float("inf")


def _summed_delay(
    before: list[promstats.Scrape], after: list[promstats.Scrape]
) -> promstats.Distribution | None:
    """The loaders' ack -> row histograms between two scrapes, every loader together."""
    name = "apex_loader_delay_seconds"
    merged_before: promstats.Scrape = {name: promstats.Histogram({})}
    merged_after: promstats.Scrape = {name: promstats.Histogram({})}
    for merged, scrapes in ((merged_before, before), (merged_after, after)):
        for scrape in scrapes:
            found = scrape.get(name)
            if found is None:
                continue
            target = merged[name]
            for le, value in found.buckets.items():
                target.buckets[le] = target.buckets.get(le, 0.0) + value
            target.total += found.total
    return promstats.between(merged_before, merged_after, name)


def report(
    stream: StreamFigures,
    snippet_rps: float | None,
    batch_events: float | None,
    direct: float | None,
    copy: float | None = None,
) -> bool:
    """Print stream mode's figures against direct mode's of the same run (None: not measured,
    `--stream-only`); True if every target is met."""

    def ratio(value: float, base: float | None) -> str:
        return "(direct mode not run)" if not base else f"= {value / base:.2f} of direct mode"

    snippet_ratio = stream.snippet_rps / snippet_rps if snippet_rps else 0.0
    batch_ratio = stream.batch_events_per_s / batch_events if batch_events else 0.0
    print("-- stream mode: 3-node JetStream (R3) + 2 loaders on the same cores --")
    print(
        f"snippet 1-event, 32 conn : {stream.snippet_rps:7.0f} req/s acknowledged"
        f"  p99 {stream.snippet_p99_ms:.1f} ms  {ratio(stream.snippet_rps, snippet_rps)}"
        " (target >= 0.8)"
    )
    print(
        f"batch over HTTP, 16 conn : {stream.batch_events_per_s:7.0f} events/s acknowledged"
        f"  p99 {stream.batch_p99_ms:.1f} ms  {ratio(stream.batch_events_per_s, batch_events)}"
        " (target >= 0.8)"
    )
    print(
        f"gRPC direct              : {stream.direct.events_per_s:7.0f} events/s acknowledged"
        f"  p99 {stream.direct.p99_ms:.1f} ms  {ratio(stream.direct.events_per_s, direct)}"
    )
    print(
        f"loaded while the loads ran: {stream.loaded_events_per_s:7.0f} events/s;"
        f" the stream was empty {stream.drain_s:.1f} s after they ended"
    )
    if copy:
        print(
            f"  against COPY ({copy:.0f} rows/s): acknowledged batches over HTTP"
            f" {stream.batch_events_per_s / copy:.2f}, gRPC direct"
            f" {stream.direct.events_per_s / copy:.2f},"
            f" loaded {stream.loaded_events_per_s / copy:.2f}"
        )
    delay = stream.delay
    shown = (
        "no observations"
        if delay is None or not delay.count
        else f"p50 <= {delay.p50:g} s, p99 <= {delay.p99:g} s (bucket bounds),"
        f" mean {delay.mean:.2f} s, {delay.count:.0f} messages"
    )
    print(f"ack -> row delay: {shown}")
    print(
        f"lag (messages): max {stream.lag_max}, mean {stream.lag_first_half:.0f} in the first"
        f" half of the loads, {stream.lag_second_half:.0f} in the second"
    )
    consistent = stream.acked_events <= stream.stored_events
    print(
        f"acked events {stream.acked_events}, stored {stream.stored_events}, refused calls"
        f" {stream.refused} -> {'OK' if consistent else 'MISMATCH'}"
    )
    targets = {
        "stream snippet >= 0.8 of direct": snippet_ratio >= 0.8,
        "stream batch >= 0.8 of direct": batch_ratio >= 0.8,
        "loaders keep up (lag not growing)": stream.lag_second_half
        <= max(2 * stream.lag_first_half, 1000),
        "acked <= stored": consistent,
    }
    missed = [name for name, ok in targets.items() if not ok]
    print(f"stream targets missed: {', '.join(missed)}" if missed else "every stream target met")
    return not missed
