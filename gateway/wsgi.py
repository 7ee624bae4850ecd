"""The WSGI entry point: ``gateway.wsgi:app`` (configured from the environment)."""

from apex_ingest.logs import configure_logging
from gateway import create_app

configure_logging()  # in each worker process: JSON lines unless APEX_LOG_FORMAT=text
app = create_app()
