"""One gRPC server process, run until it is told to stop (`apex-ingest grpc`)."""

from __future__ import annotations

import logging
import os

from apex_ingest.common import metrics
from apex_ingest.common.settings import Internal, ServerSettings, address_host
from apex_ingest.common.stop_signals import StopSignals
from apex_ingest.server.server import create_server

log = logging.getLogger(__name__)


def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight calls within the grace period."""
    stop = StopSignals()
    if settings.migrate_on_start:
        from apex_ingest.ops.supervisor import migrate_at_start

        migrate_at_start(lambda: bool(stop.received))
        if stop.received:
            return
    # Before the gRPC port is taken: a metrics port that cannot be had stops the process while
    # it serves nothing yet.
    metrics.serve_metrics(settings.host, settings.metrics_port)
    server, port = create_server(f"{address_host(settings.host)}:{settings.grpc_port}", settings)
    server.start()
    log.info("gRPC server listening on %s:%d", settings.host, port)
    received = stop.wait(until=_orphaned)
    if received:
        log.info("received %s, draining", received)
    else:
        log.warning("the supervising process is gone; draining")
    server.stop(settings.shutdown_grace)
    log.info("gRPC server stopped")


def _orphaned() -> bool:
    """True once the `serve` process that started this one (Internal.PARENT_PID) has died."""
    parent = Internal.get(Internal.PARENT_PID)
    return parent.isdigit() and os.getppid() != int(parent)
