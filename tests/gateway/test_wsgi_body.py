"""JSON answers reach the WSGI server as a list (gateway.json_codec.json_response), except an
answer that must be closed: a 408 whose body read is still pending (gateway.errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.test import EnvironBuilder

from gateway.errors import ApiError, handle_http_exception
from gateway.json_codec import json_response
from gateway.request_state import ParsedBody
from tests.gateway.conftest import closed_port_target, fake_app


def _start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], object]:
    return lambda data: None


def _wsgi_body(response: Any, method: str = "POST") -> Any:
    return response(EnvironBuilder(method=method).get_environ(), _start_response)


def test_a_json_answer_is_one_bytes_object_in_a_list() -> None:
    body = _wsgi_body(json_response({"received": 1}))
    assert body == [b'{"received":1}']
    assert list(_wsgi_body(json_response({"received": 1}), method="HEAD")) == []


def test_the_whole_app_answers_with_a_list() -> None:
    app = fake_app(closed_port_target())
    environ = EnvironBuilder(method="GET", path="/api/openapi.json").get_environ()
    assert not isinstance(app(environ, _start_response), list)  # a file: not json_response
    environ = EnvironBuilder(
        method="POST", path="/api/events", data=b"{", content_type="application/json"
    ).get_environ()
    body = app(environ, _start_response)
    assert isinstance(body, list) and b'"invalid_request"' in body[0]


class _PendingRead(ApiError):
    def __init__(self) -> None:
        super().__init__(408, "The request body was not received within 1 seconds.")
        self.waited = 0

    def wait_for_reader(self) -> None:
        self.waited += 1


def test_an_answer_waiting_for_its_reader_is_closed_by_the_server() -> None:
    error = _PendingRead()
    app = fake_app(closed_port_target())
    with app.test_request_context():
        response = handle_http_exception(error)
    body = _wsgi_body(response)
    assert not isinstance(body, list)  # an iterator with close(), which the server calls
    assert b"".join(body) and error.waited == 0
    body.close()
    assert error.waited == 1
    assert response.headers["Connection"] == "close"


def test_another_answer_for_a_body_whose_read_is_pending_waits_for_it_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rate limit is counted before a body's own error is answered: a 429 for a body still
    being read must wait for its reader as the 408 would."""
    from gateway import api, ratelimit

    error = _PendingRead()
    monkeypatch.setattr(api, "parsed_body", lambda: ParsedBody("pk", None, error))

    def limited() -> None:
        raise ApiError(429, retry_after=1)

    monkeypatch.setattr(ratelimit, "check", limited)
    app = fake_app(closed_port_target())
    response = app.test_client().post("/api/events", data=b"{}", content_type="text/plain")
    assert response.status_code == 429 and error.waited == 0
    response.close()  # as the server does once it has sent it
    assert error.waited == 1
    assert response.headers["Connection"] == "close"
