"""The gRPC-direct load: an internal service sending 100-event batches straight to IngestEvents.

`python -m bench.grpc_load --target HOST:PORT --key KEY` starts 2 client processes of 4 threads
each (one channel per thread, blocking unary calls with the generated stubs of
apex_ingest/v1) for `--seconds`, and prints what was acknowledged. Each call carries one of
several pre-built realistic batches (bench/events.py: the HTTP load's events) with fresh event
ids, the batch's User-Agent and client IP in the request context. The clients run on the same
cores as the service: their CPU is part of the machine's budget, as an internal caller's would be.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from bench.events import Batch, batches

PROCESSES = 2
THREADS = 4


@dataclass
class GrpcLoad:
    seconds: float
    calls: int
    events: int
    failed: dict[str, int]
    p50_ms: float
    p99_ms: float
    client_cpu_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def build_request(batch: Batch, key: str) -> ingest_pb2.IngestEventsRequest:
    request = ingest_pb2.IngestEventsRequest(
        project_key=key,
        user_id=batch.user_id,
        context=ingest_pb2.RequestContext(client_ip=batch.ip, user_agent=batch.user_agent),
    )
    for event in batch.events:
        item = request.events.add(
            type=event.type,
            visitor_id=event.visitor_id,
            url=event.url,
            referrer=event.referrer,
            data=event.data,
        )
        item.timestamp.FromDatetime(event.timestamp)
    return request


def client(target: str, key: str, threads: int, seconds: float, seed: int) -> None:
    """Run `threads` callers for `seconds`; print one JSON line of results."""
    tag = secrets.token_hex(4)
    pool = batches(8, seed=seed)
    channels = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(threads)
    ]
    for channel in channels:  # connected before the clock starts
        grpc.channel_ready_future(channel).result(timeout=10)
    stubs = [ingest_pb2_grpc.IngestServiceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
    calls = [0] * threads
    events = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failed: dict[str, int] = {}
    lock = threading.Lock()
    # Each thread owns its requests: it rewrites their ids between calls.
    owned = [[build_request(batch, key) for batch in pool] for _ in range(threads)]

    def run(index: int) -> None:
        requests, stub = owned[index], stubs[index]
        while time.monotonic() < deadline:
            request = requests[calls[index] % len(requests)]
            prefix = f"{tag}{index:04x}{calls[index]:012x}"
            for position, event in enumerate(request.events):
                event.id = f"{prefix}{position:08x}"
            began = time.perf_counter()
            try:
                answer = stub.IngestEvents(request, timeout=10)
            except grpc.RpcError as error:
                name = error.code().name
                with lock:
                    failed[name] = failed.get(name, 0) + 1
            else:
                events[index] += answer.received
            latencies[index].append(time.perf_counter() - began)
            calls[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    cpu, began = time.process_time(), time.monotonic()
    deadline = began + seconds
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - began
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "calls": sum(calls),
                "events": sum(events),
                "failed": failed,
                "latencies": sorted(x for per in latencies for x in per),
                "cpu": time.process_time() - cpu,
            }
        )
    )


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_load(target: str, key: str, seconds: float) -> GrpcLoad:
    """PROCESSES client processes of THREADS threads each, against `target`."""
    me = [sys.executable, "-m", "bench.grpc_load", "--client"]
    argv = [*me, "--target", target, "--key", key, "--seconds", str(seconds)]
    clients = [
        subprocess.Popen(
            [*argv, "--seed", str(100 + n)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        for n in range(PROCESSES)
    ]
    results = []
    for process in clients:
        out, _ = process.communicate(timeout=seconds + 120)
        if process.returncode:
            raise RuntimeError(f"gRPC load client exited with {process.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    failed: dict[str, int] = {}
    for result in results:
        for name, count in result["failed"].items():
            failed[name] = failed.get(name, 0) + count
    latencies = sorted(x for result in results for x in result["latencies"])
    return GrpcLoad(
        seconds=max(result["seconds"] for result in results),
        calls=sum(result["calls"] for result in results),
        events=sum(result["events"] for result in results),
        failed=failed,
        p50_ms=1000 * percentile(latencies, 0.50),
        p99_ms=1000 * percentile(latencies, 0.99),
        client_cpu_s=sum(result["cpu"] for result in results),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.target, args.key, THREADS, args.seconds, args.seed)
        return
    load = run_load(args.target, args.key, args.seconds)
    print(
        f"gRPC direct {PROCESSES}x{THREADS}: {load.events_per_s:.0f} events/s acknowledged"
        f" ({load.calls} calls, p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms,"
        f" failed {load.failed or 0}, client CPU {load.client_cpu_s:.1f} s)"
    )


if __name__ == "__main__":
    main()
