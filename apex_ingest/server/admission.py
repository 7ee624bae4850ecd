"""Admission control: IngestEvents calls beyond APEX_GRPC_MAX_CONCURRENT_RPCS are refused.

grpc.server(maximum_concurrent_rpcs=N) would refuse them itself, but before any of our code
runs, with a bare RESOURCE_EXHAUSTED: no google.rpc.RetryInfo, which the contract promises and
the gateway turns into Retry-After. So the server's thread pool counts the calls it holds
(queued or running), and an interceptor, which gRPC runs in its one serving thread just before
handing a call to that pool, refuses ingest calls past the limit with a rich status. Health
checks and reflection are never refused: an overloaded server is still alive.

A refusal is a handler like any other, which gRPC hands to the pool; queued behind the calls
that made the server full, it would come after the caller's deadline. So the interceptor marks
it, and the pool runs the next task its serving thread submits (that refusal) on threads of its
own, ahead of the queue and outside the count. Health checks (`Check`, answered from memory) go
the same way, so a load balancer hears from a busy server in time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.common.rpc import retry_info
from apex_ingest.server import metrics


class CountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that knows how many tasks it holds, queued or running."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="grpc-call")
        self._held = 0
        self._held_lock = threading.Lock()
        self._apart = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grpc-apart")
        self._next_apart = threading.local()

    @property
    def held(self) -> int:
        return self._held

    def run_next_apart(self) -> None:
        """Run the next task this thread submits (a quick one) ahead of the queue, uncounted."""
        self._next_apart.value = True

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        if getattr(self._next_apart, "value", False):
            self._next_apart.value = False
            return self._apart.submit(fn, *args, **kwargs)
        with self._held_lock:
            self._held += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: object = None) -> None:
        with self._held_lock:
            self._held -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._apart.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class AdmissionInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        pool: CountingExecutor,
        limit: int,
        retry_after_seconds: int,
        methods: frozenset[str],
        quick_methods: frozenset[str] = frozenset({HEALTH_CHECK}),
    ) -> None:
        self._pool = pool
        self._limit = limit
        self._methods = methods
        self._quick = quick_methods
        self._refusal = rpc_status.to_status(
            status_pb2.Status(
                code=code_pb2.RESOURCE_EXHAUSTED,
                message="the server is saturated; retry later",
                details=[retry_info(retry_after_seconds)],
            )
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        if method in self._quick:
            self._pool.run_next_apart()  # gRPC submits this handler next, from this thread
            return handler
        if self._pool.held < self._limit or method not in self._methods:
            return handler
        metrics.EVENTS_REJECTED.labels(metrics.UNKNOWN_PROJECT, "resource_exhausted").inc()
        self._pool.run_next_apart()
        # No request deserializer: the refused request is never read.
        return grpc.unary_unary_rpc_method_handler(
            self._refuse, response_serializer=handler.response_serializer
        )

    def _refuse(self, _request: bytes, context: grpc.ServicerContext) -> None:
        context.abort_with_status(self._refusal)
