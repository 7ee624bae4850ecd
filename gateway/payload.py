"""The public JSON payloads (snippet and batch) to an IngestEventsRequest, and field names back.

The gateway checks JSON *types* only. Every rule about values (lengths, URL shapes, counts,
timestamp range, data size, keys, origins) belongs to the gRPC server, which reports violations
by proto path; public_field() turns those paths into the JSON names the client sent. A body with
type errors still becomes a request of its well-typed fields, so that the server can name the
value errors too (gateway.api asks it with validate_only) and the answer lists every one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from google.protobuf.timestamp_pb2 import Timestamp

from apex_ingest.common.limits import MAX_DATA_DEPTH, MAX_EVENTS
from apex_ingest.common.rpc import new_event_ids
from apex_ingest.v1 import ingest_pb2
from gateway import json_codec
from gateway.errors import FieldViolation, body_error, invalid

_TIMESTAMP_EXAMPLE = "2024-05-01T12:00:00Z"


@dataclass(frozen=True, slots=True)
class Payload:
    """A request ready for IngestEvents (the request context is added by the caller)."""

    request: ingest_pb2.IngestEventsRequest
    #: The snippet format (one browser event) rather than a batch; field names differ.
    snippet: bool
    #: JSON type errors (public field names); the request then lacks those fields.
    violations: tuple[FieldViolation, ...] = ()
    #: The body's `partial` field as sent (None: absent or null); gateway.partial reads it.
    #: Batches only: in a snippet body it is an unknown field, ignored (its one event is all
    #: or nothing, and an invalid one a 400).
    partial: Any = None


def _check_count(events: int) -> None:
    """Too many events is refused before anything is built: a 1 KB gzip body of 350,000 empty
    events cost 1.7 s of CPU (ids, protobuf) and then a gRPC size error read as a 429."""
    if events > MAX_EVENTS:
        raise invalid(
            [FieldViolation("events", f"must hold at most {MAX_EVENTS} events, not {events}")]
        )


def is_snippet(document: Mapping[str, Any]) -> bool:
    return "events" not in document


def to_request(document: Any) -> Payload:
    """Translate a parsed JSON body, noting every type violation; ApiError 400 if not an object."""
    if not isinstance(document, dict):
        raise body_error(400, "The body must be a JSON object.", "must be a JSON object")
    events = document.get("events")
    if isinstance(events, list):
        _check_count(len(events))
    check = _Checker(len(events) if isinstance(events, list) else 1)
    request = ingest_pb2.IngestEventsRequest(
        project_key=check.string(document, "projectKey", "projectKey")
    )
    sent_at = check.timestamp(document.get("sentAt"), "sentAt")
    if sent_at is not None:
        request.sent_at.CopyFrom(sent_at)
    snippet = is_snippet(document)
    if snippet:
        request.events.add(**check.event(document, prefix="", visitor_required=True))
        request.derive_visitor_id = check.derive_visitor_id
    else:
        request.user_id = check.string(document, "userId", "userId")
        if isinstance(events, list):
            for index, item in enumerate(events):
                prefix = f"events[{index}]"
                if isinstance(item, dict):
                    # add() builds the event in place; append() would copy it.
                    request.events.add(**check.event(item, prefix=prefix + "."))
                else:
                    check.add(prefix, "must be an event object")
                    request.events.add()  # keeps the indices of the events after it
        else:
            check.add("events", "must be an array of event objects")
    return Payload(
        request=request,
        snippet=snippet,
        violations=tuple(check.violations),
        partial=None if snippet else document.get("partial"),
    )


class _Checker:
    """Reads typed fields out of JSON objects, noting each type error instead of stopping."""

    def __init__(self, expected_events: int) -> None:
        self.violations: list[FieldViolation] = []
        #: A snippet without visitorId. The snippet format requires one unless the project is
        #: cookieless, which only the server knows: it derives the id or refuses the event
        #: ("visitorId is required"). The RPC treats "" as "no visitor", so the flag says which
        #: format the client used (IngestEventsRequest.derive_visitor_id).
        self.derive_visitor_id = False
        self._expected_ids = max(1, expected_events)
        self._ids: Iterator[str] = iter(())

    def new_event_id(self) -> str:
        """A new event id; drawn for all of the request's events at once (new_event_ids)."""
        event_id = next(self._ids, None)
        if event_id is None:
            self._ids = iter(new_event_ids(self._expected_ids))
            event_id = next(self._ids)
        return event_id

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def string(self, obj: Mapping[str, Any], key: str, field: str) -> str:
        return self.string_value(obj.get(key), field)

    def string_value(self, value: object, field: str) -> str:
        # null is the same as leaving the field out: many JSON encoders write absent values so.
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        self.add(field, "must be a string")
        return ""

    def event(
        self, obj: Mapping[str, Any], prefix: str, visitor_required: bool = False
    ) -> dict[str, Any]:
        """The Event fields of one JSON event object, as keyword arguments."""
        event_id = self.string(obj, "id", prefix + "id")
        visitor_id = self.string(obj, "visitorId", prefix + "visitorId")
        if visitor_required and obj.get("visitorId") in (None, ""):
            self.derive_visitor_id = True
        fields: dict[str, Any] = {
            # An id stamped here, before the call, makes gRPC's own retries idempotent: a retried
            # call carries the same ids, and the server stores each id once.
            "id": event_id or self.new_event_id(),
            "type": self.string(obj, "type", prefix + "type"),
            "visitor_id": visitor_id,
            "url": self.string(obj, "url", prefix + "url"),
            "referrer": self.string(obj, "referrer", prefix + "referrer"),
            "data": self.data(obj.get("data"), prefix + "data"),
            # The event's own user (the snippet's userId; in a batch it overrides the batch's).
            "user_id": self.string(obj, "userId", prefix + "userId"),
            "previous_id": self.string(obj, "previousId", prefix + "previousId"),
        }
        timestamp = self.timestamp(obj.get("timestamp"), prefix + "timestamp")
        if timestamp is not None:
            fields["timestamp"] = timestamp
        return fields

    def fast_event(
        self, event: _Event, prefix: str, visitor_required: bool = False
    ) -> dict[str, Any]:
        """event() for a decoded _Event: the same fields, `data` from its raw bytes."""
        string = self.string_value
        event_id = string(event.id, prefix + "id")
        visitor_id = string(event.visitorId, prefix + "visitorId")
        if visitor_required and event.visitorId in (None, ""):
            self.derive_visitor_id = True
        fields: dict[str, Any] = {
            "id": event_id or self.new_event_id(),
            "type": string(event.type, prefix + "type"),
            "visitor_id": visitor_id,
            "url": string(event.url, prefix + "url"),
            "referrer": string(event.referrer, prefix + "referrer"),
            "data": self.raw_data(event.data, prefix + "data"),
            "user_id": string(event.userId, prefix + "userId"),
            "previous_id": string(event.previousId, prefix + "previousId"),
        }
        if event.timestamp is not None:
            timestamp = self.timestamp(event.timestamp, prefix + "timestamp")
            if timestamp is not None:
                fields["timestamp"] = timestamp
        return fields

    def raw_data(self, raw: msgspec.Raw, field: str) -> str:
        """`data` as the client wrote it (msgspec has checked it is well-formed JSON)."""
        text = bytes(raw)
        if not text or text == b"null":
            return ""
        if not text.startswith(b"{"):
            self.add(field, "must be a JSON object")
            return ""
        return text.decode()

    def data(self, value: object, field: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, dict):
            self.add(field, "must be a JSON object")
            return ""
        try:
            return json_codec.dumps(value).decode()
        except json_codec.JSONSyntaxError as exc:
            self.add(field, str(exc))
            return ""

    def timestamp(self, value: object, field: str) -> Timestamp | None:
        if value is None:
            return None
        if isinstance(value, str):
            parsed = parse_timestamp(value)
            if parsed is not None:
                return parsed
        self.add(field, f"must be an RFC 3339 timestamp string such as {_TIMESTAMP_EXAMPLE}")
        return None


