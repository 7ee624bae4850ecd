"""Metrics and logs of the real service (`apex-ingest serve`, two gateway workers)."""

from __future__ import annotations

import http.client
import os
import sys
import time
from urllib.parse import urlsplit

import requests

from tests.conftest import make_project
from tests.ops.support import Samples, has_metric, json_lines, scrape, scrape_until, value
from tests.service import free_port, logged_process, running_service, wait_for


def _post(base_url: str, key: str, count: int, **headers: str) -> requests.Response:
    events = [{"type": "signup", "url": "/signup"} for _ in range(count)]
    return requests.post(
        f"{base_url}/api/events",
        json={"projectKey": key, "events": events},
        headers=headers,
        timeout=10,
    )


def moved(samples_before: Samples, samples_after: Samples, name: str, **labels: str) -> float:
    return value(samples_after, name, **labels) - value(samples_before, name, **labels)


def test_gateway_and_grpc_metrics_move(sqlite_url: str) -> None:
    key = make_project(sqlite_url)
    metrics_port = free_port()
    with running_service(sqlite_url, env={"APEX_METRICS_PORT": str(metrics_port)}) as service:
        gateway_url = f"{service.base_url}/metrics"
        grpc_url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(gateway_url)
        grpc_before = scrape(grpc_url)

        # Several requests, so both gateway workers are likely to answer some.
        for _ in range(6):
            assert _post(service.base_url, key, 3).status_code == 200
        assert _post(service.base_url, "pk_nope_" + "x" * 20, 2).status_code == 401
        bad = requests.post(
            f"{service.base_url}/api/events",
            json={"projectKey": key, "events": [{"type": "x", "url": "nope"}]},
            timeout=10,
        )
        assert bad.status_code == 400

        # Other processes' last samples may take a moment to reach the shared files.
        after = scrape_until(
            gateway_url,
            lambda s: (
                moved(before, s, "apex_gateway_events_accepted_total", project=key) == 18
                and moved(before, s, "apex_gateway_http_request_duration_seconds_count") == 8
                and moved(before, s, "apex_gateway_coalesced_requests_count") == 8
                and moved(before, s, "apex_gateway_events_rejected_total", project="unverified")
                == 2
                and moved(before, s, "apex_gateway_events_rejected_total", reason="invalid_request")
                == 1
                and moved(before, s, "apex_grpc_events_accepted_total", project=key) == 18
            ),
        )
        grpc_after = scrape_until(
            grpc_url,
            lambda s: (
                moved(grpc_before, s, "apex_grpc_request_duration_seconds_count") == 8
                and moved(grpc_before, s, "apex_group_commit_rows_sum") == 18
            ),
        )

    # Gateway: events by project and reason, requests by endpoint and status, latency, in-flight.
    assert moved(before, after, "apex_gateway_events_accepted_total", project=key) == 18
    assert (
        moved(
            before,
            after,
            "apex_gateway_events_rejected_total",
            project="unverified",
            reason="unauthorized",
        )
        == 2
    )
    assert moved(before, after, "apex_gateway_events_rejected_total", reason="invalid_request") == 1
    assert (
        moved(
            before,
            after,
            "apex_gateway_http_requests_total",
            endpoint="/api/events",
            method="POST",
            status="200",
        )
        == 6
    )
    assert (
        moved(
            before,
            after,
            "apex_gateway_http_request_duration_seconds_count",
            endpoint="/api/events",
        )
        == 8
    )
    assert has_metric(after, "apex_gateway_http_requests_in_flight")
    # Client input never becomes a label: the unknown key does not appear anywhere.
    assert not any("pk_nope_" in str(labels) for _, labels, _ in after)

    # gRPC server: RPC latency, events by project and reason, group commits, pool.
    assert moved(grpc_before, grpc_after, "apex_grpc_events_accepted_total", project=key) == 18
    assert (
        moved(
            grpc_before,
            grpc_after,
            "apex_grpc_events_rejected_total",
            project="unknown",
            reason="unauthenticated",
        )
        == 2
    )
    assert (
        moved(
            grpc_before,
            grpc_after,
            "apex_grpc_request_duration_seconds_count",
            method="IngestMany",
            code="OK",
        )
        == 8  # the gateway sends its requests as IngestMany calls; these went one at a time
    )
    assert moved(before, after, "apex_gateway_coalesced_requests_count") == 8
    assert moved(before, after, "apex_gateway_coalesced_requests_sum") == 8
    assert moved(grpc_before, grpc_after, "apex_group_commit_requests_count") >= 1
    assert moved(grpc_before, grpc_after, "apex_group_commit_rows_sum") == 18
    assert has_metric(grpc_after, "apex_db_pool_connections_in_use")
    assert has_metric(grpc_after, "apex_grpc_requests_in_flight")
    # `serve` shares one metrics directory: the gateway's /metrics shows the gRPC side too.
    assert moved(before, after, "apex_grpc_events_accepted_total", project=key) == 18


