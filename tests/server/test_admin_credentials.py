"""Every RPC but ingestion, health and reflection needs the project's secret key (issue #18
item 6; CONTRACT section 4).

One parametrized test over every method of every service declared in the apex_ingest.v1
protos, found through the descriptor pool: a service added later (e.g. PeopleService) is
covered without touching this file. Each method is called with its empty request, without
credentials (UNAUTHENTICATED), with an unknown secret key (UNAUTHENTICATED) and with a public key
(PERMISSION_DENIED). A method that answers anything else to an empty request (it checks the
request before the caller, or the server does not serve it: UNIMPLEMENTED) fails loudly.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

import apex_ingest.v1
from apex_ingest.common.rpc import SERVICE_NAME
from tests.conftest import RunningServer, make_project, start_server

#: Services that need no credential: ingestion (a public key is its credential). Health and
#: reflection are not in apex_ingest.v1.
OPEN_SERVICES = frozenset({SERVICE_NAME})


def v1_services() -> list[ServiceDescriptor]:
    """Every service of every apex_ingest/v1/*.proto, through the default descriptor pool."""
    pool = descriptor_pool.Default()
    services: list[ServiceDescriptor] = []
    for module in pkgutil.iter_modules(apex_ingest.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        generated = importlib.import_module(f"apex_ingest.v1.{module.name}")  # registers it
        proto = pool.FindFileByName(generated.DESCRIPTOR.name)
        services.extend(proto.services_by_name.values())
    return sorted(services, key=lambda service: service.full_name)


def guarded_methods() -> list[MethodDescriptor]:
    return [
        method
        for service in v1_services()
        if service.full_name not in OPEN_SERVICES
        for method in service.methods
    ]


def test_the_enumeration_finds_the_services() -> None:
    """The enumeration itself must work, or the test below would pass on nothing."""
    names = {service.full_name for service in v1_services()}
    assert {SERVICE_NAME, "apex_ingest.v1.ProjectService"} <= names
    assert "apex_ingest.v1.ProjectService.TailEvents" in {m.full_name for m in guarded_methods()}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[grpc.Channel, str]]:
    """A server on SQLite (authentication reads the same tables on both databases), a channel,
    and a public key of a project."""
    from apex_ingest.ops.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('credentials') / 'apex.db'}"
    upgrade(url)
    server: RunningServer = start_server(url)
    try:
        public = make_project(url, "guarded")
        with grpc.insecure_channel(server.target) as channel:
            yield channel, public
    finally:
        server.server.stop(0)


def call(channel: grpc.Channel, method: MethodDescriptor, metadata: Any) -> None:
    """Call `method` with its empty request (and an empty stream for a streaming request)."""
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    options = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    request = request_class()
    if kind == (False, False):
        channel.unary_unary(path, **options)(request, metadata=metadata, timeout=5)
    elif kind == (False, True):
        for _ in channel.unary_stream(path, **options)(request, metadata=metadata, timeout=5):
            pass
    elif kind == (True, False):
        channel.stream_unary(path, **options)(iter([request]), metadata=metadata, timeout=5)
    else:
        for _ in channel.stream_stream(path, **options)(
            iter([request]), metadata=metadata, timeout=5
        ):
            pass


@pytest.mark.parametrize("method", guarded_methods(), ids=lambda method: method.full_name)
@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        ("none", grpc.StatusCode.UNAUTHENTICATED),
        ("unknown secret", grpc.StatusCode.UNAUTHENTICATED),
        ("public key", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_every_admin_rpc_needs_a_secret_key(
    live: tuple[grpc.Channel, str],
    method: MethodDescriptor,
    credential: str,
    expected: grpc.StatusCode,
) -> None:
    channel, public = live
    metadata = {
        "none": None,
        "unknown secret": (("authorization", "Bearer sk_live_made_up_for_this_test"),),
        "public key": (("authorization", f"Bearer {public}"),),
    }[credential]
    try:
        call(channel, method, metadata)
    except grpc.RpcError as error:
        code = error.code()
        assert code == expected, (
            f"{method.full_name} with {credential}: {code.name} ({error.details()}), expected "
            f"{expected.name}. Every RPC outside IngestService must authenticate the caller "
            "before anything else, and answer this to its empty request; UNIMPLEMENTED means "
            "the server does not serve the method"
        )
    else:
        pytest.fail(f"{method.full_name} answered OK with {credential}: it needs a secret key")
