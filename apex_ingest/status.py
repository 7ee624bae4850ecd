"""Refusals as rich gRPC statuses (google.rpc.Status with BadRequest / RetryInfo details)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from apex_ingest.errors import (
    DeadlinePassed,
    IngestError,
    InvalidRequest,
    OriginNotAllowed,
    StorageUnavailable,
    UnknownProject,
)


def _packed(message: object) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)  # type: ignore[arg-type]
    return detail


def retry_info(seconds: int) -> any_pb2.Any:
    return _packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))


def error_status(error: IngestError) -> grpc.Status:
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        status = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[_packed(bad_request)]
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
    return rpc_status.to_status(status)