#: Every character an ISO 8601 / RFC 3339 time may hold (upper-cased).
_ISO_CHARACTERS = re.compile(r"[0-9TZW:.,+\- ]+")
_LEAP_SECOND = re.compile(r"(T\d\d:\d\d:)60(?![0-9])")


def parse_timestamp(text: str) -> Timestamp | None:
    """RFC 3339 / ISO 8601 text to a Timestamp; no offset means UTC. None if unparseable.

    Fractions beyond microseconds are dropped (the database keeps microseconds). RFC 3339 also
    allows a lower-case "t" and "z", and a leap second (":60"), which becomes the next second
    (as in PostgreSQL: Python's datetime has no 61st second).
    """
    text = text.upper()
    if not _ISO_CHARACTERS.fullmatch(text):
        # The whole string must be a time: datetime.fromisoformat stops reading an offset at a
        # NUL ("...Z\x00garbage" parsed as a time).
        return None
    leap = _LEAP_SECOND.search(text)
    if leap is not None:
        text = text[: leap.start()] + leap[1] + "59" + text[leap.end() :]
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if leap is not None:
            moment += timedelta(seconds=1)
    except (ValueError, OverflowError):
        return None
    # What Timestamp.FromDatetime computes, without its Python-level checks (a datetime is
    # always within a Timestamp's range): a third of the cost of a batch's parse.
    since = moment - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# "events[12].visitor_id.more" -> ("events[12]", "visitor_id", ".more")
