"""The gateway's gRPC channels to the ingest server: a few per process, made on first use.

A gRPC channel must not cross fork(): WSGI servers import the app and then fork workers, so the
channel is created lazily, by the process that uses it, and remade if the pid changes.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from flask import Flask, current_app
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apex_ingest.common import key_projects
from apex_ingest.common.logs import REQUEST_ID_METADATA, request_id_var
from apex_ingest.common.rpc import SERVICE_NAME, retry_service_config_json
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway.config import get_settings
from gateway.known_keys import KnownKeys

_EXTENSION_KEY = "apex_gateway.grpc"

#: How long /healthz waits at most; a load balancer's probe should not hang on a dead server.
HEALTH_TIMEOUT = 2.0


def service_config() -> str:
    """Retries of UNAVAILABLE and round-robin balancing (apex_ingest.common.rpc)."""
    return retry_service_config_json(max_attempts=3, max_backoff="1s")


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        # gRPC's default reconnect backoff grows to 120 s; the gateway should notice a restarted
        # server within about a second.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.primary_user_agent", "apex-gateway"),
        # Each channel its own connection: without this, channels with the same target and
        # options share one subchannel (one TCP connection) through gRPC's global pool.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class IngestClient:
    """IngestService and health calls over per-process channels, each call with a deadline."""

    def __init__(self, target: str, timeout: float, channels: int = 4) -> None:
        self.target = target
        self.timeout = timeout
        # Several channels (HTTP/2 connections) per process: `apex-ingest serve` runs several
        # gRPC processes on one SO_REUSEPORT port and the kernel assigns each *connection* to
        # one of them; with one channel, a worker's whole load would land on one process.
        # Calls go round-robin over them.
        self.channel_count = channels
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._ingest: ingest_pb2_grpc.IngestServiceStub | None = None
        self._channels: list[grpc.Channel] = []
        self._stubs: list[ingest_pb2_grpc.IngestServiceStub] = []
        self._next = itertools.count()
        self._health: health_pb2_grpc.HealthStub | None = None
        #: The project of each key the server accepted (per-project rate limits).
        self.known_keys = KnownKeys()

    def _connect(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            # A channel inherited from the parent is dead weight: drop it without closing, as
            # closing would act on the parent's gRPC state.
            self._channels = [
                grpc.insecure_channel(self.target, options=channel_options())
                for _ in range(self.channel_count)
            ]
            self._stubs = [
                ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
                for channel in self._channels
            ]
            self._channel = self._channels[0]
            self._ingest = self._stubs[0]
            self._health = health_pb2_grpc.HealthStub(self._channel)
            self._pid = pid

    def ingest(self, request: ingest_pb2.IngestEventsRequest) -> int:
        """Call IngestEvents; return how many events were received. Raises grpc.RpcError."""
        return int(self.ingest_response(request).received)

    def ingest_response(
        self, request: ingest_pb2.IngestEventsRequest
    ) -> ingest_pb2.IngestEventsResponse:
        """Call IngestEvents; its whole answer (a partial batch's `rejected` too)."""
        self._connect()
        assert self._ingest is not None
        stub = self._stubs[next(self._next) % len(self._stubs)]
        request_id = request_id_var.get()
        response: ingest_pb2.IngestEventsResponse
        response, call = stub.IngestEvents.with_call(
            request,
            timeout=self.timeout,
            metadata=((REQUEST_ID_METADATA, request_id),) if request_id else None,
        )
        self.known_keys.learn([request.project_key], key_projects.decode(call.trailing_metadata()))
        return response

    def record_refused(self, request: ingest_pb2.RecordRefusedRequest) -> None:
        """Call RecordRefused (OK: the server found nothing more). Raises grpc.RpcError:
        INVALID_ARGUMENT with the server's own violations, UNIMPLEMENTED from an older server."""
        self._connect()
        stub = self._stubs[next(self._next) % len(self._stubs)]
        request_id = request.request.context.request_id
        stub.RecordRefused(
            request,
            timeout=self.timeout,
            metadata=((REQUEST_ID_METADATA, request_id),) if request_id else None,
        )

    def ingest_many(
        self, requests: Sequence[ingest_pb2.IngestEventsRequest], timeout: float
    ) -> Sequence[ingest_pb2.IngestResult]:
        """One IngestMany call carrying `requests`; their results in order. Raises
        grpc.RpcError for a failure of the whole call (UNIMPLEMENTED: an older server)."""
        self._connect()
        stub = self._stubs[next(self._next) % len(self._stubs)]
        # Each request's own id is in its context; the call's metadata (the server's log line
        # for the call) carries the first one's, so that a lone request is traced end to end.
        request_id = requests[0].context.request_id if requests else ""
        response: ingest_pb2.IngestManyResponse
        response, call = stub.IngestMany.with_call(
            ingest_pb2.IngestManyRequest(requests=requests),
            timeout=max(0.001, timeout),
            metadata=((REQUEST_ID_METADATA, request_id),) if request_id else None,
        )
        self.known_keys.learn(
            [request.project_key for request in requests],
            key_projects.decode(call.trailing_metadata()),
        )
        return response.results

    def health(self) -> str:
        """The server's health status name (e.g. "SERVING"), or the gRPC error code's name."""
        self._connect()
        assert self._health is not None
        timeout = min(self.timeout, HEALTH_TIMEOUT)
        try:
            answer = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                return str(exc.code().name)
            # The server reports only the overall status; that will do.
            try:
                answer = self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError as again:
                return str(again.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for channel in self._channels:
                    channel.close()
            self._channel = self._ingest = self._health = None
            self._channels, self._stubs = [], []
            self._pid = None


def install(app: Flask) -> IngestClient:
    settings = get_settings(app)
    client = IngestClient(settings.grpc_target, settings.grpc_timeout, settings.grpc_channels)
    app.extensions[_EXTENSION_KEY] = client
    return client


def get_client() -> IngestClient:
    client: IngestClient = current_app.extensions[_EXTENSION_KEY]
    return client
