"""Content types, content encodings and the body size limit (plain, chunked, gzip)."""

from __future__ import annotations

import gzip
import json
import os
import threading
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, Request
from werkzeug.test import EnvironBuilder, TestResponse, run_wsgi_app

from gateway.errors import ApiError
from tests.gateway.conftest import Api, assert_documented

Rows = Callable[[], list[dict[str, Any]]]
LIMIT = 4096


def body_of_size(key: str, size: int) -> bytes:
    """A valid snippet body of exactly `size` bytes (padded inside data)."""
    base = {"type": "pageview", "visitorId": "v", "projectKey": key, "url": "/", "data": {"p": ""}}
    overhead = len(json.dumps(base, separators=(",", ":")))
    base["data"] = {"p": "x" * (size - overhead)}
    raw = json.dumps(base, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


def post_chunked(app: Flask, raw: bytes) -> TestResponse:
    """POST with no Content-Length, as a chunked request arrives from a WSGI server."""
    environ = EnvironBuilder(
        "/api/events", method="POST", data=raw, content_type="application/json"
    ).get_environ()
    del environ["CONTENT_LENGTH"]
    # What granian promises: it ends wsgi.input where the chunked body ends.
    environ["wsgi.input_terminated"] = True
    app_iter, status, headers = run_wsgi_app(app.wsgi_app, environ, buffered=True)
    return TestResponse(app_iter, status, headers, request=Request(environ))


def fields(response: Any) -> list[str]:
    """The fields an error answer names (CONTRACT: a header or the body when not a JSON one)."""
    return [detail["field"] for detail in response.get_json()["error"]["details"]]


def code(response: Any) -> str:
    return str(response.get_json()["error"]["code"])


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "text/plain;charset=UTF-8",
        "Application/JSON",
    ],
)
def test_accepted_content_types(api: Api, project_key: str, content_type: str) -> None:
    raw = body_of_size(project_key, 200)
    assert api.post(raw=raw, content_type=content_type).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html", ""],
)
def test_other_content_types_are_415(
    api: Api, project_key: str, rows: Rows, content_type: str
) -> None:
    response = api.post(raw=body_of_size(project_key, 200), content_type=content_type)
    assert response.status_code == 415
    assert code(response) == "unsupported_media_type"
    assert fields(response) == ["Content-Type"]
    description = response.get_json()["error"]["details"][0]["description"]
    if content_type:  # what was sent, shown; else that it is missing (not "not none")
        assert description.endswith(f", not {content_type.split(';')[0]}")
    else:
        assert description == "is missing: it must be application/json or text/plain"
    assert rows() == []


@pytest.mark.parametrize("encoding", ["br", "deflate", "compress", "gzip, br"])
def test_other_encodings_are_415(api: Api, project_key: str, rows: Rows, encoding: str) -> None:
    raw = body_of_size(project_key, 200)
    response = api.post(raw=raw, headers={"Content-Encoding": encoding})
    assert response.status_code == 415
    assert fields(response) == ["Content-Encoding"]
    assert rows() == []


