"""Faults under load against the real service on PostgreSQL: kill -9, storage down, gRPC gone,
SIGTERM. Each prints its figures (acked, stored, duplicates, partial batches, 5xx, recovery)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import make_project
from tests.reliability.support import (
    Load,
    assert_clean,
    grpc_children,
    healthz,
    judge,
    pg_address,
    proxied_url,
    record,
    service_env,
    spawn,
)
from tests.service import free_port, wait_for
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.reliability(slow=True), pytest.mark.postgres]


def base_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['APEX_HTTP_PORT']}"


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[TcpProxy]:
    tcp = TcpProxy(*pg_address(postgres_url))
    yield tcp
    tcp.close()


def test_kill_9_of_a_grpc_server_under_load(postgres_url: str) -> None:
    key = make_project(postgres_url)
    env = service_env(postgres_url)
    with spawn(["serve"], env) as service:
        url = base_url(env)
        assert wait_for(lambda: healthz(url) == 200, 30), service.output()
        victims = grpc_children(service.process.pid)
        assert len(victims) == 2, victims
        with Load(url, key, threads=6) as load:
            time.sleep(3)
            killed_at = time.monotonic()
            os.kill(victims[0], signal.SIGKILL)
            time.sleep(1.5)
            os.kill(victims[1], signal.SIGKILL)  # both: the second one mid-retry of the first
            restarted = wait_for(
                lambda: len(set(grpc_children(service.process.pid)) - set(victims)) == 2, 15
            )
            assert restarted is not None, "the supervisor did not restart the gRPC servers"
            time.sleep(3)
        failures = [a for a in load.attempts if a.status != 200 and a.start >= killed_at]
        recovery = max((a.end for a in failures), default=killed_at) - killed_at
        acked_after = [
            a for a in load.attempts if a.status == 200 and a.start > killed_at + 1.5 + restarted
        ]
        verdict = judge(postgres_url, load)
        record(
            "kill -9 gRPC servers under load",
            verdict,
            load,
            killed=2,
            restart_s=round(restarted + 1.5, 2),
            time_to_recover_s=round(recovery, 2),
        )
        assert_clean(verdict, load)
        assert acked_after, "no batch acked after the restart"
        assert {a.status for a in load.attempts} <= {200, 503, 504, 0}


def test_postgresql_down_under_load_then_back(postgres_url: str, proxy: TcpProxy) -> None:
    key = make_project(postgres_url)
    env = service_env(proxied_url(postgres_url, proxy.port))
    with spawn(["serve"], env) as service:
        url = base_url(env)
        assert wait_for(lambda: healthz(url) == 200, 30), service.output()
        with Load(url, key, threads=4) as load:
            time.sleep(2)
            cut_at = time.monotonic()
            proxy.cut()
            unhealthy = wait_for(lambda: healthz(url) == 503, 10)
            time.sleep(4)
            restored_at = time.monotonic()
            proxy.restore()
            healthy = wait_for(lambda: healthz(url) == 200, 30)
            time.sleep(2)
        during = [a for a in load.attempts if cut_at + 0.05 <= a.start and a.end <= restored_at]
        ok_during = [a for a in during if a.status == 200]
        slow = [a for a in during if a.end - a.start > 2.0]
        no_retry_after = [a for a in during if a.status == 503 and not a.retry_after]
        first_ok = min(
            (a.end for a in load.attempts if a.status == 200 and a.start >= restored_at),
            default=None,
        )
        verdict = judge(postgres_url, load)
        record(
            "PostgreSQL down under load, then back",
            verdict,
            load,
            requests_while_down=len(during),
            statuses_while_down=sorted({a.status for a in during}),
            max_latency_while_down_s=round(max((a.end - a.start for a in during), default=0), 2),
            healthz_503_after_s=unhealthy and round(unhealthy, 2),
            healthz_200_after_restore_s=healthy and round(healthy, 2),
            time_to_recover_s=first_ok and round(first_ok - restored_at, 2),
        )
        assert_clean(verdict, load)
        assert during, "no request was made while PostgreSQL was down"
        assert not ok_during, f"{len(ok_during)} requests got 200 while PostgreSQL was down"
        assert {a.status for a in during} == {503}, {a.status for a in during}
        assert not slow, f"{len(slow)} answers took over 2 s, e.g. {slow[0]}"
        assert not no_retry_after
        assert unhealthy is not None, "/healthz never answered 503"
        assert healthy is not None and first_ok is not None, "did not recover by itself"
        assert first_ok - restored_at < 15


def test_start_while_postgresql_is_down_then_recover(postgres_url: str, proxy: TcpProxy) -> None:
    key = make_project(postgres_url)
    proxy.cut()
    env = service_env(proxied_url(postgres_url, proxy.port))
    with spawn(["serve"], env) as service:
        url = base_url(env)
        up = wait_for(lambda: healthz(url) == 503, 30)
        assert up is not None, "the gateway did not come up while PostgreSQL was down\n" + (
            service.output()
        )
        body = {"projectKey": key, "events": [{"type": "x", "url": "/", "id": "start-1"}]}
        started = time.monotonic()
        answer = requests.post(f"{url}/api/events", json=body, timeout=10)
        latency = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert answer.headers.get("Retry-After")
        restored_at = time.monotonic()
        proxy.restore()
        recovered = wait_for(
            lambda: requests.post(f"{url}/api/events", json=body, timeout=10).status_code == 200,
            30,
            0.2,
        )
        record(
            "start while PostgreSQL is down, then restore",
            None,
            None,
            up_while_down_s=round(up, 2),
            status_while_down=answer.status_code,
            latency_while_down_s=round(latency, 2),
            time_to_recover_s=recovered and round(recovered, 2),
            five_hundreds=0,
        )
        assert latency < 2.0
        assert recovered is not None, "did not recover\n" + service.output()
        assert time.monotonic() - restored_at < 30


def test_gateway_without_its_grpc_server(postgres_url: str) -> None:
    key = make_project(postgres_url)
    grpc_port = free_port()
    env = service_env(
        postgres_url,
        APEX_GRPC_PORT=str(grpc_port),
        APEX_GRPC_TARGET=f"127.0.0.1:{grpc_port}",
        APEX_GRPC_PROCESSES="1",
    )
    url = base_url(env)
    body = {"projectKey": key, "events": [{"type": "x", "url": "/", "id": "gone-1"}]}
    with spawn(["gateway"], env) as gateway:
        assert wait_for(lambda: healthz(url) == 503, 30), gateway.output()
        latencies, statuses = [], set()
        for _ in range(10):
            started = time.monotonic()
            answer = requests.post(f"{url}/api/events", json=body, timeout=10)
            latencies.append(time.monotonic() - started)
            statuses.add(answer.status_code)
            assert answer.status_code != 503 or answer.headers.get("Retry-After")
        with spawn(["grpc"], env) as grpc_server:
            started = time.monotonic()
            recovered = wait_for(
                lambda: (
                    requests.post(f"{url}/api/events", json=body, timeout=10).status_code == 200
                ),
                30,
                0.1,
            )
            assert recovered is not None, grpc_server.output() + gateway.output()
            # Each gateway worker has its own channel, reconnecting with backoff (at most 1 s):
            # every worker answers within a few seconds of the first.
            all_workers = wait_for(lambda: all(healthz(url) == 200 for _ in range(6)), 10, 0.2)
            assert all_workers is not None, "/healthz still 503"
        record(
            "gateway with its gRPC server gone, then started",
            None,
            None,
            statuses_while_gone=sorted(statuses),
            max_latency_while_gone_s=round(max(latencies), 3),
            time_to_first_200_s=round(recovered, 2),
            time_to_recover_s=round(time.monotonic() - started, 2),
            five_hundreds=0,
        )
        assert statuses == {503}
        assert max(latencies) < 1.0


DRAIN_S = 1.5


def test_sigterm_under_load(postgres_url: str) -> None:
    key = make_project(postgres_url)
    env = service_env(postgres_url, APEX_SHUTDOWN_DRAIN=str(DRAIN_S))
    with spawn(["serve"], env) as service:
        url = base_url(env)
        assert wait_for(lambda: healthz(url) == 200, 30), service.output()
        load = Load(url, key, threads=6, retry=False, fresh_connections=True)
        load.start()
        time.sleep(3)
        term_at = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        time.sleep(DRAIN_S / 3)
        health_while_draining = healthz(url)
        code = service.process.wait(40)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        load.stop()
        if stopped_at - term_at > 10:
            dump = Path(tempfile.gettempdir()) / f"apex-sigterm-{service.process.pid}.log"
            dump.write_text(service.output())
            print(f"\nslow stop: the service's output is in {dump}")
        in_flight = [a for a in load.attempts if a.start < term_at < a.end]
        # Sent while the gateway drains: it still serves them (a margin for the drain's timer).
        draining = [a for a in load.attempts if term_at <= a.start < term_at + DRAIN_S - 0.3]
        after = [a for a in load.attempts if a.start >= term_at + DRAIN_S - 0.3]
        verdict = judge(postgres_url, load)
        record(
            "SIGTERM under load",
            verdict,
            load,
            exit_code=code,
            stop_s=round(stopped_at - term_at, 2),
            in_flight_at_sigterm=len(in_flight),
            in_flight_statuses=sorted({a.status for a in in_flight}),
            served_while_draining=sum(a.status == 200 for a in draining),
            after_drain_outcomes=sorted({a.error or str(a.status) for a in after}),
        )
        assert_clean(verdict, load)
        assert code == 0, service.output()[-3000:]
        assert health_while_draining == 503
        log = service.output()[-4000:]
        # Sent before the signal, or during the drain: answered, and acked means stored.
        for attempt in in_flight + draining:
            assert attempt.status == 200, (vars(attempt), log)
        assert draining, "the load should have sent requests during the drain"
        # After the drain the listener closes: a request is refused, or (a connection the
        # kernel had queued at that instant) reset before any byte of it was read. Either way
        # nothing of it is stored unless it was answered 200, which judge() checks.
        for attempt in after:
            assert attempt.status in (200, 503) or attempt.error in ("refused", "aborted"), (
                vars(attempt),
                log,
            )
