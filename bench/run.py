"""`make bench`: the full path against its baselines, in one run on one machine.

1. Snippet: 1-event requests through HTTP -> gateway -> gRPC -> PostgreSQL commit, 32 connections,
   against a bare Flask JSON endpoint on granian with 2 workers, run right after; then 4
   connections (p99) and 1 connection on the otherwise idle service (p50).
2. Batch: realistic 100-event requests (bench/events.py), 16 connections over HTTP, and the same
   batches sent straight to IngestEvents by an internal gRPC client (bench/grpc_load.py), both
   against COPY of the same rows into a frozen copy of today's events schema (bench/frozen.py).
3. Coalescing and group commit: the gateway's and server's histograms, per load (/metrics).
4. Memory: the summed RSS of every service process, sampled during the runs.
5. Acked vs stored: every acknowledged event must be in the database afterwards, none twice.
6. Sizing: the run's figures as rows for docs/deploy.md's Sizing table.
7. Stream mode (bench/stream_mode.py; `--no-stream` skips it, `--stream-only` runs it alone):
   the same loads through a 3-node NATS JetStream cluster and 2 loaders, against direct mode's
   figures of this run; loaded events/s and the ack -> row delay.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from bench import events, frozen, grpc_load, promstats, stream_mode

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get(
    "APEX_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@dataclass
class Load:
    requests_per_s: float
    ok: int
    other: int
    socket_errors: int
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def libpq(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def wait_http(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def wrk(
    url: str,
    connections: int,
    seconds: int,
    body: bytes | None = None,
    manifest: Path | None = None,
    threads: int = 2,
) -> Load:
    """Load `url` with one fixed `body`, or the bodies of a manifest (see bench/counts.lua)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        env = {**os.environ, "BENCH_ID_TAG": secrets.token_hex(4)}
        if manifest is not None:
            env["BENCH_MANIFEST"] = str(manifest)
        else:
            body_file.write(body or b"")
            body_file.flush()
            env["BENCH_BODY_FILE"] = body_file.name
        out = subprocess.run(
            [
                "wrk",
                "-t",
                str(min(threads, connections)),
                "-c",
                str(connections),
                "-d",
                f"{seconds}s",
                "--latency",
                "-s",
                str(ROOT / "bench" / "counts.lua"),
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    fields = dict(re.findall(r"(\w+)=(\d+)", out.split("BENCH_RESULT", 1)[1]))
    return Load(
        rps,
        int(fields["ok"]),
        int(fields["other"]),
        int(fields["errors"]),
        int(fields["p50_us"]) / 1000,
        int(fields["p99_us"]) / 1000,
    )


class RssSampler(threading.Thread):
    """Sums the RSS of a process tree every 200 ms; keeps the peak, overall and per phase.

    Also the peak of the summed PSS (a shared page counted once, split among the processes
    that map it: the libraries' code the processes share), which is what they hold together.
    """

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        if not Path("/proc/self/smaps_rollup").exists():  # Linux < 4.14: would read 0 MB
            raise SystemExit("bench: no /proc/PID/smaps_rollup to measure memory with")
        self.root_pid = root_pid
        self.peak_mb = 0.0
        self.peak_pss_mb = 0.0
        self.phase = "start"
        self.phases: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            (sample, pss), phase = self.sample(), self.phase
            self.peak_mb = max(self.peak_mb, sample)
            self.peak_pss_mb = max(self.peak_pss_mb, pss)
            self.phases[phase] = max(self.phases.get(phase, 0.0), sample)

    def sample(self) -> tuple[float, float]:
        """The summed RSS and PSS of the tree, in MB."""
        rss = pss = 0
        for pid in [self.root_pid, *_descendants(self.root_pid)]:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            except OSError:
                pass  # the process has just exited
        return rss / 1024, pss / 1024


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(status.parent.name))
        except (OSError, IndexError):
            continue
    found, stack = [], list(children.get(root_pid, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def topology(serve_pid: int) -> str:
    """What the running `serve` is made of, read from its process tree: its children are the
    gateway workers (granian forks them) and the gRPC processes (`apex_ingest grpc`)."""
    grpc = workers = 0
    for pid in _descendants(serve_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"apex_ingest\x00grpc" in command:
            grpc += 1
        elif b"apex_ingest\x00serve" in command or b"apex-ingest\x00serve" in command:
            workers += 1
    return (
        f"{workers} gateway worker{'s' * (workers != 1)}, {grpc} gRPC process{'es' * (grpc != 1)}"
    )


def write_snippet_manifest(directory: Path, key: str) -> Path:
    """1-event bodies as apex.js sends them (bench/events.py: varied pages, campaigns,
    referrers, decimals, an id, a timestamp, sentAt) and their User-Agents, for counts.lua."""
    bodies = [(agent, events.snippet_body(event, key)) for agent, event in events.snippet_pool()]
    return _write_manifest(directory, "snippet", bodies)


def write_manifest(directory: Path, pool: list[events.Batch], key: str) -> Path:
    """The pre-generated batch bodies and their User-Agents, for bench/counts.lua."""
    bodies = [(batch.user_agent, events.http_body(batch, key)) for batch in pool]
    return _write_manifest(directory, "batch", bodies)


def _write_manifest(directory: Path, name: str, bodies: list[tuple[str, bytes]]) -> Path:
    """Each (User-Agent, body) as a file, listed in `<name>.tsv` as counts.lua reads it."""
    lines = []
    for number, (agent, body) in enumerate(bodies):
        path = directory / f"{name}_{number}.json"
        path.write_bytes(body)
        lines.append(f"{agent}\t{path}\n")
    manifest = directory / f"{name}.tsv"
    manifest.write_text("".join(lines))
    return manifest


def stored_events(database_url: str) -> tuple[int, int]:
    with psycopg.connect(libpq(database_url)) as conn:
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (project_id, event_id)) FROM events"
        ).fetchone()  # type: ignore[misc]
    return int(total), int(distinct)


def granian_load(
    python: str, app: str, snippets: Path, seconds: int, env: dict[str, str] | None = None
) -> Load:
    """Serve `app` with granian, 2 workers (as the baseline is defined), and load it."""
    port = free_port()
    argv = [python, "-m", "granian", "--interface", "wsgi", "--workers", "2", "--no-ws"]
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port), app],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)
        url = f"http://127.0.0.1:{port}/api/events"
        wrk(url, 32, 3, manifest=snippets)
        return wrk(url, 32, seconds, manifest=snippets)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


