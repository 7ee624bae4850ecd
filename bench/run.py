"""`make bench`: the full path against its baselines, in one run on one machine.

1. Snippet: 1-event requests through HTTP -> gateway -> gRPC -> PostgreSQL commit (32 connections),
   against a bare Flask JSON endpoint on granian with 2 workers, run right after.
2. Batch: 100-event requests (16 connections), against PostgreSQL's COPY rate for the same rows.
3. Memory: the summed RSS of every service process, sampled during the runs.
4. Acked vs stored: every acknowledged event must be in the database afterwards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

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


def wrk(url: str, body: bytes, connections: int, seconds: int) -> Load:
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t",
                "2",
                "-c",
                str(connections),
                "-d",
                f"{seconds}s",
                "--latency",
                "-s",
                str(ROOT / "bench" / "counts.lua"),
                url,
            ],
            env={**os.environ, "BENCH_BODY_FILE": body_file.name},
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
    """Sums the RSS of a process tree every 200 ms; keeps the peak."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.peak_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.peak_mb = max(self.peak_mb, self.sample())

    def sample(self) -> float:
        pids, children = [self.root_pid], {}
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(status.parent.name))
            except (OSError, IndexError):
                continue
        total, stack = 0, list(pids)
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, []))
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024


def snippet_body(key: str) -> bytes:
    return json.dumps(
        {
            "type": "pageview",
            "visitorId": "v_bench",
            "projectKey": key,
            "url": "https://example.com/pricing",
            "referrer": "https://google.com/",
            "data": {"plan": "pro", "seats": 3},
        }
    ).encode()


def batch_body(key: str, size: int = 100) -> bytes:
    events = [
        {
            "type": "purchase",
            "url": "/checkout",
            "visitorId": f"v{i}",
            "data": {"amount": 49.9, "items": i, "sku": "ABC-123"},
        }
        for i in range(size)
    ]
    return json.dumps({"projectKey": key, "userId": "user_bench", "events": events}).encode()


def copy_rate(database_url: str, project_id: int, rows: int = 200_000) -> float:
    """Events/s PostgreSQL takes by COPY into the same events table (same indexes)."""
    now = datetime.now(UTC).isoformat()
    data = io.StringIO()
    for i in range(rows):
        data.write(
            f"{project_id}\tcopy-{uuid.uuid4().hex}\tpurchase\tv{i % 100}\tuser_bench"
            f"\t/checkout\t\\N\t"
            f'{{"amount": 49.9, "items": {i % 100}, "sku": "ABC-123"}}'
            f"\t{now}\t{now}\t127.0.0.1\twrk\n"
        )
    text = data.getvalue()
    with psycopg.connect(libpq(database_url)) as conn:
        started = time.perf_counter()
        with conn.cursor().copy(
            "COPY events (project_id, event_id, type, visitor_id, user_id, url, referrer, data,"
            " occurred_at, received_at, ip, user_agent) FROM STDIN"
        ) as copy:
            copy.write(text)
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute("DELETE FROM events WHERE event_id LIKE 'copy-%'")
        conn.commit()
    return rows / elapsed


def stored_events(database_url: str) -> tuple[int, int]:
    with psycopg.connect(libpq(database_url)) as conn:
        total, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (project_id, event_id)) FROM events"
        ).fetchone()  # type: ignore[misc]
    return int(total), int(distinct)


