"""The SDK tests' fake gateway cannot drift from the real one: every answer it can build is
validated against ``gateway/openapi.json``, and its codes are the gateway's.

(The fake once answered ``invalid_argument`` and ``unauthenticated``, which the gateway never
sends, and ``Retry-After: 0``, which it never sends either.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from apex_ingest_sdk.errors import SERVER_CODES
from jsonschema import Draft202012Validator

from gateway import errors as gateway_errors
from tests.client.sdk_fake_ingest import (
    CODES,
    RETRY_STATUSES,
    Answer,
    Received,
    foreign,
    ok,
    refuse,
)

ROOT = Path(__file__).resolve().parents[2]
OPENAPI: dict[str, Any] = json.loads((ROOT / "gateway" / "openapi.json").read_text())
RESPONSES: dict[str, Any] = OPENAPI["paths"]["/api/events"]["post"]["responses"]
#: Answered for any unknown path (a wrong host path); not a response of /api/events itself.
WRONG_PATH_STATUSES = {404}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = OPENAPI
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    # Keep the document's components reachable for the schema's own $refs.
    return Draft202012Validator({**schema, "components": OPENAPI["components"]})


def check_against_contract(answer: Answer) -> None:
    """Fail unless ``answer`` is one the gateway could give to ``POST /api/events``."""
    assert answer.from_gateway, "a foreign answer is not the gateway's"
    status = str(answer.status)
    if status in RESPONSES:
        response = _resolve(RESPONSES[status])
    else:
        assert answer.status in WRONG_PATH_STATUSES, f"openapi.json has no {status} answer"
        response = {
            "headers": {},
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            },
        }
    headers = {k.lower(): v for k, v in answer.headers.items()}
    assert headers.get("content-type") == "application/json"
    schema = response["content"]["application/json"]["schema"]
    _validator(schema).validate(answer.json())
    documented = {name.lower(): _resolve(spec) for name, spec in response["headers"].items()}
    for name, value in headers.items():
        if name == "content-type":
            continue
        assert name in documented, f"{name} is not documented for {status}"
        header_schema = documented[name]["schema"]
        typed: Any = int(value) if header_schema.get("type") == "integer" else value
        _validator(header_schema).validate(typed)
    if answer.status in gateway_errors.RETRY_STATUSES:
        assert "retry-after" in headers, "the gateway always sends Retry-After on 429 and 503"
    else:
        assert "retry-after" not in headers


def every_answer() -> list[tuple[str, Answer]]:
    """One of each kind of answer ``ok`` and ``refuse`` can build."""
    request = Received({}, b"", b"", {"projectKey": "pk", "events": [{"id": "a"}, {"id": "b"}]})
    answers: list[tuple[str, Answer]] = [("ok", ok(request, 0))]
    for status in sorted(CODES):
        answers.append((f"{status}", refuse(status)))
        answers.append(
            (f"{status} with details", refuse(status, "bad", ("events[0].url", "must be ...")))
        )
        if status in RETRY_STATUSES:
            answers.append((f"{status} retry_after=30", refuse(status, retry_after=30)))
    return answers


@pytest.mark.parametrize(("name", "answer"), every_answer(), ids=[n for n, _ in every_answer()])
def test_every_answer_of_the_fake_matches_openapi(name: str, answer: Answer) -> None:
    check_against_contract(answer)


def test_the_fake_and_the_sdk_know_exactly_the_gateways_codes() -> None:
    assert CODES == gateway_errors.CODES
    assert dict(SERVER_CODES) == gateway_errors.CODES
    assert set(RETRY_STATUSES) == set(gateway_errors.RETRY_STATUSES)
    enum = OPENAPI["components"]["schemas"]["ErrorResponse"]["properties"]["error"]["properties"]
    assert set(enum["code"]["enum"]) == set(CODES.values())


def test_every_documented_error_status_can_be_faked() -> None:
    documented = {int(s) for s in RESPONSES if s != "200"}
    assert documented <= set(CODES)


def test_the_fake_refuses_to_build_what_the_gateway_never_sends() -> None:
    with pytest.raises(ValueError):
        refuse(418)
    with pytest.raises(ValueError):
        refuse(503, retry_after=0)
    with pytest.raises(ValueError):
        refuse(400, retry_after=1)
    with pytest.raises(AssertionError):
        check_against_contract(foreign(302, {"Location": "/"}))
