"""The write path alone (issue #21 item 5): the once-only insert against COPY, interleaved.

Four ways of writing the same kind of rows (realistic events: a `data` object with strings,
numbers and an array, a user agent, `--repeats` of them (1 % by default) repeating earlier ids),
each by 2 connections at once in groups of 800 rows (what the group-commit writers send under
load), round after round:

- copy: COPY straight into `events` of the schema as of migration 0004 (no dedup): the
  denominator, frozen as issue #21 asks, so that a lighter schema counts as a gain;
- before: the statement storage.py had before issue #21 (DISTINCT ON) on the schema of 0004;
- statement: storage.py's statement that skips stored ids (the rows as one JSON parameter) on
  today's schema, for every group;
- write_rows: what the writers do today (storage.write_rows): COPY, and that statement only for
  a group holding a stored id. With 1 % of rows repeating, nearly every 800-row group holds one
  (its worst case); `--repeats 0` measures the common case.

Each round's rates are divided by that round's COPY rate. Backend CPU per row is read from
/proc (PostgreSQL on this machine). Run: `.venv/bin/python -m bench.write_path [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from apex_ingest.ops.migrate import upgrade
from apex_ingest.server import storage

ADMIN_URL = os.environ.get(
    "APEX_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: The columns `events` had as of migration 0004 (enrichment's came with 0008): what copy and
#: before write; statement and write_rows write today's columns, enrichment's included.
OLD_COLUMNS = storage._COLUMNS[: storage.COLUMN_NAMES.index("user_agent") + 1]
NAMES = [name for name, _ in OLD_COLUMNS]
COLUMNS = ", ".join(NAMES)
ARRAYS = [f"%b::{pg_type}[]" for _, pg_type in OLD_COLUMNS]
#: storage.py's statement before issue #21 item 5, verbatim.
BEFORE_SQL = (
    f"WITH input AS (SELECT * FROM unnest({', '.join(ARRAYS)}) WITH ORDINALITY "
    f"AS i({COLUMNS}, ord)), "
    "new_ids AS (INSERT INTO event_ids (project_id, event_id, received_at, occurred_at) "
    "SELECT project_id, event_id, received_at, occurred_at FROM input "
    "ORDER BY project_id, event_id, ord "
    "ON CONFLICT DO NOTHING RETURNING project_id, event_id) "
    f"INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM ("
    "SELECT DISTINCT ON (i.project_id, i.event_id) i.* FROM input i JOIN new_ids n "
    "ON n.project_id = i.project_id AND n.event_id = i.event_id "
    "ORDER BY i.project_id, i.event_id, i.ord) AS fresh ORDER BY ord"
)
UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
PROJECTS = 10
#: What enrichment derives for a desktop Chrome pageview (docs/enrichment.md).
ENRICHMENT: dict[str, Any] = {
    "client_occurred_at": None,
    "clock_skew_ms": None,
    "browser": "Chrome",
    "browser_version": "131.0.0",
    "os": "Windows",
    "device_class": "desktop",
    "is_bot": False,
    "utm_source": "news",
    "utm_medium": None,
    "utm_campaign": None,
    "utm_term": None,
    "utm_content": None,
    "gclid": None,
    "fbclid": None,
    "referrer_host": None,
    "referrer_class": "direct",
    "country": None,
}
Row = dict[str, Any]


def make_groups(seed: int, rows: int, group: int, repeats: float = 0.01) -> list[list[Row]]:
    rnd = random.Random(seed)
    now = datetime.now(UTC)
    seen: list[tuple[int, str]] = []
    groups = []
    for g in range(max(1, rows // group)):
        received = now + timedelta(milliseconds=g)
        batch: list[Row] = []
        for _ in range(group):
            server_batch = rnd.random() < 0.3  # server batches: a user_id, often no visitor_id
            slug = rnd.choice(["running-shoes", "rain-jacket", "espresso-machine", "yoga-mat"])
            project_id, event_id = rnd.randint(1, PROJECTS), uuid.uuid4().hex
            if seen and rnd.random() < repeats:
                project_id, event_id = rnd.choice(seen)
            batch.append(
                {
                    "project_id": project_id,
                    "event_id": event_id,
                    "type": rnd.choice(["pageview"] * 5 + ["click", "purchase", "signup"]),
                    "visitor_id": None
                    if server_batch and rnd.random() < 0.5
                    else f"v_{rnd.getrandbits(64):016x}",
                    "user_id": f"u_{rnd.randint(1, 20000)}" if server_batch else None,
                    "url": f"https://shop.example.com/products/{slug}?utm_source=news",
                    "referrer": rnd.choice([None, "https://www.google.com/"]),
                    "data": json.dumps(
                        {
                            "title": slug.replace("-", " ").title(),
                            "qty": rnd.randint(1, 5),
                            "price": f"{rnd.randint(1, 500)}.{rnd.randint(0, 99):02d}",
                            "tags": rnd.sample(["sale", "new", "popular", "eco", "gift"], 3),
                            "cart": {"id": f"c_{rnd.getrandbits(40):010x}", "currency": "EUR"},
                        }
                    ),
                    "occurred_at": received - timedelta(seconds=rnd.random() * 60),
                    "received_at": received,
                    "ip": f"203.0.113.{rnd.randint(1, 254)}",
                    "user_agent": UA,
                    **ENRICHMENT,
                }
            )
        seen.extend((row["project_id"], row["event_id"]) for row in batch)
        groups.append(batch)
    return groups


def write_copy(connection: psycopg.Connection[Any], rows: list[Row]) -> None:
    with (
        connection.transaction(),
        connection.cursor().copy(f"COPY events ({COLUMNS}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row([row[name] for name in NAMES])


def write_before(connection: psycopg.Connection[Any], rows: list[Row]) -> None:
    connection.execute(BEFORE_SQL, [[row[name] for row in rows] for name in NAMES])


def write_statement(connection: psycopg.Connection[Any], rows: list[Row]) -> None:
    rows = list(storage._first_of_each_id(rows))
    connection.execute(storage._PG_INSERT_DRIVER, storage._parameters(rows))


#: method -> (its database, how it writes). Each has a database of its own, so that all
#: tables grow alike from round to round; copy and before write the schema of 0004.
METHODS: dict[str, tuple[str, Callable[[psycopg.Connection[Any], list[Row]], None]]] = {
    "copy": ("copy", write_copy),
    "before": ("before", write_before),
    "statement": ("statement", write_statement),
    "write_rows": ("write_rows", storage.write_rows),
}
OLD_SCHEMA = ("copy", "before")


def _worker(
    conninfo: str,
    method: str,
    seed: int,
    rows: int,
    group: int,
    repeats: float,
    barrier: Any,
    out: Any,
) -> None:
    groups = make_groups(seed, rows, group, repeats)
    write = METHODS[method][1]
    with psycopg.connect(conninfo, autocommit=True) as connection:
        pid = connection.info.backend_pid

        def backend_cpu() -> float:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        barrier.wait()
        cpu, started = backend_cpu(), time.perf_counter()
        for batch in groups:
            write(connection, batch)
        out.put((started, time.perf_counter(), len(groups) * group, backend_cpu() - cpu))


def trial(
    conninfo: str, method: str, seed: int, rows: int, group: int, conc: int, repeats: float
) -> tuple[float, float]:
    """(rows/s, backend µs per row) of `conc` connections writing `rows` rows each."""
    context = mp.get_context("fork")
    barrier, out = context.Barrier(conc), context.Queue()
    workers = [
        context.Process(
            target=_worker,
            args=(conninfo, method, seed * 100 + n, rows, group, repeats, barrier, out),
        )
        for n in range(conc)
    ]
    for worker in workers:
        worker.start()
    results = [out.get() for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"{method}: a worker failed")
    total = sum(r[2] for r in results)
    seconds = max(r[1] for r in results) - min(r[0] for r in results)
    return total / seconds, 1e6 * sum(r[3] for r in results) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20_000, help="per connection per trial")
    parser.add_argument("--group", type=int, default=800)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--repeats", type=float, default=0.01, help="share of repeated ids")
    args = parser.parse_args()
    admin = make_url(ADMIN_URL)
    suffix = uuid.uuid4().hex[:8]
    databases = {method: f"apex_wp_{method}_{suffix}" for method in METHODS}
    admin_info = (
        f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    )
    with psycopg.connect(admin_info, autocommit=True) as connection:
        for name in databases.values():
            connection.execute(f'CREATE DATABASE "{name}"')
    try:
        for schema, name in databases.items():
            url = admin.set(database=name).render_as_string(hide_password=False)
            upgrade(url, "0004" if schema in OLD_SCHEMA else "head")
            with psycopg.connect(
                admin_info.replace(f"dbname={admin.database}", f"dbname={name}"), autocommit=True
            ) as connection:
                connection.execute(
                    "INSERT INTO projects (key, name, allowed_origins, created_at) "
                    "SELECT 'k' || g, 'p' || g, '[]', now() FROM generate_series(1, %s) g",
                    (PROJECTS,),
                )
        results: dict[str, list[tuple[float, float, float]]] = {method: [] for method in METHODS}
        for round_number in range(args.rounds):
            order = list(METHODS)
            shift = round_number % len(order)
            order = order[shift:] + order[:shift]
            measured = {}
            for method in order:
                name = databases[METHODS[method][0]]
                conninfo = admin_info.replace(f"dbname={admin.database}", f"dbname={name}")
                seed = round_number * 10 + order.index(method)
                measured[method] = trial(
                    conninfo, method, seed, args.rows, args.group, args.connections, args.repeats
                )
            for method, (rate, us_per_row) in measured.items():
                results[method].append((rate, rate / measured["copy"][0], us_per_row))
            print(
                f"round {round_number + 1}: "
                + ", ".join(
                    f"{m} {r:,.0f} rows/s ({r / measured['copy'][0]:.2f}, {u:.1f} µs/row)"
                    for m, (r, u) in measured.items()
                ),
                flush=True,
            )
        print("\n| | rows/s (median, min-max) | ratio to COPY (median, min-max) | backend µs/row |")
        print("|---|---|---|---|")
        for method, values in results.items():
            rates, ratios, cpu = zip(*values, strict=True)
            median = statistics.median
            print(
                f"| {method} | {median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) "
                f"| {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {median(cpu):.1f} |"
            )
    finally:
        with psycopg.connect(admin_info, autocommit=True) as connection:
            for name in databases.values():
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