def test_json_logs_carry_the_request_id_and_stay_one_line(sqlite_url: str) -> None:
    key = make_project(sqlite_url)
    with running_service(sqlite_url) as service:
        answer = _post(service.base_url, key, 1, **{"X-Request-ID": "req-abc.123"})
        assert answer.status_code == 200
        assert answer.headers["X-Request-ID"] == "req-abc.123"

        generated = _post(service.base_url, key, 1)
        assert len(generated.headers["X-Request-ID"]) == 32  # a fresh uuid4, hex

        # Not a sane token (a space, quotes): replaced, never echoed or logged.
        hostile = _post(service.base_url, key, 1, **{"X-Request-ID": 'a b"c'})
        replaced = hostile.headers["X-Request-ID"]
        assert replaced != 'a b"c' and len(replaced) == 32

        # CR/LF reach the log through the (percent-decoded) path, a tab through the User-Agent.
        parts = urlsplit(service.base_url)
        assert parts.hostname is not None
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        connection.putrequest(
            "GET", "/nowhere%0d%0a%7b%22forged%22%3a1%7d", skip_accept_encoding=True
        )
        connection.putheader("User-Agent", "evil\tagent")
        connection.putheader("X-Request-ID", "req-crlf")
        connection.endheaders()
        assert connection.getresponse().status == 404
        connection.close()
        time.sleep(0.5)  # let the workers' stderr reach the log file
        output = service.output()

    records = json_lines(output)  # every line of every process is one JSON object
    assert not any(record.get("forged") for record in records)
    by_id = [record for record in records if record.get("request_id") == "req-abc.123"]
    loggers = {record["logger"] for record in by_id}
    # The gateway logged it, and so did the gRPC server, from the x-request-id metadata.
    assert {"gateway.access", "apex_ingest.access"} <= loggers, by_id
    gateway_line = next(r for r in by_id if r["logger"] == "gateway.access")
    assert gateway_line["status"] == 200 and gateway_line["path"] == "/api/events"
    assert not any(r.get("request_id") == 'a b"c' for r in records)

    crlf = next(r for r in records if r.get("request_id") == "req-crlf")
    assert crlf["path"] == '/nowhere\r\n{"forged":1}'
    assert crlf["user_agent"] == "evil\tagent"
    assert crlf["status"] == 404


def test_a_gateway_run_alone_serves_its_workers_metrics(sqlite_url: str) -> None:
    """`apex-ingest gateway` (deploy.md's topology) must not answer an empty /metrics."""
    key = make_project(sqlite_url)
    grpc_port, http_port = free_port(), free_port()
    base = {**os.environ, "APEX_DATABASE_URL": sqlite_url, "APEX_HOST": "127.0.0.1"}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    grpc_env = {**base, "APEX_GRPC_PORT": str(grpc_port)}
    gateway_env = {
        **base,
        "APEX_HTTP_PORT": str(http_port),
        "APEX_GRPC_TARGET": f"127.0.0.1:{grpc_port}",
        "APEX_SHUTDOWN_DRAIN": "0.2",
    }
    command = [sys.executable, "-m", "apex_ingest"]
    with (
        logged_process([*command, "grpc", "--processes", "1"], grpc_env),
        logged_process([*command, "gateway", "--workers", "2"], gateway_env),
    ):
        base_url = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: requests.get(f"{base_url}/healthz", timeout=2).ok, timeout=60)
        for _ in range(4):
            assert _post(base_url, key, 2).status_code == 200
        samples = scrape_until(
            f"{base_url}/metrics",
            lambda s: value(s, "apex_gateway_events_accepted_total", project=key) == 8,
        )
    assert value(samples, "apex_gateway_events_accepted_total", project=key) == 8
    # Only the gateway's own metrics: the gRPC server's (apex_ingest/server/metrics.py) are
    # defined in processes the gateway never imports.
    foreign = {
        name
        for name, _, _ in samples
        if name.startswith(("apex_grpc_", "apex_group_commit_", "apex_db_"))
    }
    assert foreign == set()


def test_an_idle_server_has_no_pool_connection_in_use(postgres_url: str) -> None:
    """It read 4 on idle servers: two gRPC processes, each with two group-commit writers that
    keep a pooled connection for good. Those are apex_db_writer_connections now."""
    from concurrent.futures import ThreadPoolExecutor

    key = make_project(postgres_url)
    metrics_port = free_port()
    env = {"APEX_METRICS_PORT": str(metrics_port), "APEX_GRPC_PROCESSES": "2"}
    with running_service(postgres_url, env=env) as service:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _post(service.base_url, key, 5), range(40)))
        assert all(answer.status_code == 200 for answer in answers)
        grpc_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def idle() -> bool:
            return value(scrape(grpc_url), "apex_db_pool_connections_in_use") == 0

        assert wait_for(idle, timeout=10) is not None, scrape(grpc_url)
        writers = value(scrape(grpc_url), "apex_db_writer_connections")
        assert 1 <= writers <= 4  # at most two writers per process