_EVENT_PATH = re.compile(r"^(events\[\d+\])\.([a-z][a-z0-9_]*)(.*)$", re.DOTALL)
_TOP_PATH = re.compile(r"^([a-z][a-z0-9_]*)(.*)$", re.DOTALL)


def public_field(path: str, snippet: bool) -> str:
    """A server field path (proto names) as the client wrote it.

    ``events[2].visitor_id`` becomes ``events[2].visitorId``, ``project_key`` becomes
    ``projectKey``; in the snippet format the single event's fields are top-level, so
    ``events[0].url`` becomes ``url``. Whatever follows the field (a path inside ``data``) is
    kept as is: those are the client's own keys.
    """
    match = _EVENT_PATH.match(path)
    if match is not None:
        head, name, rest = match.groups()
        if snippet and head == "events[0]":
            return _camel(name) + rest
        return f"{head}.{_camel(name)}{rest}"
    match = _TOP_PATH.match(path)
    if match is not None:
        name, rest = match.groups()
        return _camel(name) + rest
    return path


#: The fields of an event (proto names), which the snippet format has at its top level.
_EVENT_FIELDS = frozenset(
    ("id", "type", "visitor_id", "user_id", "previous_id", "url", "referrer", "data", "timestamp")
)
_PUBLIC_PATH = re.compile(r"^(events\[\d+\]\.)?([A-Za-z]+)(.*)$", re.DOTALL)


def proto_field(path: str, snippet: bool) -> str:
    """`public_field`'s inverse: a path as the client wrote it, as the server names it.

    ``events[2].visitorId`` becomes ``events[2].visitor_id``; in the snippet format an event's
    fields are top-level, so ``url`` becomes ``events[0].url`` (``projectKey``, ``sentAt``
    stay the request's).
    """
    match = _PUBLIC_PATH.match(path)
    if match is None:
        return path
    head, name, rest = match.groups()
    proto = _snake(name)
    if head:
        return f"{head}{proto}{rest}"
    if snippet and proto in _EVENT_FIELDS:
        return f"events[0].{proto}{rest}"
    return proto + rest


