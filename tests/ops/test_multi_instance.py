"""Two gateways and two gRPC servers sharing PostgreSQL and Redis, as behind a load balancer.

Each gateway reaches both gRPC servers through one channel (`ipv4:` list, round_robin), and
both keep their rate limits in Redis: a project's limit holds across gateways, and every
acknowledged event is stored exactly once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import create_engine, text

from tests.conftest import make_project
from tests.ops.support import scrape, value
from tests.service import free_port, logged_process

REDIS_URL = os.environ.get("APEX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LIMIT = 40
REQUESTS = 100


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis unreachable at {REDIS_URL}: {error}")
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {error}")
    yield client
    client.close()


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str]) -> Iterator[Path]:
    with logged_process(argv, env, prefix="apex-multi-") as (_, log_path):
        yield log_path


def _wait_healthy(url: str, logs: list[Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    dump = "\n".join(path.read_text(errors="replace") for path in logs)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s:\n{dump}")


@pytest.mark.postgres
def test_two_gateways_two_servers_share_limits_and_store_once(
    postgres_url: str, redis_client: redis.Redis
) -> None:
    key = make_project(postgres_url)
    grpc_ports = [free_port(), free_port()]
    http_ports = [free_port(), free_port()]
    metrics_ports = [free_port(), free_port()]
    base_env = {
        **os.environ,
        "APEX_DATABASE_URL": postgres_url,
        "APEX_HOST": "127.0.0.1",
        "APEX_PROJECT_CACHE_TTL": "0",
        "APEX_SHUTDOWN_DRAIN": "0.2",
    }
    base_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in grpc_ports)
    command = [sys.executable, "-m", "apex_ingest"]

    with contextlib.ExitStack() as stack:
        logs = []
        for grpc_port, metrics_port in zip(grpc_ports, metrics_ports, strict=True):
            env = {
                **base_env,
                "APEX_GRPC_PORT": str(grpc_port),
                "APEX_METRICS_PORT": str(metrics_port),
            }
            logs.append(stack.enter_context(_process([*command, "grpc", "--processes", "1"], env)))
        for http_port in http_ports:
            env = {
                **base_env,
                "APEX_HTTP_PORT": str(http_port),
                "APEX_GRPC_TARGET": target,
                "APEX_RATE_LIMIT": f"{LIMIT}/hour",
                "APEX_RATE_LIMIT_STORAGE": REDIS_URL,
            }
            logs.append(stack.enter_context(_process([*command, "gateway", "--workers", "1"], env)))
        for metrics_port in metrics_ports:
            _wait_healthy(f"http://127.0.0.1:{metrics_port}/metrics", logs)
        for http_port in http_ports:
            _wait_healthy(f"http://127.0.0.1:{http_port}/healthz", logs)

        def send(number: int) -> tuple[int, list[str]]:
            # Each request repeats the previous one's id: a retry that must not double-store.
            ids = [f"evt-{number}", f"evt-{number - 1}"]
            events = [{"type": "signup", "url": "/signup", "id": event_id} for event_id in ids]
            port = http_ports[number % 2]
            answer = requests.post(
                f"http://127.0.0.1:{port}/api/events",
                json={"projectKey": key, "events": events},
                timeout=10,
            )
            return answer.status_code, ids

        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(send, range(REQUESTS)))
            served = [
                value(
                    scrape(f"http://127.0.0.1:{p}/metrics"),
                    "apex_grpc_events_accepted_total",
                    project=key,
                )
                for p in metrics_ports
            ]
        finally:
            for redis_key in redis_client.scan_iter(match=f"*{key}*"):
                redis_client.delete(redis_key)

    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    # One budget for the project across both gateways (each alone would allow LIMIT).
    assert statuses.count(200) == LIMIT
    # Both gateways answered 200s, and both gRPC servers stored events (round robin).
    assert {number % 2 for number, (status, _) in enumerate(results) if status == 200} == {0, 1}
    assert all(count > 0 for count in served), served
    assert sum(served) == 2 * LIMIT

    acknowledged = {event_id for status, ids in results if status == 200 for event_id in ids}
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT event_id FROM events")).scalars().all()
    finally:
        engine.dispose()
    assert len(rows) == len(set(rows)), "an event was stored twice"
    assert set(rows) == acknowledged
