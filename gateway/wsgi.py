"""The WSGI entry point: ``gateway.wsgi:app`` (configured from the environment)."""

from gateway import create_app

app = create_app()
