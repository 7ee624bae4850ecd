"""Keeps grpc.health.v1 truthful: NOT_SERVING while storage cannot take events (unreachable,
or a database without this code's schema).

Storage is the database, or in stream mode the stream (the database may then be down for a
while without refusing anything): the monitor runs whichever probe it is given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2
from sqlalchemy import Engine

from apex_ingest.common.rpc import SERVICE_NAME
from apex_ingest.server.storage import storage_problem

log = logging.getLogger(__name__)


class StorageHealthMonitor:
    """Probes storage every `interval` seconds and publishes the result.

    `storage`: the database's engine, or a probe of its own that says what is wrong, None when
    nothing is (stream mode: the stream's reachability).
    """

    def __init__(
        self,
        storage: Engine | Callable[[], str | None],
        servicer: health.HealthServicer,
        interval: float,
    ) -> None:
        self._probe: Callable[[], str | None] = (
            (lambda: storage_problem(storage)) if isinstance(storage, Engine) else storage
        )
        self._servicer = servicer
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-health", daemon=True)
        self._serving: bool | None = None

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def mark_unavailable(self) -> None:
        """Called on a failed write, so health turns before the next probe."""
        self._publish("a write failed")

    def check(self) -> bool:
        problem = self._probe()
        self._publish(problem)
        return problem is None

    def _publish(self, problem: str | None) -> None:
        serving = problem is None
        if self._stopped.is_set() or serving == self._serving:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if serving:
            log.info("storage can take events: SERVING")
        else:
            log.warning("storage cannot take events (%s): NOT_SERVING", problem)
        for service in ("", SERVICE_NAME):
            self._servicer.set(service, status)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.check()