#: Event rows per COPY of the denominator (a few seconds at this machine's rate).
COPY_ROWS = 100_000
#: HTTP requests wrk may cut off in flight, per connection: their events may be stored unacked.
BATCH = 100


def histograms(before: promstats.Scrape, after: promstats.Scrape) -> dict[str, str]:
    """The three histograms of one load, as text ("n/a" where the metric is absent)."""
    shown = {}
    for name in (
        "apex_gateway_coalesced_requests",
        "apex_group_commit_requests",
        "apex_group_commit_rows",
    ):
        found = promstats.between(before, after, name)
        shown[name] = "n/a (no such metric)" if found is None else str(found)
    return shown


@dataclass
class Figures:
    """Everything one run measured."""

    seconds: int
    snippet: Load
    snippet4: Load
    idle: Load
    batch: Load
    direct: grpc_load.GrpcLoad
    flask_before: Load
    flask_after: Load
    floor: Load
    copy_before: float
    copy_after: float
    copy_today: float
    hists: dict[str, dict[str, str]]
    peak_mb: float
    peak_pss_mb: float
    topology: str
    peak_by_phase: dict[str, float]

    @property
    def flask_rate(self) -> float:
        """The snippet's denominator: the mean of the bare-Flask loads just before and just
        after the 32-connection snippet load (the machine drifts within a run)."""
        return (self.flask_before.requests_per_s + self.flask_after.requests_per_s) / 2

    @property
    def copy(self) -> float:
        """The denominator: the mean of the COPYs just before and just after the batch loads."""
        return (self.copy_before + self.copy_after) / 2


