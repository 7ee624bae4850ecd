"""A request that cannot be decoded is INVALID_ARGUMENT naming `request`, never INTERNAL."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from apex_ingest.v1 import ingest_pb2, people_pb2, project_pb2
from tests.conftest import RunningServer, make_project, start_server


@pytest.fixture
def running(sqlite_url: str) -> Iterator[RunningServer]:
    server = start_server(sqlite_url)
    yield server
    server.server.stop(0)


def _call(running: RunningServer, method: str, body: bytes) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(running.target) as channel:
        try:
            if "TailEvents" in method:
                return b"".join(channel.unary_stream(method)(body, timeout=10))
            answer: bytes = channel.unary_unary(method)(body, timeout=10)
        except grpc.RpcError as error:
            return error
        return answer


def _request(key: str, url: str) -> bytes:
    event = ingest_pb2.Event(type="pageview", url=url, visitor_id="v")
    return ingest_pb2.IngestEventsRequest(project_key=key, events=[event]).SerializeToString()


@pytest.mark.parametrize(
    "method",
    ["IngestEvents", "IngestMany", "project:TailEvents", "people:DeletePerson", "garbage"],
)
def test_an_undecodable_request_is_invalid_argument(
    running: RunningServer, sqlite_url: str, method: str
) -> None:
    """gRPC's own answer was INTERNAL "Exception deserializing request!", and the generated
    registration must keep going through decoding.register (else this is UNIMPLEMENTED)."""
    good = _request(make_project(sqlite_url), "/caf\xe9")
    bad = good.replace("/caf\xe9".encode(), b"/caf\xe9")  # Latin-1, not UTF-8
    path = "/apex_ingest.v1.IngestService/IngestEvents"
    if method == "IngestMany":
        path = "/apex_ingest.v1.IngestService/IngestMany"
        many = ingest_pb2.IngestManyRequest(
            requests=[ingest_pb2.IngestEventsRequest.FromString(good)]
        ).SerializeToString()
        bad = many.replace("/caf\xe9".encode(), b"/caf\xe9")
    elif method == "project:TailEvents":  # a server-streaming answer
        path = "/apex_ingest.v1.ProjectService/TailEvents"
        bad = project_pb2.TailEventsRequest(type="caf\xe9").SerializeToString()
        bad = bad.replace("caf\xe9".encode(), b"caf\xe9")
    elif method == "people:DeletePerson":
        path = "/apex_ingest.v1.PeopleService/DeletePerson"
        bad = people_pb2.DeletePersonRequest(user_ids=["caf\xe9"]).SerializeToString()
        bad = bad.replace("caf\xe9".encode(), b"caf\xe9")
    elif method == "garbage":
        bad = b"\xff\xff\xff\xff"
    error = _call(running, path, bad)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violations)
    assert [v.field for v in violations.field_violations] == ["request"]


def test_a_decodable_request_is_served_as_before(running: RunningServer, sqlite_url: str) -> None:
    answer = _call(
        running,
        "/apex_ingest.v1.IngestService/IngestEvents",
        _request(make_project(sqlite_url), "/caf\xe9"),
    )
    assert isinstance(answer, bytes)
    assert ingest_pb2.IngestEventsResponse.FromString(answer).received == 1
