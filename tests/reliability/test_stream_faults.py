"""Stream mode as it would run, under steady batch load: a 3-node JetStream cluster (R3 stream),
2 gRPC servers, 2 loaders, PostgreSQL behind a TCP proxy the test can cut. One after another:
kill -9 the stream's leader node, kill -9 a loader, kill -9 a gRPC server, cut PostgreSQL for
30 s. At the end every acknowledged event is stored exactly once, no batch is half-stored, and
the only refusals were UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After), never while only
PostgreSQL was away. A second, shorter test takes 2 of the 3 nodes away (no quorum).

The load is 4 client threads calling gRPC IngestEvents with 20-event batches whose events
carry ids, round-robin over both servers, retrying a refused batch (same ids) on the next
server, as the SDK would.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import requests
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from apex_ingest.common.settings import ServerSettings
from apex_ingest.ops.loader import setup_stream
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tests.conftest import make_project, start_server
from tests.nats_cluster import Cluster, nats_cluster
from tests.reliability.support import (
    BATCH_SIZE,
    ClientThreads,
    Proc,
    assert_clean,
    judge,
    pg_address,
    proxied_url,
    record,
    spawn,
)
from tests.service import free_port, wait_for
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.reliability(slow=True), pytest.mark.postgres]

STREAM = "APEX_FAULTS"
CONSUMER = "loaders"
ACK_WAIT = 3.0
POSTGRES_OUTAGE = 30.0


@dataclass
class Attempt:
    thread: int
    batch: str
    target: str
    start: float
    end: float
    code: str  # "OK" or the status code's name
    retry_info: bool = False
    details: str = ""


@dataclass
class GrpcLoad(ClientThreads):
    """Client threads sending 20-event batches over gRPC, retrying refused ones (same ids)."""

    targets: list[str]
    project_key: str
    give_up: float = field(default=30.0, kw_only=True)
    attempts: list[Attempt] = field(default_factory=list)

    def _run(self, number: int) -> None:
        channels = [grpc.insecure_channel(target) for target in self.targets]
        stubs = [ingest_pb2_grpc.IngestServiceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
        turn = number
        sequence = 0
        try:
            while not self._stop.is_set():
                sequence += 1
                batch = f"s{number}-{sequence}-{os.urandom(3).hex()}"
                request = ingest_pb2.IngestEventsRequest(
                    project_key=self.project_key,
                    user_id=f"user-{number}",
                    events=[
                        ingest_pb2.Event(
                            id=f"{batch}-{index}",
                            type="reliability",
                            url="/load",
                            data=json.dumps({"batch": batch, "index": index}),
                        )
                        for index in range(BATCH_SIZE)
                    ],
                )
                while True:
                    turn += 1
                    index = turn % len(stubs)
                    attempt = self._call(stubs[index], self.targets[index], number, batch, request)
                    if attempt.code == "OK":
                        with self._lock:
                            self.acked.append(batch)
                        break
                    if self.giving_up():
                        break
                    time.sleep(0.05 if not attempt.retry_info else 0.2)
        finally:
            for channel in channels:
                channel.close()

    def _call(
        self,
        stub: Any,
        target: str,
        number: int,
        batch: str,
        request: ingest_pb2.IngestEventsRequest,
    ) -> Attempt:
        start = time.monotonic()
        try:
            stub.IngestEvents(request, timeout=10)
            attempt = Attempt(number, batch, target, start, time.monotonic(), "OK")
        except grpc.RpcError as error:
            status = rpc_status.from_call(error)
            retry = error_details_pb2.RetryInfo()
            has_retry = status is not None and any(d.Unpack(retry) for d in status.details)
            attempt = Attempt(
                number,
                batch,
                target,
                start,
                time.monotonic(),
                error.code().name,
                has_retry,
                (error.details() or "")[:120],
            )
        with self._lock:
            self.attempts.append(attempt)
        return attempt


def _settings(cluster: Cluster, database_url: str) -> ServerSettings:
    return ServerSettings(
        database_url=database_url,
        stream_url=cluster.url,
        stream_name=STREAM,
        stream_consumer=CONSUMER,
        stream_replicas=3,
        stream_ack_wait=ACK_WAIT,
    )


def _set_up_stream(settings: ServerSettings, cluster: Cluster) -> None:
    """`stream setup` once the cluster has elected its meta leader (a few seconds)."""
    problems: list[str] = []

    def attempt() -> bool:
        try:
            asyncio.run(setup_stream(settings))
            return True
        except Exception as error:
            problems.append(repr(error))
            raise

    if wait_for(attempt, 30, interval=0.5) is None:
        raise RuntimeError(f"no stream after 30 s: {problems[-3:]}\n{cluster.logs()}")


async def _stream_facts(settings: ServerSettings) -> tuple[str | None, int]:
    """(the stream's leader node, messages not yet loaded: pending + unacknowledged)."""
    client = await nats.connect(settings.stream_servers, connect_timeout=2)
    try:
        js = client.jetstream(timeout=5)
        info = await js.stream_info(settings.stream_name)
        consumer = await js.consumer_info(settings.stream_name, settings.stream_consumer)
        leader = info.cluster.leader if info.cluster is not None else None
        return leader, int(consumer.num_pending) + int(consumer.num_ack_pending)
    finally:
        await client.close()


def stream_facts(settings: ServerSettings) -> tuple[str | None, int]:
    return asyncio.run(_stream_facts(settings))


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[TcpProxy]:
    tcp = TcpProxy(*pg_address(postgres_url))
    yield tcp
    tcp.close()


def test_stream_mode_survives_a_node_a_loader_a_server_and_postgresql(
    postgres_url: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    key = make_project(postgres_url)
    database = proxied_url(postgres_url, proxy.port)
    with nats_cluster(tmp_path / "nats") as cluster:
        settings = _settings(cluster, database)
        _set_up_stream(settings, cluster)
        env = {
            "APEX_DATABASE_URL": database,
            "APEX_STREAM_URL": cluster.url,
            "APEX_STREAM_NAME": STREAM,
            "APEX_STREAM_CONSUMER": CONSUMER,
            "APEX_STREAM_ACK_WAIT": str(ACK_WAIT),
            "APEX_PROJECT_CACHE_TTL": "1",
            "APEX_MIGRATE_ON_START": "0",
            "APEX_ACCESS_LOG": "0",
            "APEX_DB_CONNECT_TIMEOUT": "1",
            "APEX_HEALTH_INTERVAL": "0.5",
        }
        grpc_ports = [free_port(), free_port()]
        loader_ports = [free_port(), free_port()]
        targets = [f"127.0.0.1:{port}" for port in grpc_ports]
        with (
            spawn(
                ["grpc", "--processes", "1"], {**env, "APEX_GRPC_PORT": str(grpc_ports[0])}
            ) as server_a,
            spawn(
                ["grpc", "--processes", "1"], {**env, "APEX_GRPC_PORT": str(grpc_ports[1])}
            ) as server_b,
            spawn(["loader"], {**env, "APEX_LOADER_PORT": str(loader_ports[0])}) as loader_a,
            spawn(["loader"], {**env, "APEX_LOADER_PORT": str(loader_ports[1])}) as loader_b,
        ):
            processes: dict[str, Proc] = {
                "server_a": server_a,
                "server_b": server_b,
                "loader_a": loader_a,
                "loader_b": loader_b,
            }

            def outputs() -> str:
                return "\n".join(
                    f"--- {name} ---\n{proc.output()[-8000:]}" for name, proc in processes.items()
                )

            for target in targets:
                assert wait_for(lambda t=target: _serving(t), 30), (
                    f"{target} never SERVING\n{outputs()}"
                )
            for port in loader_ports:
                assert wait_for(
                    lambda p=port: requests.get(f"http://127.0.0.1:{p}/healthz", timeout=2).ok,
                    30,
                ), f"loader on {port} never healthy\n{outputs()}"

            load = GrpcLoad(targets, key)
            timeline: dict[str, float] = {}
            load.start()
            try:
                time.sleep(5)
                leader, _ = stream_facts(settings)
                assert leader in cluster.nodes, f"no stream leader: {leader}"
                timeline["nats_node_killed"] = time.monotonic()
                cluster.kill(leader)
                time.sleep(10)
                timeline["loader_killed"] = time.monotonic()
                loader_a.process.kill()
                time.sleep(6)
                timeline["server_killed"] = time.monotonic()
                server_a.process.kill()
                time.sleep(5)
                timeline["postgres_cut"] = time.monotonic()
                proxy.cut()
                time.sleep(POSTGRES_OUTAGE)
                timeline["postgres_restored"] = time.monotonic()
                proxy.restore()
                time.sleep(5)
            finally:
                load.stop()
            timeline["load_stopped"] = time.monotonic()

            # The surviving loader drains what is left (what the killed one held included,
            # redelivered after APEX_STREAM_ACK_WAIT).
            drained = wait_for(lambda: stream_facts(settings)[1] == 0, 90, interval=0.5)
            _, lag = stream_facts(settings)
            health = requests.get(f"http://127.0.0.1:{loader_ports[1]}/healthz", timeout=5).json()
            if drained is None:  # where the surviving loader waits (faulthandler, on SIGUSR1)
                loader_b.process.send_signal(signal.SIGUSR1)
                time.sleep(1)
            # Read now: the processes' logs are removed when they stop.
            logs = outputs()

        verdict = judge(postgres_url, load)  # type: ignore[arg-type]
        codes = collections.Counter((a.code, a.retry_info) for a in load.attempts if a.code != "OK")
        start = timeline["nats_node_killed"]

        def during(name_from: str, name_to: str) -> list[Attempt]:
            return [
                a
                for a in load.attempts
                if a.code != "OK" and timeline[name_from] <= a.start < timeline[name_to]
            ]

        refused_without_postgres = [
            a for a in during("postgres_cut", "postgres_restored") if a.target != targets[0]
        ]
        record(
            "stream_mode_faults",
            verdict,
            None,
            requests=len(load.attempts),
            refusals={
                f"{code}{'+RetryInfo' if retry else ''}": n for (code, retry), n in codes.items()
            },
            # When the UNAVAILABLE + RetryInfo answers came (s after the node's kill -9).
            retry_refusals_s=_span(
                [a.start - start for a in load.attempts if a.code != "OK" and a.retry_info]
            ),
            killed_server_refusals_s=_span(
                [a.start - start for a in load.attempts if a.code != "OK" and not a.retry_info]
            ),
            timeline={name: round(at - start, 1) for name, at in timeline.items()},
            drained_after_s=None if drained is None else round(drained, 1),
            loader_health=health,
        )
        assert drained is not None, f"{lag} messages never loaded\n{logs}"
        assert_clean(verdict, _NoHttp())  # type: ignore[arg-type]
        assert verdict.acked_batches > 50, "the load barely ran"
        for attempt in load.attempts:
            if attempt.code == "OK":
                continue
            # The killed server's address refuses connections: a transport error, the client
            # goes to the other server. Anything else must be UNAVAILABLE with RetryInfo.
            killed_server = attempt.target == targets[0] and (
                attempt.start >= timeline["server_killed"] - 0.5
            )
            assert killed_server or (attempt.code == "UNAVAILABLE" and attempt.retry_info), (
                f"refused without RetryInfo: {attempt}"
            )
        assert not refused_without_postgres, (
            f"refused while only PostgreSQL was away: {refused_without_postgres[:5]}"
        )


def _span(times: list[float]) -> list[float]:
    """[first, last], rounded; [] if none."""
    return [round(min(times), 1), round(max(times), 1)] if times else []


class _NoHttp:
    """assert_clean's view of a gRPC load: no HTTP 500 can exist."""

    def statuses(self) -> collections.Counter[int]:
        return collections.Counter()


def test_no_quorum_is_unavailable_with_retry_info_then_recovers(
    sqlite_url: str, tmp_path: Path
) -> None:
    """2 of 3 nodes gone: the R3 stream has no quorum. Calls are refused with UNAVAILABLE +
    RetryInfo (503 + Retry-After) within APEX_STREAM_ACK_TIMEOUT, health turns NOT_SERVING;
    with the nodes back, calls succeed again without a restart."""
    key = make_project(sqlite_url)
    with nats_cluster(tmp_path / "nats") as cluster:
        settings = _settings(cluster, sqlite_url)
        _set_up_stream(settings, cluster)
        running = start_server(
            sqlite_url,
            stream_url=cluster.url,
            stream_name=STREAM,
            stream_consumer=CONSUMER,
            stream_ack_timeout=1.0,
        )
        try:
            with grpc.insecure_channel(running.target) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
                health = health_pb2_grpc.HealthStub(channel)

                def call(event_id: str) -> None:
                    request = ingest_pb2.IngestEventsRequest(
                        project_key=key,
                        events=[ingest_pb2.Event(id=event_id, type="t", url="/")],
                    )
                    stub.IngestEvents(request, timeout=10)

                def status() -> int:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    return int(answer.status)

                call("before")
                for name in ("n1", "n2"):
                    cluster.kill(name)
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call("during")
                assert time.monotonic() - started < 5
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
                details = rpc_status.from_call(caught.value)
                retry = error_details_pb2.RetryInfo()
                assert details is not None and any(d.Unpack(retry) for d in details.details)
                assert wait_for(
                    lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 15
                ), "health stayed SERVING without quorum"
                for name in ("n1", "n2"):
                    cluster.start(name)

                def accepted() -> bool:
                    call("after")
                    return True

                assert wait_for(accepted, 60, interval=0.5) is not None, cluster.logs()
                assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 15)
        finally:
            running.server.stop(0)
