"""gateway/debugger.py: the debugger page and its feed (issue #17)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import grpc
from flask.testing import FlaskClient

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import SECRET, add_key, find_project
from apex_ingest.v1 import ingest_pb2, ingest_pb2_grpc
from gateway import debugger, shutdown
from tests.conftest import RunningServer


def secret_for(database_url: str, public_key: str) -> str:
    engine = create_db_engine(database_url)
    try:
        with create_session_factory(engine).begin() as session:
            project = find_project(session, public_key)
            assert project is not None
            return add_key(session, project.id, SECRET)
    finally:
        engine.dispose()


def test_the_page_is_served_without_the_key_anywhere(client: FlaskClient) -> None:
    page = client.get("/debugger")
    assert page.status_code == 200 and b"debugger.js" in page.data
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    script = client.get("/debugger.js")
    assert script.status_code == 200 and b"sessionStorage" in script.data
    assert b"X-Apex-Secret-Key" in script.data


def test_the_feed_refuses_missing_wrong_and_public_keys(
    client: FlaskClient, project_key: str
) -> None:
    def named(response: Any) -> list[str]:  # each error names the header or parameter at fault
        return [d["field"] for d in response.get_json()["error"]["details"]]

    missing = client.get("/debugger/feed")
    assert missing.status_code == 401 and named(missing) == ["X-Apex-Secret-Key"]
    wrong = client.get("/debugger/feed", headers={"X-Apex-Secret-Key": "sk_live_nope"})
    assert wrong.status_code == 401 and b"data:" not in wrong.data
    assert named(wrong) == ["X-Apex-Secret-Key"]
    public = client.get("/debugger/feed", headers={"X-Apex-Secret-Key": project_key})
    assert public.status_code == 403 and named(public) == ["X-Apex-Secret-Key"]
    bad = client.get("/debugger/feed?after_event=-1", headers={"X-Apex-Secret-Key": "sk_live_nope"})
    assert bad.status_code == 400 and named(bad) == ["after_event"]
    # Not a cross-origin API: no CORS headers for other sites.
    cross = client.get("/debugger/feed", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in cross.headers


def test_the_feed_streams_new_events_and_rejections(
    client: FlaskClient, grpc_server: RunningServer, project_key: str
) -> None:
    secret = secret_for(grpc_server.database_url, project_key)
    response = client.get("/debugger/feed", headers={"X-Apex-Secret-Key": secret}, buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    chunks = iter(cast(Iterator[bytes], response.response))  # the test client yields bytes
    assert next(chunks) == b": connected\n\n"
    got: list[dict[str, Any]] = []

    def read() -> None:
        for chunk in chunks:
            got.append(json.loads(chunk.decode().removeprefix("data: ")))
            if len(got) == 2:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    with grpc.insecure_channel(grpc_server.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(
                project_key=project_key,
                events=[ingest_pb2.Event(id="e1", type="signup", url="/", visitor_id="v1")],
            ),
            timeout=5,
        )
        with contextlib.suppress(grpc.RpcError):
            stub.IngestEvents(
                ingest_pb2.IngestEventsRequest(
                    project_key=project_key,
                    events=[ingest_pb2.Event(id="e2", type="click", url="nope")],
                ),
                timeout=5,
            )
    reader.join(5)
    response.close()
    kinds = {item["kind"]: item for item in got}
    assert kinds["event"]["event_id"] == "e1" and kinds["event"]["visitor_id"] == "v1"
    assert kinds["dead_letter"]["violations"][0]["field"] == "events[0].url"


def test_a_draining_worker_ends_its_feeds_and_refuses_new_ones(
    client: FlaskClient, grpc_server: RunningServer, project_key: str
) -> None:
    """A feed lasts up to FEED_SECONDS: without this a stopping worker waited for it."""
    secret = secret_for(grpc_server.database_url, project_key)
    headers = {"X-Apex-Secret-Key": secret}
    response = client.get("/debugger/feed", headers=headers, buffered=False)
    chunks = iter(cast(Iterator[bytes], response.response))  # the test client yields bytes
    assert next(chunks) == b": connected\n\n"
    assert debugger._open_feeds  # this one (an earlier test's may still be being forgotten)
    try:
        shutdown.start_draining()
        started = time.monotonic()
        rest = list(chunks)  # ends when the feed does: at once, or after FEED_SECONDS
        assert time.monotonic() - started < 3, "the feed outlived the drain"
        assert rest == []
        refused = client.get("/debugger/feed", headers=headers)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    finally:
        shutdown._draining.clear()
        response.close()
    deadline = time.monotonic() + 3  # the call's done callbacks run on gRPC's own thread
    while debugger._open_feeds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert debugger._open_feeds == set()
