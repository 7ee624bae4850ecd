"""Every admin RPC answers UNAVAILABLE when its storage cannot (never UNKNOWN), like ingestion.

Same enumeration as test_admin_credentials.py (every method outside IngestService, found in the
descriptor pool), against a server on PostgreSQL behind a proxy that the test cuts once the
project's secret key is cached: each method is then called with a request it accepts. A method
added later whose empty request it refuses needs an entry in REQUESTS: the test says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from apex_ingest.server.database import create_db_engine, create_session_factory
from apex_ingest.server.projects import SECRET, add_key, find_project
from apex_ingest.v1 import project_pb2, project_pb2_grpc
from tests.conftest import make_project, start_server
from tests.reliability.support import pg_address, proxied_url
from tests.server.test_admin_credentials import guarded_methods
from tests.tcp_proxy import TcpProxy

#: Requests the methods accept (the empty one otherwise).
REQUESTS: dict[str, dict[str, Any]] = {
    "ReplayDeadLetters": {"all": True},
    "PurgeDeadLetters": {"all": True},
    "CreateKey": {"kind": "public"},
    "RevokeKey": {"id": 1},
    "DeletePerson": {"user_ids": ["u1"]},
    "LiftSuppression": {"user_ids": ["u1"]},
    "ExportPerson": {"user_ids": ["u1"]},
}


@pytest.fixture(scope="module")
def cut_off() -> Iterator[tuple[grpc.Channel, tuple[tuple[str, str]]]]:
    """A channel to a server whose PostgreSQL is unreachable, and a secret key it has cached."""
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database() as url:
        public = make_project(url, "cut off")
        engine = create_db_engine(url)
        try:
            with create_session_factory(engine).begin() as session:
                project = find_project(session, public)
                assert project is not None
                secret = add_key(session, project.id, SECRET)
        finally:
            engine.dispose()
        proxy = TcpProxy(*pg_address(url))
        server = start_server(proxied_url(url, proxy.port), project_cache_ttl=600.0)
        metadata = (("authorization", f"Bearer {secret}"),)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = project_pb2_grpc.ProjectServiceStub(channel)  # type: ignore[no-untyped-call]
                stub.GetProject(project_pb2.GetProjectRequest(), metadata=metadata, timeout=5)
                proxy.cut()  # the secret stays cached for 600 s; nothing else is
                yield channel, metadata
        finally:
            server.server.stop(0)
            proxy.close()


def call(channel: grpc.Channel, method: MethodDescriptor, metadata: Any) -> None:
    request = GetMessageClass(method.input_type)(**REQUESTS.get(method.name, {}))
    response_class = GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    options = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    assert not method.client_streaming, "no client-streaming admin RPC yet: extend call()"
    if method.server_streaming:
        for _ in channel.unary_stream(path, **options)(request, metadata=metadata, timeout=3):
            pass
    else:
        channel.unary_unary(path, **options)(request, metadata=metadata, timeout=10)


@pytest.mark.parametrize("method", guarded_methods(), ids=lambda method: method.full_name)
def test_every_admin_rpc_answers_unavailable_without_its_storage(
    cut_off: tuple[grpc.Channel, Any], method: MethodDescriptor
) -> None:
    channel, metadata = cut_off
    expected = grpc.StatusCode.UNAVAILABLE  # a tail already running polls on through an outage
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, method, metadata)
    error: Any = raised.value
    assert error.code() == expected, (
        f"{method.full_name} without its database: {error.code().name} ({error.details()}), "
        f"expected {expected.name}. INVALID_ARGUMENT means its request needs an entry in "
        "REQUESTS; UNKNOWN means a storage error escaped (storage_errors_unavailable)"
    )
