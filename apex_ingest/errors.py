"""Why a request is refused: plain exceptions, mapped to gRPC statuses in `status.py`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the proto field path, e.g. "events[2].url"
    description: str


class IngestError(Exception):
    """A request we refuse; nothing of it was stored."""


class InvalidRequest(IngestError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        fields = ", ".join(v.field for v in violations[:5])
        more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {fields}{more}")


class UnknownProject(IngestError):
    def __init__(self) -> None:
        super().__init__("unknown or revoked project key")


class OriginNotAllowed(IngestError):
    def __init__(self, origin: str) -> None:
        self.origin = origin
        super().__init__("origin not allowed for this project")


class StorageUnavailable(IngestError):
    def __init__(self, retry_after_seconds: int) -> None:
        self.retry_after_seconds = retry_after_seconds
        super().__init__("storage unavailable; nothing was stored, retry later")
