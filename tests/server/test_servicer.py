"""The servicer in-process with grpcio-testing: statuses and rich error details."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from apex_ingest.common.logs import REQUEST_ID_METADATA, JsonFormatter
from apex_ingest.server import metrics
from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.errors import IngestError, StorageUnavailable
from apex_ingest.server.projects import ProjectDirectory
from apex_ingest.server.servicer import IngestServicer
from apex_ingest.server.storage import EventStore, Row
from apex_ingest.v1 import ingest_pb2
from tests.conftest import make_project

SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
METHOD = SERVICE.methods_by_name["IngestEvents"]


@pytest.fixture
def test_server(sqlite_url: str) -> Iterator[grpc_testing.Server]:
    engine = create_db_engine(sqlite_url)
    sessions = create_session_factory(engine)
    servicer = IngestServicer(ProjectDirectory(sessions, ttl=0), EventStore(sessions, 1))
    yield grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())
    engine.dispose()


def invoke(
    server: grpc_testing.Server, request: ingest_pb2.IngestEventsRequest
) -> tuple[ingest_pb2.IngestEventsResponse | None, grpc.StatusCode, status_pb2.Status | None]:
    rpc = server.invoke_unary_unary(METHOD, (), request, None)
    response, trailing, code, _details = rpc.termination()
    status = None
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
    return response, code, status


def test_ok_answers_received(test_server: grpc_testing.Server, sqlite_url: str) -> None:
    key = make_project(sqlite_url)
    request = ingest_pb2.IngestEventsRequest(
        project_key=key, events=[ingest_pb2.Event(type="pageview", url="/", visitor_id="v")] * 3
    )
    response, code, _ = invoke(test_server, request)
    assert code is grpc.StatusCode.OK
    assert response is not None and response.received == 3


def test_invalid_argument_carries_bad_request(test_server: grpc_testing.Server) -> None:
    request = ingest_pb2.IngestEventsRequest(events=[ingest_pb2.Event(url="x")])
    _, code, status = invoke(test_server, request)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    fields = {v.field for v in bad_request.field_violations}
    assert fields == {"project_key", "events[0].type", "events[0].url"}


def test_unknown_key_is_unauthenticated(test_server: grpc_testing.Server) -> None:
    request = ingest_pb2.IngestEventsRequest(
        project_key="pk_live_nope", events=[ingest_pb2.Event(type="t", url="/")]
    )
    _, code, _ = invoke(test_server, request)
    assert code is grpc.StatusCode.UNAUTHENTICATED


def test_storage_down_is_unavailable_with_retry_info(tmp_path: object) -> None:
    # A database that cannot be opened: the directory does not exist.
    engine = create_db_engine("sqlite:////nonexistent-dir/apex.db")
    sessions = create_session_factory(engine)
    servicer = IngestServicer(ProjectDirectory(sessions, ttl=0), EventStore(sessions, 2), 2)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: servicer}, grpc_testing.strict_real_time()
    )
    request = ingest_pb2.IngestEventsRequest(
        project_key="pk_live_x", events=[ingest_pb2.Event(type="t", url="/")]
    )
    _, code, status = invoke(server, request)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == 2


@pytest.mark.parametrize("method", ["IngestEvents", "IngestMany"])
@pytest.mark.parametrize("for_deadline", [False, True])
def test_a_storage_timeout_is_logged_by_what_happened(
    sqlite_url: str, caplog: pytest.LogCaptureFixture, method: str, for_deadline: bool
) -> None:
    """A refusal with no database error behind it (no answer in time) says so, not "None"; one
    given early for the caller's deadline does not turn health (one caller's short wait)."""

    class SilentStore(EventStore):
        def store_many(
            self, requests: object, deadline: float | None = None
        ) -> list[IngestError | None]:
            return [StorageUnavailable(1, maybe_stored=True, for_deadline=for_deadline)]

    engine = create_db_engine(sqlite_url)
    sessions = create_session_factory(engine)
    marked: list[bool] = []
    servicer = IngestServicer(
        ProjectDirectory(sessions, ttl=0),
        SilentStore(sessions, 1),
        on_storage_unavailable=lambda: marked.append(True),
    )
    server = grpc_testing.server_from_dictionary(
        {SERVICE: servicer}, grpc_testing.strict_real_time()
    )
    request = ingest_pb2.IngestEventsRequest(
        project_key=make_project(sqlite_url), events=[ingest_pb2.Event(type="t", url="/")]
    )
    with caplog.at_level(logging.WARNING, logger="apex_ingest.server.servicer"):
        if method == "IngestEvents":
            _, code, _ = invoke(server, request)
            assert code is grpc.StatusCode.UNAVAILABLE
        else:
            many = ingest_pb2.IngestManyRequest(requests=[request])
            rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), many, None)
            response, _, code, _ = rpc.termination()
            assert code is grpc.StatusCode.OK
            assert response.results[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    engine.dispose()
    [line] = [r.getMessage() for r in caplog.records if r.name == "apex_ingest.server.servicer"]
    assert "None" not in line and "same event ids" in line
    assert marked == ([] if for_deadline else [True])


def test_unexpected_failure_is_internal_not_unknown(sqlite_url: str) -> None:
    class BrokenStore(EventStore):
        def store(self, project_id: int, rows: list[Row], deadline: float | None = None) -> None:
            raise RuntimeError("bug")

    engine = create_db_engine(sqlite_url)
    sessions = create_session_factory(engine)
    servicer = IngestServicer(ProjectDirectory(sessions, ttl=0), BrokenStore(sessions, 1))
    server = grpc_testing.server_from_dictionary(
        {SERVICE: servicer}, grpc_testing.strict_real_time()
    )
    request = ingest_pb2.IngestEventsRequest(
        project_key=make_project(sqlite_url), events=[ingest_pb2.Event(type="t", url="/")]
    )
    _, code, _ = invoke(server, request)
    assert code is grpc.StatusCode.INTERNAL
    engine.dispose()


def test_an_allowlist_stored_in_unicode_matches_the_punycode_origin(sqlite_url: str) -> None:
    """Rows written before hosts were encoded still let the real site in."""
    from sqlalchemy import update

    from apex_ingest.server.models import Project

    key = make_project(sqlite_url)
    engine = create_db_engine(sqlite_url)
    sessions = create_session_factory(engine)
    with sessions.begin() as session:
        session.execute(
            update(Project)
            .where(Project.key == key)
            .values(allowed_origins=["https://bücher.example"])
        )
    info = ProjectDirectory(sessions, ttl=0).lookup(key)
    engine.dispose()
    assert info is not None
    assert info.allows_origin("https://xn--bcher-kva.example")
    assert not info.allows_origin("https://other.example")


def test_each_rpc_is_logged_and_measured_with_its_outcome(
    test_server: grpc_testing.Server, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One access-log record per RPC (code, events, the project once authenticated), the
    in-flight gauge back where it was, and the caller's request id in the record."""
    key = make_project(sqlite_url)
    event = ingest_pb2.Event(type="pageview", url="/", visitor_id="v")

    def in_flight() -> float:
        labels = {"method": "IngestEvents"}
        return REGISTRY.get_sample_value("apex_grpc_requests_in_flight", labels) or 0

    def durations() -> float:
        labels = {"method": "IngestEvents", "code": "UNAUTHENTICATED"}
        return REGISTRY.get_sample_value("apex_grpc_request_duration_seconds_count", labels) or 0

    before, refusals = in_flight(), durations()
    caplog.handler.setFormatter(JsonFormatter())  # it reads the request id as it formats
    with caplog.at_level(logging.INFO, logger="apex_ingest.access"):
        rpc = test_server.invoke_unary_unary(
            METHOD,
            ((REQUEST_ID_METADATA, "req-42"),),
            ingest_pb2.IngestEventsRequest(project_key=key, events=[event] * 2),
            None,
        )
        assert rpc.termination()[2] is grpc.StatusCode.OK
        refused = ingest_pb2.IngestEventsRequest(project_key="pk_live_nope", events=[event])
        assert invoke(test_server, refused)[1] is grpc.StatusCode.UNAUTHENTICATED
    records = [r for r in caplog.records if r.name == "apex_ingest.access"]
    assert [(r.__dict__["code"], r.__dict__["events"]) for r in records] == [
        ("OK", 2),
        ("UNAUTHENTICATED", 1),
    ]
    assert records[0].__dict__["project"] == key
    assert records[1].__dict__["project"] == metrics.UNKNOWN_PROJECT
    assert all(
        r.__dict__["rpc"] == "IngestEvents" and r.__dict__["duration_ms"] >= 0 for r in records
    )
    assert in_flight() == before and durations() == refusals + 1
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    assert lines[0]["request_id"] == "req-42" and lines[1]["request_id"] != "req-42"
