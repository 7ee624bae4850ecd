import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordRefusedRequest(_message.Message):
    __slots__ = ("request", "violations")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    request: IngestEventsRequest
    violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    def __init__(self, request: _Optional[_Union[IngestEventsRequest, _Mapping]] = ..., violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ...) -> None: ...

class RecordRefusedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IngestManyRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[IngestEventsRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[IngestEventsRequest, _Mapping]]] = ...) -> None: ...

class IngestManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IngestResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IngestResult, _Mapping]]] = ...) -> None: ...

class IngestResult(_message.Message):
    __slots__ = ("status", "received", "rejected")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    status: RequestStatus
    received: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedEvent]
    def __init__(self, status: _Optional[_Union[RequestStatus, _Mapping]] = ..., received: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedEvent, _Mapping]]] = ...) -> None: ...

class RequestStatus(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class IngestEventsRequest(_message.Message):
    __slots__ = ("project_key", "user_id", "events", "context", "validate_only", "partial", "sent_at", "derive_visitor_id")
    PROJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DERIVE_VISITOR_ID_FIELD_NUMBER: _ClassVar[int]
    project_key: str
    user_id: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    context: RequestContext
    validate_only: bool
    partial: bool
    sent_at: _timestamp_pb2.Timestamp
    derive_visitor_id: bool
    def __init__(self, project_key: _Optional[str] = ..., user_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., context: _Optional[_Union[RequestContext, _Mapping]] = ..., validate_only: _Optional[bool] = ..., partial: _Optional[bool] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., derive_visitor_id: _Optional[bool] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("client_ip", "user_agent", "origin", "request_id")
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    client_ip: str
    user_agent: str
    origin: str
    request_id: str
    def __init__(self, client_ip: _Optional[str] = ..., user_agent: _Optional[str] = ..., origin: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "type", "visitor_id", "url", "referrer", "data", "timestamp", "user_id", "previous_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VISITOR_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    REFERRER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    visitor_id: str
    url: str
    referrer: str
    data: str
    timestamp: _timestamp_pb2.Timestamp
    user_id: str
    previous_id: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., visitor_id: _Optional[str] = ..., url: _Optional[str] = ..., referrer: _Optional[str] = ..., data: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., previous_id: _Optional[str] = ...) -> None: ...

class IngestEventsResponse(_message.Message):
    __slots__ = ("received", "rejected")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    received: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedEvent]
    def __init__(self, received: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedEvent, _Mapping]]] = ...) -> None: ...

class RejectedEvent(_message.Message):
    __slots__ = ("index", "violations")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    index: int
    violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    def __init__(self, index: _Optional[int] = ..., violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...