def report(f: Figures) -> bool:
    """Print the run's figures, ratios and sizing rows; True if every target is met."""
    cores = os.cpu_count() or 1
    snippet_ratio = f.snippet.requests_per_s / f.flask_rate
    implied_ms = 1000 * 32 / f.snippet.requests_per_s  # Little's law: 32 in flight
    tail_ratio = f.snippet.p99_ms / implied_ms
    batch_events = f.batch.requests_per_s * BATCH
    batch_ratio = batch_events / f.copy
    direct_ratio = f.direct.events_per_s / f.copy
    floor_ratio = f.floor.requests_per_s / f.flask_rate
    n = f"{cores} cores, {f.seconds} s per load"
    print(f"\n=== Apex Ingest benchmark (apex-ingest serve on PostgreSQL, {n}) ===")
    print("-- snippet: 1-event requests, HTTP -> gateway -> gRPC -> PostgreSQL commit --")
    for label, load in (("32 conn", f.snippet), ("4 conn ", f.snippet4), ("1 conn ", f.idle)):
        print(
            f"snippet 1-event, {label}: {load.requests_per_s:7.0f} req/s  p50 {load.p50_ms:.1f} ms"
            f"  p99 {load.p99_ms:.1f} ms  non-200 {load.other}  socket errors {load.socket_errors}"
        )
    before, after = f.flask_before.requests_per_s, f.flask_after.requests_per_s
    print(
        f"baseline bare Flask/granian x2, 32 conn: {f.flask_rate:7.0f} req/s, the mean of"
        f" {before:.0f} just before the snippet load and {after:.0f} just after"
        f" ({abs(before - after) / max(before, after):.0%} apart: the machine's drift),"
        f" p99 {f.flask_before.p99_ms:.1f} / {f.flask_after.p99_ms:.1f} ms"
    )
    print(
        f"  ratio {snippet_ratio:.2f} = {f.snippet.requests_per_s:.0f} /"
        f" {f.flask_rate:.0f} req/s (target >= 0.25, stretch 0.30)"
    )
    print(
        f"  32 conn tail: p99 {f.snippet.p99_ms:.1f} ms / mean implied by throughput"
        f" (32 / {f.snippet.requests_per_s:.0f} req/s = {implied_ms:.1f} ms) ="
        f" {tail_ratio:.2f} (target <= 2)"
    )
    print(f"  4 conn: p99 {f.snippet4.p99_ms:.1f} ms (target <= 10 ms)")
    print(
        f"  1 conn, otherwise idle service: p50 {f.idle.p50_ms:.1f} ms"
        " (target: no worse than before coalescing, 2.5-7 ms here)"
    )
    print(
        f"floor: Flask/granian x2 + 1 gRPC call to an empty server: {f.floor.requests_per_s:7.0f}"
        f" req/s  p99 {f.floor.p99_ms:.1f} ms"
    )
    print(
        f"  = {floor_ratio:.2f} of bare Flask (one gRPC call per request, nothing else); the full"
        f" path reaches {f.snippet.requests_per_s / f.floor.requests_per_s:.2f} of it"
    )
    print("-- batches: realistic 100-event bodies (bench/events.py) --")
    print(
        f"batch over HTTP, 16 conn       : {batch_events:7.0f} events/s"
        f"  ({f.batch.requests_per_s:.0f} req/s, p50 {f.batch.p50_ms:.1f} ms,"
        f" p99 {f.batch.p99_ms:.1f} ms, non-200 {f.batch.other})"
    )
    d = f.direct
    failures = f"{sum(d.failed.values())}" + (f" {d.failed}" if d.failed else "")
    print(
        f"gRPC direct, {grpc_load.PROCESSES} proc x {grpc_load.THREADS} threads:"
        f" {d.events_per_s:7.0f} events/s acknowledged ({d.calls} calls, p50 {d.p50_ms:.1f} ms,"
        f" p99 {d.p99_ms:.1f} ms, failed {failures},"
        f" the clients used {d.client_cpu_s / d.seconds:.2f} cores)"
    )
    print(
        f"denominator: COPY into {frozen.TABLE} (today's events schema, frozen):"
        f" {f.copy:7.0f} rows/s, the mean of {f.copy_before:.0f} just before the batch loads"
        f" and {f.copy_after:.0f} just after ({abs(f.copy_after - f.copy_before) / f.copy:.0%}"
        " apart: the machine's noise in this run)"
    )
    print(
        f"  HTTP ratio {batch_ratio:.2f} = {batch_events:.0f} / {f.copy:.0f} events/s"
        " (target >= 0.50)"
    )
    print(
        f"  gRPC direct ratio {direct_ratio:.2f} = {d.events_per_s:.0f} / {f.copy:.0f} events/s"
        " (target >= 0.60, stretch 0.70)"
    )
    print(
        f"  (info) COPY into events as the migrations build it now, rolled back:"
        f" {f.copy_today:.0f} rows/s = {f.copy_today / f.copy:.2f} of the frozen denominator"
    )
    print("-- coalescing and group commit, per load (/metrics, scraped between loads) --")
    for phase, shown in f.hists.items():
        print(f"{phase}:")
        print(
            f"  HTTP requests per coalesced gRPC call: {shown['apex_gateway_coalesced_requests']}"
        )
        print(f"  requests per group commit            : {shown['apex_group_commit_requests']}")
        print(f"  rows per group commit                : {shown['apex_group_commit_rows']}")
    phases = ", ".join(f"{name} {mb:.0f}" for name, mb in f.peak_by_phase.items())
    print(
        f"peak RSS of all service processes: {f.peak_mb:.0f} MB (target < 400 MB;"
        f" peak per load: {phases}); summed PSS {f.peak_pss_mb:.0f} MB"
    )
    print(f"-- sizing: rows for docs/deploy.md's Sizing table (this run, {n}) --")
    print(
        f"| `serve` on {cores} cores, PostgreSQL on the same machine ({f.topology})"
        f" | {f.snippet.requests_per_s:.0f}"
        f" | {batch_events:.0f} over HTTP | snippet: {f.snippet.p99_ms:.0f} ms at 32 connections,"
        f" {f.snippet4.p99_ms:.0f} ms at 4, p50 {f.idle.p50_ms:.1f} ms at 1; batches:"
        f" {f.batch.p99_ms:.0f} ms at 16 |"
    )
    print(
        f"| internal callers over gRPC, same machine ({grpc_load.PROCESSES * grpc_load.THREADS}"
        f" threads; their CPU included) | | {d.events_per_s:.0f} | {d.p99_ms:.0f} ms |"
    )
    print(
        f"| PostgreSQL `COPY`, today's `events` schema (frozen), {cores} cores | | {f.copy:.0f} | |"
    )
    print(
        f"| bare Flask/granian x2, no work (the HTTP ceiling here) |"
        f" {f.flask_rate:.0f} | | {max(f.flask_before.p99_ms, f.flask_after.p99_ms):.0f} ms |"
    )
    print(
        f"{cores} cores, in words: snippet {f.snippet.requests_per_s:.0f} req/s at p99"
        f" {f.snippet.p99_ms:.0f} ms (32 connections), {f.snippet4.p99_ms:.0f} ms at 4;"
        f" batches {batch_events:.0f} events/s over HTTP, {d.events_per_s:.0f} over gRPC"
    )
    targets = {
        "snippet ratio >= 0.25": snippet_ratio >= 0.25,
        "32 conn p99 <= 2x implied mean": tail_ratio <= 2,
        "4 conn p99 <= 10 ms": f.snippet4.p99_ms <= 10,
        "1 conn p50 <= 7 ms": f.idle.p50_ms <= 7,
        "HTTP batch ratio >= 0.50": batch_ratio >= 0.50,
        "gRPC direct ratio >= 0.60": direct_ratio >= 0.60,
        "RSS < 400 MB": f.peak_mb < 400,
        "no refusals": f.snippet.other == f.snippet4.other == f.idle.other == f.batch.other == 0
        and not d.failed,
    }
    missed = [name for name, ok in targets.items() if not ok]
    print(f"targets missed: {', '.join(missed)}" if missed else "every throughput target met")
    return not missed


