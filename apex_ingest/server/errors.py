"""Why a request is refused: plain exceptions, mapped to gRPC statuses in `status.py`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the proto field path, e.g. "events[2].url"
    description: str


class IngestError(Exception):
    """A request we refuse; nothing of it was stored (but see StorageUnavailable.maybe_stored)."""

    #: The project of the request's key, when the key was known (set by `ingest.prepare`): the
    #: refused events of such a request are kept as dead letters.
    project_id: int | None = None


class InvalidRequest(IngestError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        fields = ", ".join(v.field[:80] for v in violations[:5])
        more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {fields}{more}")


class UnknownProject(IngestError):
    def __init__(self) -> None:
        super().__init__("unknown or revoked project key")


class OriginNotAllowed(IngestError):
    def __init__(self, origin: str, violations: list[FieldViolation] | None = None) -> None:
        self.origin = origin
        #: Other violations kept beside the origin's in dead letters (RecordRefused: an edge's).
        self.violations = violations or []
        super().__init__("origin not allowed for this project")


class DeadlinePassed(IngestError):
    """The caller's deadline passed before the events were written: they never will be."""

    def __init__(self) -> None:
        super().__init__("the deadline passed before the events could be stored; nothing was")


class StorageUnavailable(IngestError):
    """Not committed; or, with `maybe_stored`, not known to be (retrying with the same ids is safe).

    `maybe_stored`: the database connection broke while the commit was in flight, or the
    database stopped answering: the commit may have happened, and nothing can tell until it
    is back. Events carrying ids are stored once however often they are sent again.
    """

    def __init__(
        self, retry_after_seconds: int, maybe_stored: bool = False, for_deadline: bool = False
    ) -> None:
        self.retry_after_seconds = retry_after_seconds
        self.maybe_stored = maybe_stored
        #: Answered early so that the refusal beats the caller's deadline: the database was
        #: slow for this caller, which says nothing yet of its health (the probe will tell).
        self.for_deadline = for_deadline
        super().__init__(
            "storage unavailable; the events may have been stored before the connection to the "
            "database broke: retry with the same event ids"
            if maybe_stored
            else "storage unavailable; nothing was stored, retry later"
        )
