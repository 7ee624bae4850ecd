"""The servicer in-process with grpcio-testing: statuses and rich error details."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from apex_ingest.server.database import create_db_engine, create_session_factory
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
