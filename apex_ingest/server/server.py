"""The gRPC server: IngestService, grpc.health.v1 and server reflection."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from sqlalchemy import Engine

from apex_ingest.common.rpc import (
    INGEST_MANY_METHOD,
    INGEST_METHOD,
    RECORD_REFUSED_METHOD,
    SERVICE_NAME,
)
from apex_ingest.common.settings import ServerSettings, load
from apex_ingest.server import decoding, enrichment, metrics, reflection
from apex_ingest.server.admission import AdmissionInterceptor, CountingExecutor
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.deadletters import DeadLetterRecorder
from apex_ingest.server.health import StorageHealthMonitor
from apex_ingest.server.people import SuppressionDirectory
from apex_ingest.server.people_service import PeopleServicer
from apex_ingest.server.project_service import ProjectServicer
from apex_ingest.server.projects import ProjectDirectory
from apex_ingest.server.servicer import IngestServicer
from apex_ingest.server.storage import EventSink, EventStore
from apex_ingest.v1 import (
    ingest_pb2_grpc,
    people_pb2,
    people_pb2_grpc,
    project_pb2,
    project_pb2_grpc,
)

if TYPE_CHECKING:
    from apex_ingest.server.stream import StreamSink

log = logging.getLogger(__name__)
PROJECT_SERVICE_NAME: str = project_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name
PEOPLE_SERVICE_NAME: str = people_pb2.DESCRIPTOR.services_by_name["PeopleService"].full_name


class IngestServer:
    """A grpc.Server with what it owns: the database engine and the health monitor."""

    def __init__(
        self,
        server: grpc.Server,
        engine: Engine,
        health_servicer: health.HealthServicer,
        monitor: StorageHealthMonitor,
        dead_letters: DeadLetterRecorder | None = None,
        stream: StreamSink | None = None,
    ) -> None:
        self.grpc_server = server
        self._stream = stream
        self._dead_letters = dead_letters
        self._engine = engine
        self._health = health_servicer
        self._monitor = monitor

    def start(self) -> None:
        self._monitor.start()
        self.grpc_server.start()

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`."""
        self._monitor.stop()
        self._health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if self._dead_letters is not None:
            # Dead letters still queued are written before the engine goes (a second at most).
            self._dead_letters.flush(timeout=min(1.0, grace or 1.0))
        if self._stream is not None:
            self._stream.close()
        self._engine.dispose()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def create_server(address: str, settings: ServerSettings | None = None) -> tuple[IngestServer, int]:
    """Build (not start) the server on `address` ("host:port", port 0 picks one)."""
    settings = settings or load(ServerSettings)
    engine = create_db_engine(settings.database_url, settings)
    metrics.instrument_pool(engine)
    session_factory = create_session_factory(engine)

    pool = CountingExecutor(settings.grpc_threads)
    server = grpc.server(
        pool,
        interceptors=[
            AdmissionInterceptor(
                pool,
                settings.grpc_max_concurrent_rpcs,
                settings.retry_after_seconds,
                # RecordRefused too: any client can cause one (a body with a type error).
                frozenset({INGEST_METHOD, INGEST_MANY_METHOD, RECORD_REFUSED_METHOD}),
            )
        ],
        options=[
            ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_send_message_length", 1024 * 1024),
        ],
    )
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1),
    )
    enrichment.configure(settings.enrichment, settings.geoip)
    # The User-Agent parser's rules and the country database take ~1.5 s to load: in the
    # background, so that the server starts at once (a request meanwhile waits for them).
    threading.Thread(target=enrichment.warm_up, name="enrichment-warm-up", daemon=True).start()
    # Stream mode: requests go to the stream, and health follows it (the database may be down
    # meanwhile: loaders catch up, and key lookups are answered from their last known values).
    stream = None
    if settings.stream_url:
        from apex_ingest.server.stream import StreamSink  # nats-py: only in stream mode

        stream = StreamSink(
            settings.stream_servers,
            settings.stream_name,
            settings.stream_subject,
            settings.retry_after_seconds,
            settings.stream_ack_timeout,
        )
    sink: EventSink = (
        stream
        if stream is not None
        else EventStore(
            session_factory,
            settings.retry_after_seconds,
            commit_timeout=settings.commit_timeout,
        )
    )
    monitor = StorageHealthMonitor(
        engine
        if stream is None
        else (lambda: None if stream.reachable() else "stream unreachable"),
        health_servicer,
        settings.health_interval,
    )
    projects = ProjectDirectory(
        session_factory,
        settings.project_cache_ttl,
        stale_for=settings.stream_key_grace if stream is not None else 0.0,
    )
    recorder = DeadLetterRecorder(
        session_factory,
        max_rows=settings.dead_letter_max_rows,
        max_age_days=settings.dead_letter_max_age_days,
        max_total_rows=settings.dead_letter_max_total_rows,
        queue_size=settings.dead_letter_queue,
        # Stream mode rides through database outages: so do dead letters (within the queue).
        wait_out_outages=stream is not None,
    )
    ingest_servicer = IngestServicer(
        projects,
        sink,
        settings.retry_after_seconds,
        on_storage_unavailable=monitor.mark_unavailable,
        retention=settings.retention,
        dead_letters=recorder,
        # The same cache time as keys: a suppression takes effect as a revocation does, and
        # in stream mode the same grace through a database outage.
        suppressions=SuppressionDirectory(
            session_factory,
            settings.project_cache_ttl,
            stale_for=settings.stream_key_grace if stream is not None else 0.0,
        ),
    )
    decoding.register(ingest_pb2_grpc.add_IngestServiceServicer_to_server, ingest_servicer, server)
    decoding.register(
        project_pb2_grpc.add_ProjectServiceServicer_to_server,
        ProjectServicer(projects, session_factory),
        server,
    )
    decoding.register(
        people_pb2_grpc.add_PeopleServiceServicer_to_server,
        PeopleServicer(projects, session_factory),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, PROJECT_SERVICE_NAME, PEOPLE_SERVICE_NAME, health.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return IngestServer(server, engine, health_servicer, monitor, recorder, stream), port