def refused_request(
    request: ingest_pb2.IngestEventsRequest, violations: Iterable[FieldViolation], snippet: bool
) -> ingest_pb2.RecordRefusedRequest:
    """RecordRefused's request: `request` with the type errors the gateway refused it for,
    named as the server names fields (`proto_field`)."""
    return ingest_pb2.RecordRefusedRequest(
        request=request,
        violations=[
            ingest_pb2.FieldViolation(
                field=proto_field(v.field, snippet), description=v.description
            )
            for v in violations
        ],
    )


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _camel(name: str) -> str:
    first, *others = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in others)


# --- The fast path: msgspec decodes the body into Structs, each event's `data` kept as the
# exact bytes the client sent (msgspec.Raw), never parsed into Python objects nor re-written.
# Every other field is `Any`, type-checked by _Checker as before, so a type error still names
# its field. A body whose shape these Structs cannot take (not an object, `events` not a list
# of objects, a number out of range in a checked field) or that msgspec refuses takes the
# generic path (json_codec.parse, then to_request), which gives the old answers word for word.

_NO_DATA = msgspec.Raw()


class _Event(msgspec.Struct):
    id: Any = None
    type: Any = None
    visitorId: Any = None
    url: Any = None
    referrer: Any = None
    timestamp: Any = None
    data: msgspec.Raw = _NO_DATA
    userId: Any = None
    previousId: Any = None


class _Snippet(_Event):
    """A snippet body (its one event's fields at the top, `userId` that event's) or a batch
    (`userId` then applies to every event without its own)."""

    projectKey: Any = None
    events: list[_Event] | msgspec.UnsetType | None = msgspec.UNSET
    partial: Any = None
    #: When the client sent the request (its clock): the server corrects clock skew with it.
    sentAt: Any = None


_DECODER = msgspec.json.Decoder(_Snippet)


def parse_request(body: bytes) -> Payload:
    """The body's IngestEventsRequest; ApiError 400 for a body that is not strict JSON or not
    a JSON object (raises json_codec.JSONSyntaxError for the former)."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    try:
        document = _DECODER.decode(body)
        # msgspec checks the UTF-8 of strings it decodes but not of the bytes it keeps raw.
        if not body.isascii():
            body.decode("utf-8")
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return to_request(json_codec.parse(body))
    if document.events is None:
        # "events": null: a batch whose events are not a list; the generic path says so.
        return to_request(json_codec.parse(body))
    if document.events is not msgspec.UNSET:
        _check_count(len(document.events))
    check = _Checker(1 if document.events is msgspec.UNSET else len(document.events))
    request = ingest_pb2.IngestEventsRequest(
        project_key=check.string_value(document.projectKey, "projectKey")
    )
    if document.sentAt is not None:
        sent_at = check.timestamp(document.sentAt, "sentAt")
        if sent_at is not None:
            request.sent_at.CopyFrom(sent_at)
    if document.events is msgspec.UNSET:
        request.events.add(**check.fast_event(document, "", visitor_required=True))
        request.derive_visitor_id = check.derive_visitor_id
        return Payload(request=request, snippet=True, violations=tuple(check.violations))
    request.user_id = check.string_value(document.userId, "userId")
    for index, event in enumerate(document.events):
        request.events.add(**check.fast_event(event, f"events[{index}]."))
    return Payload(
        request=request,
        snippet=False,
        violations=tuple(check.violations),
        partial=document.partial,
    )


_BOM = b"\xef\xbb\xbf"


def too_deep(body: bytes) -> FieldViolation | None:
    """The member of the body, or of one of its events, that nests deeper than any parser here
    reads, as the violation to answer (a JSON syntax error would name no field)."""
    path = json_codec.nesting_path(body)
    if not path or not isinstance(path[0], str):
        return None
    if path[0] == "events" and len(path) > 2 and isinstance(path[1], int):
        key, field = path[2], f"events[{path[1]}].{path[2]}"
    else:
        key, field = path[0], path[0]
    if key == "data":
        return FieldViolation(str(field), f"must not nest deeper than {MAX_DATA_DEPTH} levels")
    return FieldViolation(str(field), f"nests deeper than {json_codec.MAX_READ_DEPTH} levels")