def test_gzip_body(api: Api, project_key: str, rows: Rows) -> None:
    raw = gzip.compress(body_of_size(project_key, 300))
    response = api.post(raw=raw, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert len(rows()) == 1


def test_concatenated_gzip_members(api: Api, project_key: str) -> None:
    raw = body_of_size(project_key, 300)
    split = gzip.compress(raw[:100]) + gzip.compress(raw[100:])
    assert api.post(raw=split, headers={"Content-Encoding": "gzip"}).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"not gzip at all", b"", gzip.compress(b'{"a":1}')[:-6], gzip.compress(b"{}") + b"junk"],
    ids=["garbage", "empty", "truncated", "trailing-junk"],
)
def test_corrupt_gzip_is_400(api: Api, rows: Rows, raw: bytes) -> None:
    response = api.post(raw=raw, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 400
    assert fields(response) == ["body"]
    assert rows() == []


@pytest.mark.parametrize("app_config", [{"APEX_MAX_BODY_BYTES": LIMIT}])
class TestLimit:
    def test_at_the_limit_is_accepted(self, api: Api, project_key: str) -> None:
        assert api.post(raw=body_of_size(project_key, LIMIT)).status_code == 200

    def test_over_the_limit_is_413(self, api: Api, project_key: str, rows: Rows) -> None:
        response = api.post(raw=body_of_size(project_key, LIMIT + 1))
        assert response.status_code == 413
        assert code(response) == "payload_too_large"
        assert response.get_json()["error"]["details"] == [
            {"field": "body", "description": f"exceeds the limit of {LIMIT} bytes"}
        ]
        assert rows() == []

    def test_chunked_over_the_limit_is_413(self, app: Flask, project_key: str, rows: Rows) -> None:
        response = post_chunked(app, body_of_size(project_key, LIMIT + 1))
        assert response.status_code == 413
        assert fields(response) == ["body"]
        assert_documented(response)
        assert rows() == []

    def test_chunked_within_the_limit(self, app: Flask, project_key: str, rows: Rows) -> None:
        response = post_chunked(app, body_of_size(project_key, LIMIT))
        assert response.status_code == 200
        assert len(rows()) == 1

    def test_gzip_within_the_limit_when_compressed_but_over_it_inflated(
        self, api: Api, project_key: str, rows: Rows
    ) -> None:
        raw = gzip.compress(body_of_size(project_key, LIMIT + 1))
        assert len(raw) < LIMIT
        response = api.post(raw=raw, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 413
        assert rows() == []

    def test_gzip_inflating_to_exactly_the_limit(self, api: Api, project_key: str) -> None:
        raw = gzip.compress(body_of_size(project_key, LIMIT))
        assert api.post(raw=raw, headers={"Content-Encoding": "gzip"}).status_code == 200


def test_default_limit_is_one_mebibyte(api: Api, project_key: str) -> None:
    too_big = b" " * (1024 * 1024 - 1) + b"{}"
    response = api.post(raw=too_big)
    assert response.status_code == 413


def test_gzip_bomb_is_413_in_bounded_memory(api: Api, rows: Rows) -> None:
    inflated = 200 * 1024 * 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = b"\0" * (1024 * 1024)
    bomb = b"".join(compressor.compress(chunk) for _ in range(inflated // len(chunk)))
    bomb += compressor.flush()
    assert len(bomb) < 1024 * 1024  # it fits under the limit as sent
    tracemalloc.start()
    try:
        response = api.post(raw=bomb, headers={"Content-Encoding": "gzip"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    # The body as sent plus at most the limit inflated, with slack: nowhere near 200 MiB.
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"
    assert rows() == []


def _request(data: bytes = b"") -> Request:
    """A POST request whose body is `data`."""
    environ = EnvironBuilder(
        method="POST", data=data, content_type="application/json"
    ).get_environ()
    return Request(environ)


def test_reader_threads_are_reused_between_reads() -> None:
    from gateway.body import _read_within

    def readers() -> int:
        names = (thread.name for thread in threading.enumerate())
        return sum(1 for name in names if name.startswith("body-reader"))

    assert _read_within(_request(b"{}"), 100, 5) == b"{}"
    before = readers()
    for number in range(20):
        body = json.dumps({"n": number}).encode()
        assert _read_within(_request(body), 100, 5) == body
    # A reader goes back to the pool just after it answers: a read may start before that.
    assert readers() <= before + 2


def test_a_reader_raises_the_reads_own_error() -> None:
    from gateway.body import _read_within

    with pytest.raises(ApiError) as refused:
        _read_within(_request(b"x" * 101), 100, 5)
    assert refused.value.code == 413


def test_a_stalled_read_times_out_and_its_reader_is_waited_for() -> None:
    from gateway.body import BodyTimeout, _read_within

    read_end, write_end = os.pipe()
    request = _request()
    request.environ["wsgi.input"] = os.fdopen(read_end, "rb")
    request.environ["CONTENT_LENGTH"] = "10"
    with pytest.raises(BodyTimeout) as timed_out:
        _read_within(request, 100, 0.1)
    waiter = threading.Thread(target=timed_out.value.wait_for_reader)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # the read is still pending: the answer must not close yet
    os.write(write_end, b"0123456789")
    os.close(write_end)
    waiter.join(5)
    assert not waiter.is_alive()