def granian_load(
    python: str, app: str, key: str, seconds: int, env: dict[str, str] | None = None
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
        wrk(url, snippet_body(key), 32, 3)
        return wrk(url, snippet_body(key), 32, seconds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
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

        service = subprocess.Popen(
            [python, "-m", "apex_ingest", "serve"], env=env, start_new_session=True
        )
        wait_http(f"http://127.0.0.1:{http_port}/healthz")
        sampler = RssSampler(service.pid)
        sampler.start()
        url = f"http://127.0.0.1:{http_port}/api/events"
        wrk(url, snippet_body(key), 32, 3)  # warm-up: caches, pools, JIT-free but page cache
        time.sleep(1)  # the warm-up's last requests (cut off by wrk) finish storing first
        warm_stored = stored_events(database_url)[0]
        snippet = wrk(url, snippet_body(key), 32, args.seconds)
        batch = wrk(url, batch_body(key), 16, args.seconds)
        sampler.stopped.set()
        time.sleep(1)
        stored, distinct = stored_events(database_url)
        stored -= warm_stored
        distinct -= warm_stored
        acked = snippet.ok + batch.ok * 100
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(60)
        service = None

        flask_base = granian_load(python, "bench.baseline_app:app", key, args.seconds)
        # The floor: the same Flask-on-granian gateway shape making one gRPC call per request
        # to a server that does nothing (bench/floor_app.py): the best the architecture allows.
        echo_address = f"127.0.0.1:{free_port()}"
        echo = subprocess.Popen(
            [python, "-m", "bench.grpc_ceiling", "--serve", "sync", "--address", echo_address],
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            floor = granian_load(
                python, "bench.floor_app:app", key, args.seconds, {"APEX_GRPC_TARGET": echo_address}
            )
        finally:
            os.killpg(echo.pid, signal.SIGTERM)
            echo.wait(30)
        copy = copy_rate(database_url, project_id)

        snippet_ratio = snippet.requests_per_s / flask_base.requests_per_s
        batch_events = batch.requests_per_s * 100
        batch_ratio = batch_events / copy
        print("\n=== Apex Ingest benchmark (apex-ingest serve on PostgreSQL) ===")
        print(
            f"snippet 1-event, 32 conn : {snippet.requests_per_s:9.0f} req/s  "
            f"p50 {snippet.p50_ms:.1f} ms  p99 {snippet.p99_ms:.1f} ms  non-200 {snippet.other}"
            f"  socket errors {snippet.socket_errors}"
        )
        print(
            f"baseline bare Flask/granian x2: {flask_base.requests_per_s:9.0f} req/s  "
            f"p99 {flask_base.p99_ms:.1f} ms"
        )
        print(f"  ratio {snippet_ratio:.2f} (target >= 0.30), p99 target < 25 ms")
        floor_ratio = floor.requests_per_s / flask_base.requests_per_s
        print(
            f"floor: Flask/granian x2 + 1 gRPC call to an empty server: {floor.requests_per_s:9.0f}"
            f" req/s  p99 {floor.p99_ms:.1f} ms"
        )
        print(
            f"  = {floor_ratio:.2f} of bare Flask (no gateway of this shape can beat it); the full"
            f" path reaches {snippet.requests_per_s / floor.requests_per_s:.2f} of the floor"
        )
        print(
            f"batch 100-event, 16 conn : {batch_events:9.0f} events/s  ({batch.requests_per_s:.0f}"
            f" req/s, p99 {batch.p99_ms:.1f} ms, non-200 {batch.other})"
        )
        print(f"baseline PostgreSQL COPY : {copy:9.0f} events/s")
        print(f"  ratio {batch_ratio:.2f} (target >= 0.50)")
        print(f"peak RSS of all service processes: {sampler.peak_mb:.0f} MB (target < 400 MB)")
        # wrk stops with requests in flight: those may be stored without being counted as
        # acked. So: acked <= stored <= acked + what was in flight, and no duplicates.
        in_flight = 32 + 16 * 100
        consistent = acked <= stored <= acked + in_flight and stored == distinct
        print(
            f"acked events {acked}, stored {stored}, distinct {distinct}"
            f" -> {'OK (acked <= stored, no duplicates)' if consistent else 'MISMATCH'}"
        )
        targets = [
            snippet_ratio >= 0.30,
            snippet.p99_ms < 25,
            batch_ratio >= 0.50,
            sampler.peak_mb < 400,
            consistent,
            snippet.other == batch.other == 0,
        ]
        print("all targets met" if all(targets) else "some targets NOT met")
        return 0 if consistent else 1
    finally:
        if service is not None and service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
