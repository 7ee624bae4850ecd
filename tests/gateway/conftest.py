"""Fixtures for the gateway: the Flask app against a real in-process gRPC server (SQLite).

Every answer that `api` returns has been checked against gateway/openapi.json: its status is
documented for the endpoint and its body matches that status's schema.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from importlib import resources
from typing import Any

import grpc
import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from sqlalchemy import create_engine, text
from werkzeug.test import TestResponse

from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway.app import create_app
from tests.conftest import RunningServer

OPENAPI: dict[str, Any] = json.loads(
    resources.files("gateway").joinpath("openapi.json").read_text(encoding="utf-8")
)
EVENTS_PATH = "/api/events"


def schema_validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    """A validator for a schema inside the OpenAPI document (its $refs resolve)."""
    return Draft202012Validator({**schema, "components": OPENAPI["components"]})


def assert_documented(response: TestResponse, path: str = EVENTS_PATH) -> None:
    """The answer is one the OpenAPI document promises, body and headers."""
    operation = OPENAPI["paths"][path]["post" if path == EVENTS_PATH else "get"]
    documented = operation["responses"]
    status = str(response.status_code)
    assert status in documented, f"undocumented status {status}: {response.get_data(as_text=True)}"
    spec = documented[status]
    assert response.mimetype == "application/json"
    schema = spec["content"]["application/json"]["schema"]
    body = response.get_json()
    errors = list(schema_validator(schema).iter_errors(body))
    assert not errors, f"{status} body {body} does not match the document: {errors[0].message}"
    for header in spec.get("headers", {}):
        if header == "Retry-After":
            assert int(response.headers["Retry-After"]) >= 1


@dataclass
class Api:
    """Posts to /api/events through the Flask test client, checking each answer."""

    client: FlaskClient

    def post(
        self,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> TestResponse:
        data = raw if raw is not None else json.dumps(body).encode()
        response = self.client.post(
            EVENTS_PATH, data=data, content_type=content_type, headers=dict(headers or {}), **kwargs
        )
        assert_documented(response)
        return response


def stored(database_url: str, where: str = "1=1", **params: Any) -> list[dict[str, Any]]:
    """Rows of the events table, oldest first."""
    engine = create_engine(database_url)
    data_sql = "data::text AS data" if engine.dialect.name == "postgresql" else "data"
    try:
        with engine.connect() as connection:
            result = connection.execute(
                text(
                    "SELECT project_id, event_id, type, visitor_id, user_id, url, referrer, "
                    f"{data_sql}, occurred_at, received_at, ip, user_agent "
                    f"FROM events WHERE {where} ORDER BY id"
                ),
                params,
            )
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def closed_port_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Overrides for create_app; tests change it before `app` is built."""
    return {}


@pytest.fixture
def app(grpc_server: RunningServer, app_config: dict[str, Any]) -> Flask:
    config: dict[str, Any] = {
        "TESTING": True,
        "APEX_GRPC_TARGET": grpc_server.target,
        "APEX_RATE_LIMIT": "10000/second",
        "APEX_RATE_LIMIT_STORAGE": "memory://",
        **app_config,
    }
    return create_app(config)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def api(client: FlaskClient) -> Api:
    return Api(client)


@pytest.fixture
def rows(grpc_server: RunningServer) -> Callable[[], list[dict[str, Any]]]:
    """The events stored by the test's gRPC server so far."""
    return lambda: stored(grpc_server.database_url)


# A stand-in IngestService for answers the real server gives only in hard-to-arrange moments
# (deadlines, RESOURCE_EXHAUSTED, storage blips). It records every request it gets.

Handler = Callable[[ingest_pb2.IngestEventsRequest, grpc.ServicerContext], int]


class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[ingest_pb2.IngestEventsRequest] = []

    def IngestEvents(
        self, request: ingest_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.IngestEventsResponse:
        self.requests.append(request)
        return ingest_pb2.IngestEventsResponse(received=self.handler(request, context))


@dataclass
class FakeServer:
    servicer: FakeIngest
    target: str


@pytest.fixture
def fake_server() -> Iterator[Callable[[Handler], FakeServer]]:
    servers: list[grpc.Server] = []

    def start(handler: Handler) -> FakeServer:
        servicer = FakeIngest(handler)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return FakeServer(servicer, f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(0)


def fake_app(target: str, **config: Any) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "APEX_GRPC_TARGET": target,
            "APEX_RATE_LIMIT": "10000/second",
            **config,
        }
    )
