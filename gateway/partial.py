"""Partial batches over HTTP (issue #17): the body field `"partial": true` and its answer.

With it the valid events of a batch are stored and the invalid ones reported (and kept as dead
letters by the server): `200 {"received": N, "rejected": [{"index": i, "details": [{"field",
"description"}]}]}`, `rejected` listing every event that was not stored, in order. What concerns
the whole request is still refused as a whole: an unknown key (401), a refused origin (403), a
request-wide rule (400: `userId`, `events` not an array, more than 500 events...).

An event with a JSON type error (`"type": 5`, `"data": "text"`) is not sent to the server to
be stored (it would arrive with that field empty, and `data` would read as `{}`): it is rejected
here with its type errors, and the server's answer about the others is mapped back to the
indexes of the body. Once the batch is answered, those events go to RecordRefused, as those of
an all-or-nothing body do: the server keeps them as dead letters (numbered as in that call, as
the server numbers the events of the batch it was sent), and its own violations of them join
their type errors in `rejected`.

The view (gateway.api) calls, once the body is parsed into a `Payload`:

    prepared = partial.prepare(payload)   # None: not a partial request
    if prepared is not None:
        response = <IngestEvents(prepared.request)>   # one call of its own, not coalesced
        refused = prepared.refused()   # None: no type errors
        if refused is not None:
            <RecordRefused(refused)>; prepared.found(<its INVALID_ARGUMENT's violations>)
        return json_response(prepared.answer(response.received, response.rejected))

`prepare` raises ApiError 400 for a `partial` that is not a boolean and for type errors of the
request itself; a gRPC error of the call is translated as for any request (`to_api_error`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from apex_ingest.common.limits import MAX_VIOLATIONS_PER_EVENT
from apex_ingest.v1 import ingest_pb2
from gateway.errors import FieldViolation, invalid
from gateway.payload import Payload, public_field, refused_request

FLAG = "partial"


def requested(value: Any) -> bool:
    """Whether the body's `partial` asks for a partial batch; ApiError 400 if no boolean."""
    if value is None:  # null is the same as leaving the field out
        return False
    if not isinstance(value, bool):
        raise invalid([FieldViolation(FLAG, "must be a boolean")])
    return value


@dataclass
class PartialRequest:
    """What to send for a partial batch, and how to read the answer back."""

    #: The request to send: `partial` set, the events with type errors left out.
    request: ingest_pb2.IngestEventsRequest
    #: The format of the body (field names differ for the snippet format).
    snippet: bool
    #: For each event sent, its index in the body.
    indexes: list[int] = field(default_factory=list)
    #: Events rejected here for JSON type errors, by their index in the body.
    local: dict[int, list[FieldViolation]] = field(default_factory=dict)
    #: Events in the body (the length of `rejected` when nothing is valid).
    total: int = 0
    #: The request with only the events rejected here (in `local`'s order), for RecordRefused.
    held: ingest_pb2.IngestEventsRequest | None = None

    def refused(self) -> ingest_pb2.RecordRefusedRequest | None:
        """The events with type errors, with them, to be kept as dead letters (None: none)."""
        if self.held is None:
            return None
        return refused_request(
            self.held,
            (
                FieldViolation(_renumber(v.field, index, position), v.description)
                for position, index in enumerate(sorted(self.local))
                for v in self.local[index]
            ),
            self.snippet,
        )

    def found(self, violations: Iterable[FieldViolation]) -> None:
        """The server's own violations of the events in `refused()` (numbered as there), added
        to their type errors: an event lists at most MAX_VIOLATIONS_PER_EVENT."""
        held = sorted(self.local)
        for violation in violations:
            position = _event_of(violation.field, self.snippet)
            if position is None or not 0 <= position < len(held):
                continue  # about the request, which the server accepted
            index = held[position]
            if len(self.local[index]) < MAX_VIOLATIONS_PER_EVENT:
                field = _renumber(violation.field, position, index)
                self.local[index].append(FieldViolation(field, violation.description))

    def answer(self, received: int, rejected: Iterable[ingest_pb2.RejectedEvent]) -> dict[str, Any]:
        """The JSON answer from the server's `received` and `rejected`."""
        found: dict[int, list[FieldViolation]] = dict(self.local)
        for event in rejected:
            original = self.indexes[event.index] if 0 <= event.index < len(self.indexes) else None
            if original is None:
                continue
            found[original] = [
                FieldViolation(
                    public_field(_renumber(v.field, event.index, original), self.snippet),
                    v.description,
                )
                for v in event.violations
            ]
        return {
            "received": int(received) if self.indexes else 0,
            "rejected": [
                {
                    "index": index,
                    "details": [
                        {"field": v.field, "description": v.description} for v in found[index]
                    ],
                }
                for index in sorted(found)
            ],
        }


def prepare(payload: Payload) -> PartialRequest | None:
    """The partial request for a parsed body, or None if it does not ask for one.

    Raises ApiError 400 for a `partial` that is no boolean, and for type errors of the request
    itself (they concern every event).
    """
    if not requested(payload.partial):
        return None
    source = payload.request
    local: dict[int, list[FieldViolation]] = {}
    whole: list[FieldViolation] = []
    for violation in payload.violations:
        index = _event_of(violation.field, payload.snippet)
        if index is None:
            whole.append(violation)
        else:
            local.setdefault(index, []).append(violation)
    if whole:
        raise invalid(whole)
    indexes = [index for index in range(len(source.events)) if index not in local]
    # Every event has a type error: nothing to store. The server is still asked (to check only,
    # with every event) so that an unknown key or a refused origin is refused as a whole.
    request = _with_events(source, indexes or range(len(source.events)))
    request.validate_only = not indexes
    request.partial = True
    held = _with_events(source, sorted(local)) if local else None
    return PartialRequest(request, payload.snippet, indexes, local, len(source.events), held)


def _with_events(
    source: ingest_pb2.IngestEventsRequest, indexes: Sequence[int]
) -> ingest_pb2.IngestEventsRequest:
    """A copy of `source` with only the events at `indexes` (all of them: a plain copy)."""
    request = ingest_pb2.IngestEventsRequest()
    request.CopyFrom(source)
    if len(indexes) < len(source.events):
        del request.events[:]
        request.events.extend(source.events[index] for index in indexes)
    return request


def _event_of(public: str, snippet: bool) -> int | None:
    """The body index of the event a type error names, or None for the request itself."""
    if snippet:
        return None if public in ("projectKey", FLAG) else 0
    if not public.startswith("events["):
        return None
    digits, bracket, rest = public[len("events[") :].partition("]")
    if not (bracket and digits.isdigit()) or not rest:
        # "events[3]" (not an object) concerns that event; "events" the request.
        return int(digits) if bracket and digits.isdigit() else None
    return int(digits)


def _renumber(path: str, sent: int, original: int) -> str:
    prefix = f"events[{sent}]"
    if path.startswith(prefix):
        return f"events[{original}]" + path[len(prefix) :]
    return path
