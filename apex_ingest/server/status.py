"""Refusals as rich gRPC statuses (google.rpc.Status with BadRequest / RetryInfo details)."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.common.rpc import bad_request, retry_info
from apex_ingest.server.errors import (
    DeadlinePassed,
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
    UnknownProject,
)


def error_status(error: IngestError) -> grpc.Status:
    """The status a call refused for `error` ends with."""
    return rpc_status.to_status(rich_status(error))


def rich_status(error: IngestError) -> status_pb2.Status:
    """`error` as a google.rpc.Status: its code, message and details."""
    if isinstance(error, InvalidRequest):
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT,
            message=str(error),
            details=bad_request((v.field, v.description) for v in error.violations),
        )
    elif isinstance(error, UnknownProject):
        status = status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message=str(error))
    elif isinstance(error, OriginNotAllowed):
        status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=str(error))
    elif isinstance(error, DeadlinePassed):
        status = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=str(error))
    elif isinstance(error, StorageUnavailable):
        status = status_pb2.Status(
            code=code_pb2.UNAVAILABLE,
            message=str(error),
            details=[retry_info(error.retry_after_seconds)],
        )
    else:
        status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    return status