#: `--enrichment-compare`: what enrichment costs the whole service (issue #19).
ENRICHMENT = ("APEX_ENRICHMENT", "1", "0")


def parse_compare(spec: str) -> tuple[str, str, str]:
    """`NAME=A,B` (e.g. `APEX_HTTP_WORKERS=1,2`, or glibc's `MALLOC_ARENA_MAX=2,16`) ->
    (NAME, A, B)."""
    name, _, values = spec.partition("=")
    first, _, second = values.partition(",")
    if not name.startswith(("APEX_", "MALLOC_")) or not first or not second or "," in second:
        raise argparse.ArgumentTypeError(f"expected APEX_NAME=A,B or MALLOC_NAME=A,B, not {spec!r}")
    return name, first, second


def compare(seconds: int, rounds: int, loads: list[str], variable: tuple[str, str, str]) -> int:
    """One setting's two values A/B on the whole service: two services side by side on one
    database, one with NAME=A, one with NAME=B, loaded in turn (the order alternating each
    round, so that a drift of the machine favours neither), `rounds` runs of `seconds` each
    per value and load; prints the medians, their ratio (A over B) and the difference in
    service time per event (issue #19: single runs vary by ±40 %, medians of at least 5
    each)."""
    setting, value_a, value_b = variable
    python = sys.executable
    name = f"apex_bench_{uuid.uuid4().hex[:8]}"
    admin = libpq(ADMIN_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    base_env = {
        **os.environ,
        "APEX_DATABASE_URL": database_url,
        "APEX_RATE_LIMIT": "1000000/second",
        "APEX_LOG_LEVEL": "WARNING",
    }
    services: dict[str, subprocess.Popen[bytes]] = {}
    bodies = tempfile.TemporaryDirectory(prefix="apex-bench-")
    started = time.monotonic()
    try:
        subprocess.run(
            [python, "-m", "apex_ingest", "db", "upgrade"],
            env=base_env,
            check=True,
            capture_output=True,
        )
        key = subprocess.run(
            [python, "-m", "apex_ingest", "projects", "create", "bench"],
            env=base_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        directory = Path(bodies.name)
        manifests = {"batch": write_manifest(directory, events.batches(8), key)}
        manifests["snippet"] = write_snippet_manifest(directory, key)
        manifests["snippet4"] = manifests["snippet1"] = manifests["snippet"]
        urls, grpc_targets = {}, {}
        for mode in (value_a, value_b):
            http_port, grpc_port = free_port(), free_port()
            grpc_targets[mode] = f"127.0.0.1:{grpc_port}"
            env = {
                **base_env,
                "APEX_HTTP_PORT": str(http_port),
                "APEX_GRPC_PORT": str(grpc_port),
                setting: mode,
            }
            services[mode] = subprocess.Popen(
                [python, "-m", "apex_ingest", "serve"], env=env, start_new_session=True
            )
            urls[mode] = f"http://127.0.0.1:{http_port}/api/events"
            wait_http(f"http://127.0.0.1:{http_port}/healthz")
        print(f"services up after {time.monotonic() - started:.1f} s", flush=True)
        samplers = {mode: RssSampler(service.pid) for mode, service in services.items()}
        for sampler in samplers.values():
            sampler.start()
        connections = {"snippet": 32, "snippet4": 4, "snippet1": 1, "batch": 16}
        # gRPC direct counts events/s (its "request" is one event); the others requests/s.
        per_request = {"snippet": 1, "snippet4": 1, "snippet1": 1, "batch": BATCH, "grpc": 1}

        def run_one(mode: str, load: str, seconds: int) -> tuple[float, float, float]:
            if load == "grpc":
                direct = grpc_load.run_load(grpc_targets[mode], key, seconds)
                return direct.events_per_s, direct.p50_ms, direct.p99_ms
            result = wrk(urls[mode], connections[load], seconds, manifest=manifests[load])
            return result.requests_per_s, result.p50_ms, result.p99_ms

        for mode in (value_a, value_b):  # warm-up: caches, pools, the parser's rules
            for load in loads:
                run_one(mode, load, 1)
        rates: dict[tuple[str, str], list[float]] = {}
        p50s: dict[tuple[str, str], list[float]] = {}
        p99s: dict[tuple[str, str], list[float]] = {}
        print(f"warmed up after {time.monotonic() - started:.1f} s", flush=True)
        for index in range(rounds):
            order = (value_a, value_b) if index % 2 == 0 else (value_b, value_a)
            for mode in order:
                for load in loads:
                    rate, p50, p99 = run_one(mode, load, seconds)
                    rates.setdefault((mode, load), []).append(rate)
                    p50s.setdefault((mode, load), []).append(p50)
                    p99s.setdefault((mode, load), []).append(p99)
        print(
            f"{setting}={value_a} vs {value_b}: {rounds} interleaved runs of {seconds} s each, "
            "medians"
        )
        for load in loads:
            a = statistics.median(rates[value_a, load])
            b = statistics.median(rates[value_b, load])
            cost_us = (1 / (a * per_request[load]) - 1 / (b * per_request[load])) * 1e6
            unit = "events/s" if load == "grpc" else "req/s"
            print(
                f"  {load:8} {value_a} {a:9.1f} {unit}  {value_b} {b:9.1f} {unit}"
                f"  ratio {a / b:.3f}  {value_a} costs {cost_us:+.2f} µs of service time per"
                f" event  (runs {value_a}: {', '.join(f'{r:.0f}' for r in rates[value_a, load])};"
                f" {value_b}: {', '.join(f'{r:.0f}' for r in rates[value_b, load])})"
            )
            print(
                f"  {'':8} p50 {value_a} {statistics.median(p50s[value_a, load]):.1f} ms"
                f"  {value_b} {statistics.median(p50s[value_b, load]):.1f} ms,"
                f" p99 {value_a} {statistics.median(p99s[value_a, load]):.1f} ms"
                f"  {value_b} {statistics.median(p99s[value_b, load]):.1f} ms (medians)"
            )
        print(
            f"  peak RSS (PSS) of all service processes: {value_a}"
            f" {samplers[value_a].peak_mb:.0f} ({samplers[value_a].peak_pss_mb:.0f}) MB"
            f"  {value_b} {samplers[value_b].peak_mb:.0f} ({samplers[value_b].peak_pss_mb:.0f}) MB"
        )
        return 0
    finally:
        for service in services.values():
            if service.poll() is None:
                os.killpg(service.pid, signal.SIGTERM)
        for service in services.values():
            try:
                service.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)
        bodies.cleanup()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument(
        "--enrichment-compare",
        action="store_true",
        help="only compare the service with enrichment on and off (interleaved runs; "
        "--compare APEX_ENRICHMENT=1,0)",
    )
    parser.add_argument(
        "--compare",
        type=parse_compare,
        metavar="APEX_NAME=A,B",
        help="only compare two values of one setting (interleaved runs), e.g. "
        "APEX_HTTP_WORKERS=1,2 (or glibc's MALLOC_ARENA_MAX=2,16)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="runs per value (--compare)")
    parser.add_argument(
        "--loads",
        default="snippet,batch",
        help="comma-separated loads for --compare: snippet (32 connections), snippet4 (4),"
        " snippet1 (1), batch, grpc (gRPC direct, events/s)",
    )
    parser.add_argument(
        "--no-stream", action="store_true", help="Skip stream mode (bench/stream_mode.py)."
    )
    parser.add_argument(
        "--stream-only",
        action="store_true",
        help="Only stream mode, without direct mode's figures to compare with (a smoke run).",
    )
    args = parser.parse_args()
    if args.enrichment_compare or args.compare:
        variable = args.compare or ENRICHMENT
        return compare(args.seconds, args.rounds, args.loads.split(","), variable)
    seconds = args.seconds
    python = sys.executable
    name = f"apex_bench_{uuid.uuid4().hex[:8]}"
    admin = libpq(ADMIN_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "APEX_DATABASE_URL": database_url,
        "APEX_HTTP_PORT": str(http_port),
        "APEX_GRPC_PORT": str(grpc_port),
        "APEX_RATE_LIMIT": "1000000/second",
        "APEX_LOG_LEVEL": "WARNING",
    }
    service = None
    bodies = tempfile.TemporaryDirectory(prefix="apex-bench-")
    try:
        subprocess.run(
            [python, "-m", "apex_ingest", "db", "upgrade"], env=env, check=True, capture_output=True
        )
        key = subprocess.run(
            [python, "-m", "apex_ingest", "projects", "create", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        with psycopg.connect(libpq(database_url)) as conn:
            project_id = conn.execute("SELECT id FROM projects").fetchone()[0]  # type: ignore[index]
        # 8 realistic 100-event batches over HTTP (cycled, fresh ids per request); the gRPC
        # clients build theirs the same way (other seeds), COPY takes these 8 batches' events.
        pool = events.batches(8)
        manifest = write_manifest(Path(bodies.name), pool, key)
        snippets = write_snippet_manifest(Path(bodies.name), key)

        if args.stream_only:
            alone = _stream_mode(python, env, key, manifest, snippets, seconds, database_url)
            stream_mode.report(alone, None, None, None)
            return 0 if alone.acked_events <= alone.stored_events else 1

        service = subprocess.Popen(
            [python, "-m", "apex_ingest", "serve"], env=env, start_new_session=True
        )
        wait_http(f"http://127.0.0.1:{http_port}/healthz")
        serving = topology(service.pid)
        sampler = RssSampler(service.pid)
        sampler.phase = "idle"
        sampler.start()
        time.sleep(1)
        url = f"http://127.0.0.1:{http_port}/api/events"
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
        sampler.phase = "warm-up"
        wrk(url, 32, 3, manifest=snippets)  # warm-up: caches, pools, page cache
        wrk(url, 16, 2, manifest=manifest)
        time.sleep(1)  # the warm-up's last requests (cut off by wrk) finish storing first
        warm_stored = stored_events(database_url)[0]

        scrapes = [promstats.scrape(metrics_url)]

        def scraped() -> tuple[promstats.Scrape, promstats.Scrape]:
            time.sleep(0.5)  # requests cut off by wrk finish (their commits are observed)
            scrapes.append(promstats.scrape(metrics_url))
            return scrapes[-2], scrapes[-1]

        # The snippet's denominator, measured right before and right after its load (the
        # service idle meanwhile), then the floor, as the batches' COPY is.
        flask_before = granian_load(python, "bench.baseline_app:app", snippets, seconds)
        sampler.phase = "snippet"
        snippet = wrk(url, 32, seconds, manifest=snippets)
        snippet_hist = histograms(*scraped())
        flask_after = granian_load(python, "bench.baseline_app:app", snippets, seconds)
        floor = _floor(python, snippets, seconds)
        scraped()
        snippet4 = wrk(url, 4, seconds, manifest=snippets)
        snippet4_hist = histograms(*scraped())
        time.sleep(1)
        idle = wrk(url, 1, seconds, manifest=snippets, threads=1)
        scraped()
        # The denominator is measured right before and right after the batch loads (the
        # service idle meanwhile), so that it sees the machine as the loads did.
        conninfo = libpq(database_url)
        sampler.phase = "COPY"
        copy_before = frozen.frozen_copy_rate(conninfo, pool, project_id, COPY_ROWS)
        sampler.phase = "batch over HTTP"
        batch = wrk(url, 16, seconds, manifest=manifest)
        batch_hist = histograms(*scraped())
        sampler.phase = "gRPC direct"
        direct = grpc_load.run_load(f"127.0.0.1:{grpc_port}", key, seconds)
        direct_hist = histograms(*scraped())
        sampler.phase = "COPY"
        copy_after = frozen.frozen_copy_rate(conninfo, pool, project_id, COPY_ROWS)
        copy_today = frozen.copy_rate(
            conninfo, "events", frozen.copy_rows(pool, project_id, COPY_ROWS), COPY_ROWS, False
        )
        sampler.stopped.set()
        time.sleep(1)
        stored, distinct = stored_events(database_url)
        stored -= warm_stored
        distinct -= warm_stored
        snippet_ok = snippet.ok + snippet4.ok + idle.ok
        acked = snippet_ok + batch.ok * BATCH + direct.events
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(60)
        service = None
        stream = (
            None
            if args.no_stream
            else _stream_mode(python, env, key, manifest, snippets, seconds, database_url)
        )

        # wrk stops with requests in flight: those may be stored without being counted as
        # acked (so may gRPC calls that failed). So: acked <= stored <= acked + in flight.
        in_flight = 32 + 4 + 1 + 16 * BATCH + sum(direct.failed.values()) * BATCH
        consistent = acked <= stored <= acked + in_flight and stored == distinct
        met = report(
            Figures(
                seconds=seconds,
                snippet=snippet,
                snippet4=snippet4,
                idle=idle,
                batch=batch,
                direct=direct,
                flask_before=flask_before,
                flask_after=flask_after,
                floor=floor,
                copy_before=copy_before,
                copy_after=copy_after,
                copy_today=copy_today,
                hists={
                    "snippet, 32 conn": snippet_hist,
                    "snippet, 4 conn": snippet4_hist,
                    "batch over HTTP": batch_hist,
                    "gRPC direct": direct_hist,
                },
                peak_mb=sampler.peak_mb,
                peak_pss_mb=sampler.peak_pss_mb,
                topology=serving,
                peak_by_phase=dict(sampler.phases),
            )
        )
        print(
            f"acked events {acked}, stored {stored}, distinct {distinct}"
            f" -> {'OK (acked <= stored, no duplicates)' if consistent else 'MISMATCH'}"
        )
        if stream is not None:
            met = (
                stream_mode.report(
                    stream,
                    snippet.requests_per_s,
                    batch.requests_per_s * BATCH,
                    direct.events_per_s,
                    (copy_before + copy_after) / 2,
                )
                and met
            )
        print("all targets met" if met and consistent else "some targets NOT met")
        return 0 if consistent else 1
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        bodies.cleanup()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _floor(python: str, snippets: Path, seconds: int) -> Load:
    """The same Flask-on-granian gateway shape making one gRPC call per request to a server
    that does nothing (bench/floor_app.py): the best that shape allows."""
    echo_address = f"127.0.0.1:{free_port()}"
    echo = subprocess.Popen(
        [python, "-m", "bench.grpc_ceiling", "--serve", "sync", "--address", echo_address],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        return granian_load(
            python, "bench.floor_app:app", snippets, seconds, {"APEX_GRPC_TARGET": echo_address}
        )
    finally:
        os.killpg(echo.pid, signal.SIGTERM)
        echo.wait(30)


def _stream_mode(
    python: str,
    env: dict[str, str],
    key: str,
    manifest: Path,
    snippets: Path,
    seconds: int,
    database_url: str,
) -> stream_mode.StreamFigures:
    return stream_mode.run_stream_mode(
        python=python,
        env=env,
        key=key,
        manifest=manifest,
        seconds=seconds,
        stored_events=lambda: stored_events(database_url)[0],
        wrk=wrk,
        snippets=snippets,
        free_port=free_port,
        wait_http=wait_http,
        batch_size=BATCH,
    )


if __name__ == "__main__":
    sys.exit(main())
