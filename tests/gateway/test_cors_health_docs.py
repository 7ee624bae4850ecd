"""CORS, /healthz, / and the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from flask.testing import FlaskClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from jsonschema import Draft202012Validator

from tests.gateway.conftest import OPENAPI, Api, fake_app, schema_validator

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

PREFLIGHT = {
    "Origin": "https://shop.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def test_preflight_is_answered_with_max_age(client: FlaskClient) -> None:
    response = client.options("/api/events", headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()
    assert response.headers["Access-Control-Max-Age"] == "86400"


@pytest.mark.parametrize("app_config", [{"APEX_CORS_MAX_AGE": "600"}])
def test_max_age_is_configurable(client: FlaskClient) -> None:
    response = client.options("/api/events", headers=PREFLIGHT)
    assert response.headers["Access-Control-Max-Age"] == "600"


def test_answers_carry_cors_headers_even_errors(api: Api, project_key: str) -> None:
    origin = {"Origin": "https://any.example"}
    body = {"type": "pageview", "visitorId": "v", "projectKey": project_key, "url": "/"}
    ok = api.post(body, headers=origin)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-RateLimit-Remaining" in ok.headers["Access-Control-Expose-Headers"]
    bad = api.post(raw=b"{", headers=origin)
    assert bad.status_code == 400
    assert bad.headers["Access-Control-Allow-Origin"] == "*"


def test_healthz_serving(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "SERVING"}


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, str]]:
    """A gRPC server with only the health service, whose answers the test sets."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize(
    ("overall", "service", "expected"),
    [
        (SERVING, NOT_SERVING, 503),
        (NOT_SERVING, None, 503),  # only the overall status is known: that one counts
        (SERVING, None, 200),
        (NOT_SERVING, SERVING, 200),
    ],
)
def test_healthz_follows_the_servers_health(
    health_server: tuple[health.HealthServicer, str],
    overall: int,
    service: int | None,
    expected: int,
) -> None:
    servicer, target = health_server
    servicer.set("", overall)
    if service is not None:
        servicer.set("apex_ingest.v1.IngestService", service)
    response = fake_app(target).test_client().get("/healthz")
    assert response.status_code == expected
    validator = schema_validator(OPENAPI["components"]["schemas"]["Health"])
    validator.validate(response.get_json())


def test_openapi_document_is_served(client: FlaskClient) -> None:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert json.loads(response.data) == OPENAPI


def test_openapi_document_is_valid_openapi_3_1() -> None:
    assert OPENAPI["openapi"].startswith("3.1")
    # Every schema is a valid JSON Schema (2020-12, OpenAPI 3.1's dialect).
    for schema in OPENAPI["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    operation = OPENAPI["paths"]["/api/events"]["post"]
    for status in ("200", "400", "401", "403", "405", "413", "415", "429", "503", "504"):
        assert status in operation["responses"], status


def test_request_examples_match_the_request_schema() -> None:
    content = OPENAPI["paths"]["/api/events"]["post"]["requestBody"]["content"]
    validator = schema_validator(content["application/json"]["schema"])
    for example in content["application/json"]["examples"].values():
        validator.validate(example["value"])
    assert not validator.is_valid({"projectKey": "k"})  # neither format


def test_error_codes_are_documented() -> None:
    from gateway.errors import CODES

    error = OPENAPI["components"]["schemas"]["ErrorResponse"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == set(CODES.values())
    for status, code in CODES.items():
        assert f"`{code}` ({status})" in OPENAPI["info"]["description"]
