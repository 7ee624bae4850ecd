"""Requests that cannot be decoded are the caller's fault: INVALID_ARGUMENT, not INTERNAL.

gRPC answers a request its deserializer cannot parse (a string field that is not UTF-8, bytes
that are not the message at all; upb's message says which) with INTERNAL "Exception
deserializing request!", which tells the caller the server is broken and invites a retry of
the same bytes. Here each method's deserializer hands such a request on as `Undecodable`, and
the method refuses it with INVALID_ARGUMENT and a BadRequest naming `request`.

Methods that take one request only (all of ours). `register` takes the generated
`add_*Servicer_to_server` function and gives it a stand-in for the server that rewrites the
method handlers it registers (grpc's generated code registers one dict twice: as a generic
handler and as registered methods). tests/server/test_decoding.py fails if the generated code
stops registering that way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.common.rpc import bad_request

log = logging.getLogger(__name__)


class Undecodable:
    """A request whose bytes could not be parsed, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def register(add_to_server: Callable[[Any, grpc.Server], None], servicer: Any, server: Any) -> None:
    """`add_to_server(servicer, server)`, with every unary method refusing undecodable requests."""
    add_to_server(servicer, _Registrar(server))


class _Registrar:
    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        """Replaced by the rewritten handlers of add_registered_method_handlers."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        tolerant = {name: _tolerant(service, name, h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, tolerant),)
        )
        self._server.add_registered_method_handlers(service, tolerant)


def _tolerant(service: str, method: str, handler: Any) -> grpc.RpcMethodHandler:
    # Every method here takes one request (unary or server-streaming answers).
    kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
    behaviour = getattr(handler, kind)
    decode = handler.request_deserializer
    if behaviour is None or decode is None:
        return handler

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as error:
            return Undecodable(str(error))

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            # DEBUG: the caller is told why, and garbage traffic must not flood the log.
            log.debug("/%s/%s: undecodable request refused: %s", service, method, request.reason)
            status = status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT,
                message=f"the request could not be decoded: {request.reason}",
                details=bad_request([("request", request.reason)]),
            )
            context.abort_with_status(rpc_status.to_status(status))
        return behaviour(request, context)

    return handler._replace(request_deserializer=deserialize, **{kind: call})
