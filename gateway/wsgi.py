"""The WSGI entry point: ``gateway.wsgi:app`` (configured from the environment)."""

import sys

from apex_ingest.common.logs import configure_logging
from apex_ingest.common.settings import GatewaySettings, load
from gateway import shutdown
from gateway.app import create_app

configure_logging()  # in each worker process: JSON lines unless APEX_LOG_FORMAT=text
if "granian" in sys.modules:  # a granian worker (what `serve` and `gateway` run); another
    # WSGI server keeps its own signal handling.
    shutdown.install_in_granian_worker(load(GatewaySettings).shutdown_drain)
    shutdown.stop_when_orphaned()
app = create_app()
