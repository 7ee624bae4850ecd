"""The ceiling a Python gRPC hop puts on the snippet path, and sync vs asyncio servers.

`python -m bench.grpc_ceiling` starts a trivial IngestService (it answers `received=N` and
does nothing else) as a sync `grpc.server` and as a `grpc.aio` server in turn, and calls it
from two client processes of 16 threads each (blocking unary calls, 4 channels per process:
what a gateway worker does). It prints calls/s and the CPU each side spends per call.

No validation, storage, Flask or HTTP is involved: the full snippet path cannot go faster
than this on the same machine, whatever the rest costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from bench.run import ROOT, free_port


class SyncEcho(ingest_pb2_grpc.IngestServiceServicer):
    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        return ingest_pb2.IngestEventsResponse(received=len(request.events))


class AsyncEcho(ingest_pb2_grpc.IngestServiceServicer):
    async def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        return ingest_pb2.IngestEventsResponse(received=len(request.events))


def serve(kind: str, address: str) -> None:
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(SyncEcho(), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(AsyncEcho(), server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def call(address: str, threads: int, seconds: float) -> None:
    """Blocking calls from `threads` threads for `seconds`; prints 'calls cpu_seconds'."""
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    stubs = [ingest_pb2_grpc.IngestServiceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
    request = ingest_pb2.IngestEventsRequest(
        project_key="pk_live_bench",
        events=[
            ingest_pb2.Event(
                type="pageview", visitor_id="v", url="https://example.com/", data='{"a":1}'
            )
        ],
    )
    for stub in stubs:  # connect before the clock starts
        stub.IngestEvents(request, timeout=10)
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while time.monotonic() < deadline:
            stub.IngestEvents(request, timeout=10)
            counts[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    cpu = time.process_time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(sum(counts), time.process_time() - cpu)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, seconds: float) -> tuple[float, float, float]:
    """(calls/s, server CPU ms per call, client CPU ms per call)"""
    address = f"127.0.0.1:{free_port()}"
    me = [sys.executable, "-m", "bench.grpc_ceiling"]
    server = subprocess.Popen([*me, "--serve", kind, "--address", address], cwd=ROOT)
    try:
        time.sleep(1.5)
        before = cpu_seconds(server.pid)
        clients = [
            subprocess.Popen(
                [*me, "--call", "--address", address, "--seconds", str(seconds)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [client.communicate()[0].split() for client in clients]
        server_cpu = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait()
    calls = sum(int(result[0]) for result in results)
    client_cpu = sum(float(result[1]) for result in results)
    return calls / seconds, 1000 * server_cpu / calls, 1000 * client_cpu / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["sync", "aio"])
    parser.add_argument("--call", action="store_true")
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.address)
    elif args.call:
        call(args.address, 16, args.seconds)
    else:
        print("trivial IngestEvents, 2 client processes x 16 threads, blocking unary calls")
        for kind in ("sync", "aio", "sync", "aio"):
            rate, server_ms, client_ms = measure(kind, args.seconds)
            print(
                f"{kind:5s} server: {rate:7.0f} calls/s  server {server_ms:.3f} ms CPU/call"
                f"  client {client_ms:.3f} ms CPU/call"
            )


if __name__ == "__main__":
    main()
