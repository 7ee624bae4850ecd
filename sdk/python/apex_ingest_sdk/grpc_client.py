"""Typed gRPC client for internal services: ``IngestClient(target).ingest(key, events)``.

Needs the ``grpc`` extra (``pip install 'apex-ingest-sdk[grpc]'``; from a checkout of Apex
Ingest, ``pip install './sdk/python[grpc]'``). Named ``grpc_client`` so that ``import grpc``
inside this package still means grpcio. It uses the SDK's own copy of the
generated messages (``apex_ingest_sdk._proto``) and calls the method by name, so neither the
server package nor generated ``_pb2_grpc`` code is needed.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from apex_ingest_sdk._proto import ingest_pb2
from apex_ingest_sdk.client import new_event_id

__all__ = [
    "METHOD",
    "SERVICE",
    "EventLike",
    "IngestClient",
    "IngestError",
    "service_config",
    "to_event",
]

SERVICE: Final = "apex_ingest.v1.IngestService"
METHOD: Final = f"/{SERVICE}/IngestEvents"
#: The trailer carrying a serialised ``google.rpc.Status`` with the error's details.
_DETAILS_KEY: Final = "grpc-status-details-bin"


def service_config(max_attempts: int, max_backoff: str = "2s") -> dict[str, Any]:
    """The channel's service config: gRPC's own retries of UNAVAILABLE, round-robin balancing.

    UNAVAILABLE means not stored (or, rarely, not known to be), and every event carries an id,
    so replaying the same request cannot duplicate anything. Retry throttling stops retries from
    piling onto a server that is down. The same policy as the server's own callers use
    (``apex_ingest.common.rpc.retry_service_config``; the repository's tests compare them).
    With ``max_attempts`` below 2 there is no retry policy (gRPC requires at least 2 in one).
    """
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": min(max_attempts, 5),  # gRPC caps it at 5
            "initialBackoff": "0.1s",
            "maxBackoff": max_backoff,
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [method],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def _rich_status(error: Any, code: grpc.StatusCode, message: str) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` from the call's trailers, if it agrees with the status line."""
    try:
        trailers = error.trailing_metadata()
    except AttributeError:
        return None
    for key, value in trailers or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # protobuf's DecodeError: unreadable details are no details
            return None
        # Details that contradict the status line are ignored: the line is what gRPC acted on.
        if status.code != code.value[0] or status.message != message:
            return None
        return status
    return None


class IngestError(Exception):
    """Any failed ``IngestEvents`` call, with the status and the server's rich details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: ``(field, description)`` from ``google.rpc.BadRequest``, e.g. ``("events[2].url", ...)``.
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        #: Seconds from ``google.rpc.RetryInfo``, when the server suggested a delay.
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> IngestError:
        code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = str(error.details() if hasattr(error, "details") else error) or ""
        violations: list[tuple[str, str]] = []
        retry_after: float | None = None
        status = _rich_status(error, code, message)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    violations.extend(
                        (v.field, v.description) for v in bad_request.field_violations
                    )
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry_info = error_details_pb2.RetryInfo()
                    detail.Unpack(retry_info)
                    retry_after = retry_info.retry_delay.ToTimedelta().total_seconds()
        return cls(code, message, field_violations=violations, retry_after=retry_after)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling (multiprocessing pools).
        return (
            _rebuild_error,
            (self.code.name, self.message, self.field_violations, self.retry_after),
        )


def _rebuild_error(
    code: str, message: str, violations: list[tuple[str, str]], retry_after: float | None
) -> IngestError:
    return IngestError(
        grpc.StatusCode[code], message, field_violations=violations, retry_after=retry_after
    )


#: A dict with the proto's field names, or an ``apex_ingest.v1.Event`` message (the SDK's
#: ``ingest_pb2.Event`` or the same message generated elsewhere).
EventLike = Mapping[str, Any] | Message

_ALIASES: Final = {"visitorId": "visitor_id", "userId": "user_id", "previousId": "previous_id"}
#: ``user_id``: the event's own user, overriding the request's; ``previous_id``: an alias's.
_STRING_FIELDS: Final = ("id", "type", "visitor_id", "url", "referrer", "user_id", "previous_id")


def _timestamp(value: Any) -> Timestamp:
    if isinstance(value, Timestamp):
        return value
    if isinstance(value, str):
        # fromisoformat accepts RFC 3339 (including "Z") from Python 3.11 on, but not the
        # lower-case "t" and "z" that RFC 3339 allows and the gateway accepts.
        value = datetime.fromisoformat(value.upper())
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value, UTC)
    if not isinstance(value, datetime):
        raise TypeError(
            f"timestamp must be a datetime, RFC 3339 string or epoch seconds: {value!r}"
        )
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        value = value.replace(tzinfo=UTC)
    timestamp = Timestamp()
    timestamp.FromDatetime(value.astimezone(UTC))
    return timestamp


def _data_text(value: Any) -> str:
    if isinstance(value, str):
        return value  # already JSON text: passed through untouched, as the contract intends
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, Mapping):
        raise TypeError("data must be a mapping (a JSON object) or JSON text")
    # allow_nan=False: NaN and Infinity are not JSON, and the server would refuse the batch.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_event(event: EventLike) -> ingest_pb2.Event:
    """A copy of ``event`` as an ``ingest_pb2.Event``, with an id when it had none.

    Dict keys are the proto's field names (``visitorId`` is accepted for ``visitor_id``);
    ``data`` may be a mapping (serialised as compact JSON) or JSON text; ``timestamp`` a
    datetime (naive means UTC), an RFC 3339 string, epoch seconds or a protobuf Timestamp.
    Generated ids are 32 lowercase hex characters, like every other Apex client's.
    """
    message = ingest_pb2.Event()
    if isinstance(event, ingest_pb2.Event):
        message.CopyFrom(event)
    elif isinstance(event, Message):
        if event.DESCRIPTOR.full_name != ingest_pb2.Event.DESCRIPTOR.full_name:
            raise TypeError(f"an event must be an apex_ingest.v1.Event, not {type(event)!r}")
        # The same message type from another copy of the generated code.
        message.MergeFromString(event.SerializeToString())
    elif isinstance(event, Mapping):
        for key, value in event.items():
            name = _ALIASES.get(key, key)
            if value is None:
                continue
            if name in _STRING_FIELDS:
                if not isinstance(value, str):
                    raise TypeError(f"event field {key!r} must be a string")
                setattr(message, name, value)
            elif name == "data":
                message.data = _data_text(value)
            elif name == "timestamp":
                message.timestamp.CopyFrom(_timestamp(value))
            else:
                raise ValueError(f"unknown event field {key!r}")
    else:
        raise TypeError(f"an event must be a mapping or ingest_pb2.Event, not {type(event)!r}")
    if not message.id:
        # Stamped before the first attempt so the channel's retries replay the same ids.
        message.id = new_event_id()
    return message


_Call = Callable[..., ingest_pb2.IngestEventsResponse]


@dataclass(frozen=True)
class PartialResult:
    """The answer to ``IngestClient.ingest_partial``."""

    #: How many events were stored.
    received: int
    #: Every event that was not stored: ``(index in the events given, [(field, description)])``,
    #: in order. The server keeps them as dead letters (``apex-ingest dead-letters``).
    rejected: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)


class IngestClient:
    """Calls ``apex_ingest.v1.IngestService`` over one reused channel.

    >>> with IngestClient("localhost:50051") as client:
    ...     client.ingest("pk_live_...", [{"type": "signup", "url": "/welcome"}], user_id="u_42")
    1

    Thread-safe. The channel is opened on first use and opened again in a forked child.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = 5,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._credentials = credentials
        self._options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config(max_attempts))),
            *options,
        ]
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._call: _Call | None = None
        self._pid = os.getpid()
        self._closed = False
        _instances.add(self)

    def _get_call(self) -> _Call:
        with self._lock:
            if self._closed:
                raise RuntimeError("IngestClient is closed")
            if self._call is None or self._pid != os.getpid():
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(self.target, options=self._options)
                else:
                    self._channel = grpc.secure_channel(
                        self.target, self._credentials, options=self._options
                    )
                assert self._channel is not None
                self._call = self._channel.unary_unary(
                    METHOD,
                    request_serializer=ingest_pb2.IngestEventsRequest.SerializeToString,
                    response_deserializer=ingest_pb2.IngestEventsResponse.FromString,
                )
                self._pid = os.getpid()
            assert self._call is not None
            return self._call

    def ingest(
        self,
        project_key: str,
        events: Iterable[EventLike],
        user_id: str = "",
        *,
        timeout: float | None = None,
        context: ingest_pb2.RequestContext | None = None,
    ) -> int:
        """Store ``events`` (1-500) atomically; returns how many were accepted.

        Raises ``IngestError`` for any failure, after the channel's own retries of UNAVAILABLE
        (all within the one deadline of ``timeout`` seconds, default the client's).
        """
        response = self._call_ingest(project_key, events, user_id, timeout, context, False)
        return int(response.received)

    def ingest_partial(
        self,
        project_key: str,
        events: Iterable[EventLike],
        user_id: str = "",
        *,
        timeout: float | None = None,
        context: ingest_pb2.RequestContext | None = None,
    ) -> PartialResult:
        """Store the valid ones of ``events`` (1-500) and report the others (a partial batch).

        One invalid event no longer refuses the others: they are stored, and the invalid ones
        are listed in ``PartialResult.rejected`` with their violations (and kept by the server
        as dead letters). Still raises ``IngestError`` for what concerns the whole request: an
        unknown key, a refused origin, an invalid ``user_id``, more than 500 events, and
        every failure ``ingest`` raises for.
        """
        response = self._call_ingest(project_key, events, user_id, timeout, context, True)
        return PartialResult(
            int(response.received),
            [
                (int(r.index), [(v.field, v.description) for v in r.violations])
                for r in response.rejected
            ],
        )

    def _call_ingest(
        self,
        project_key: str,
        events: Iterable[EventLike],
        user_id: str,
        timeout: float | None,
        context: ingest_pb2.RequestContext | None,
        partial: bool,
    ) -> ingest_pb2.IngestEventsResponse:
        request = ingest_pb2.IngestEventsRequest(
            project_key=project_key, user_id=user_id, partial=partial
        )
        request.events.extend(to_event(event) for event in events)
        if context is not None:
            request.context.CopyFrom(context)
        call = self._get_call()
        # When it leaves, by this machine's clock: the server corrects the events' times by
        # the clock skew it measures with it. gRPC's own retries resend the same stamp, within
        # the call's deadline (a few seconds at most, under the server's 10 s threshold).
        request.sent_at.GetCurrentTime()
        try:
            response: ingest_pb2.IngestEventsResponse = call(
                request, timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as exc:
            raise IngestError.from_rpc_error(exc) from exc
        return response

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel, self._call = self._channel, None, None
            owned = self._pid == os.getpid()
        if channel is not None and owned:
            channel.close()

    def __enter__(self) -> IngestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_instances: weakref.WeakSet[IngestClient] = weakref.WeakSet()


def _reset_all_in_child() -> None:
    # The parent's lock may have been held by one of its threads at fork time, and its channel's
    # sockets and threads belong to the parent: start from scratch.
    for client in list(_instances):
        client._lock = threading.Lock()
        client._channel = None
        client._call = None
        client._pid = os.getpid()


os.register_at_fork(after_in_child=_reset_all_in_child)
