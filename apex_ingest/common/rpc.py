"""Facts about IngestService that the server and its gRPC callers share.

- `SERVICE_NAME`, read from the generated descriptor (never written out by hand);
- `retry_service_config`: the retry policy a caller's channel uses;
- rich error details (`google.rpc.BadRequest`, `google.rpc.RetryInfo`): packed here by the
  server, unpacked here by the gateway.

The SDK, which must not import this package, keeps its own copies of the retry policy and the
detail decoding; tests/client compares them with these.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from apex_ingest.v1 import ingest_pb2

#: "apex_ingest.v1.IngestService"
SERVICE_NAME: str = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
INGEST_METHOD = f"/{SERVICE_NAME}/IngestEvents"
INGEST_MANY_METHOD = f"/{SERVICE_NAME}/IngestMany"
RECORD_REFUSED_METHOD = f"/{SERVICE_NAME}/RecordRefused"

M = TypeVar("M", bound=Message)


def retry_service_config(max_attempts: int = 3, max_backoff: str = "1s") -> dict[str, Any]:
    """The channel's service config: retries of UNAVAILABLE, and round-robin balancing.

    UNAVAILABLE means the server could not be reached or its storage was down: nothing was
    stored, or (a connection broken mid-commit) nothing is known; event ids stamped before the
    call make a retry harmless either way. Few attempts with short backoff: the caller's deadline
    bounds them anyway. Retry throttling stops retries from piling onto a server that is down.
    """
    retry = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": max_backoff,
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": retry}],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def retry_service_config_json(max_attempts: int = 3, max_backoff: str = "1s") -> str:
    return json.dumps(retry_service_config(max_attempts, max_backoff))


def packed(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def retry_info(seconds: int) -> any_pb2.Any:
    return packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))


#: Serialized bytes of the violations one status lists at most. The status travels in the
#: call's trailing metadata, and gRPC clients refuse metadata (counted decoded) past 8 KiB at
#: random and past 16 KiB always: 500 violations (~39 KB) came back as RESOURCE_EXHAUSTED.
MAX_VIOLATION_BYTES = 4096
#: ErrorInfo reason of a status that lists only some of its violations.
TRUNCATED_REASON = "VIOLATIONS_TRUNCATED"
ERROR_DOMAIN = "apex_ingest"


def listed_count(violations: Iterable[tuple[str, str]]) -> int:
    """How many of the violations, in order, one answer lists: as many as fit in
    MAX_VIOLATION_BYTES (each field cut to 200 characters, each description to 300). The
    gateway caps its own (JSON type errors) by the same measure."""
    size = listed = 0
    for field, description in violations:
        cost = (
            error_details_pb2.BadRequest.FieldViolation(
                field=field[:200], description=description[:300]
            ).ByteSize()
            + 3
        )
        if size + cost > MAX_VIOLATION_BYTES:
            break
        size += cost
        listed += 1
    return listed


def bad_request(violations: Iterable[tuple[str, str]]) -> list[any_pb2.Any]:
    """BadRequest with the violations, as many as fit in MAX_VIOLATION_BYTES (in order); when
    some are left out, an ErrorInfo (reason VIOLATIONS_TRUNCATED) says how many there are."""
    every = list(violations)
    total = len(every)
    listed = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field[:200], description=description[:300]
            )
            for field, description in every[: listed_count(every)]
        ]
    )
    details = [packed(listed)]
    if total > len(listed.field_violations):
        details.append(
            packed(
                error_details_pb2.ErrorInfo(
                    reason=TRUNCATED_REASON,
                    domain=ERROR_DOMAIN,
                    metadata={
                        "violations": str(total),
                        "listed": str(len(listed.field_violations)),
                    },
                )
            )
        )
    return details


def violation_count(status: status_pb2.Status | None) -> int | None:
    """How many violations a status counted in all, when it lists only some (else None)."""
    for info in unpack(status, error_details_pb2.ErrorInfo):
        if info.reason == TRUNCATED_REASON and info.domain == ERROR_DOMAIN:
            count = info.metadata.get("violations", "")
            return int(count) if count.isdigit() else None
    return None


def unpack(status: status_pb2.Status | None, kind: type[M]) -> list[M]:
    """Each `kind` message among a rich status's details."""
    found: list[M] = []
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def field_violations(status: status_pb2.Status | None) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest violation in `status`."""
    return [
        (violation.field, violation.description)
        for request in unpack(status, error_details_pb2.BadRequest)
        for violation in request.field_violations
    ]


def retry_delay(status: status_pb2.Status | None) -> float | None:
    """Seconds the server asked the caller to wait (RetryInfo), if it did."""
    delay = None
    for info in unpack(status, error_details_pb2.RetryInfo):
        delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return delay


def new_event_ids(count: int) -> list[str]:
    """`count` event ids in the one format every part uses: 32 lower-case hex digits (a random
    version 4 UUID's hex, as apex.js, the SDK and the server make them).

    Drawn from one call to the system's randomness: uuid.uuid4() per id asks the kernel for 16
    bytes each time, a tenth of the gateway's CPU for a 500-event batch.
    """
    raw = bytearray(secrets.token_bytes(16 * count))
    for start in range(0, 16 * count, 16):
        raw[start + 6] = (raw[start + 6] & 0x0F) | 0x40  # version 4
        raw[start + 8] = (raw[start + 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return [text[start : start + 32] for start in range(0, 32 * count, 32)]


def within(field: str, reported: str) -> bool:
    """Whether the violation path `field` is `reported` or inside it (`events[0].data.x` is inside
    `events[0].data`): a field reported empty makes the violations inside it no news."""
    return field == reported or field.startswith((reported + ".", reported + "["))
