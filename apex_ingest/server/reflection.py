"""Server reflection as `grpc.reflection.v1` as well as `v1alpha`.

grpcio-reflection (1.85) ships only v1alpha, and clients such as `buf curl --reflect-protocol
grpc-v1` speak only v1. The two reflection.proto files are wire-identical (same messages, same
field numbers; only the package differs), so the stock v1alpha servicer serves v1 unchanged
under v1's method path; a v1 file descriptor (v1alpha's, renamed) is added to the pool so that a
client resolving the listed `grpc.reflection.v1.ServerReflection` finds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = ".grpc.reflection.v1." + field.type_name.rsplit(".", 1)[1]
    for method in proto.service[0].method:
        method.input_type = ".grpc.reflection.v1.ServerReflectionRequest"
        method.output_type = ".grpc.reflection.v1.ServerReflectionResponse"
    pool.Add(proto)


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Reflection for `service_names` (and itself), over v1alpha and v1."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    names = (*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=pool)
    servicer = reflection.ReflectionServicer(names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
