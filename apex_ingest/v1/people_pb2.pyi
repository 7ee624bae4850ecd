import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeletePersonRequest(_message.Message):
    __slots__ = ("user_ids", "visitor_ids", "suppress", "actor")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    VISITOR_IDS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    visitor_ids: _containers.RepeatedScalarFieldContainer[str]
    suppress: bool
    actor: str
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., visitor_ids: _Optional[_Iterable[str]] = ..., suppress: _Optional[bool] = ..., actor: _Optional[str] = ...) -> None: ...

class DeletePersonResponse(_message.Message):
    __slots__ = ("events", "identity_links", "dead_letters", "suppressed", "audit_id")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_LINKS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    events: int
    identity_links: int
    dead_letters: int
    suppressed: int
    audit_id: int
    def __init__(self, events: _Optional[int] = ..., identity_links: _Optional[int] = ..., dead_letters: _Optional[int] = ..., suppressed: _Optional[int] = ..., audit_id: _Optional[int] = ...) -> None: ...

class LiftSuppressionRequest(_message.Message):
    __slots__ = ("user_ids", "visitor_ids", "actor")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    VISITOR_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    visitor_ids: _containers.RepeatedScalarFieldContainer[str]
    actor: str
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., visitor_ids: _Optional[_Iterable[str]] = ..., actor: _Optional[str] = ...) -> None: ...

class LiftSuppressionResponse(_message.Message):
    __slots__ = ("lifted",)
    LIFTED_FIELD_NUMBER: _ClassVar[int]
    lifted: int
    def __init__(self, lifted: _Optional[int] = ...) -> None: ...

class ListSuppressionsRequest(_message.Message):
    __slots__ = ("limit", "after_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after_id: int
    def __init__(self, limit: _Optional[int] = ..., after_id: _Optional[int] = ...) -> None: ...

class Suppression(_message.Message):
    __slots__ = ("id", "kind", "value", "created_at", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    value: str
    created_at: _timestamp_pb2.Timestamp
    actor: str
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., value: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class ListSuppressionsResponse(_message.Message):
    __slots__ = ("suppressions",)
    SUPPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    suppressions: _containers.RepeatedCompositeFieldContainer[Suppression]
    def __init__(self, suppressions: _Optional[_Iterable[_Union[Suppression, _Mapping]]] = ...) -> None: ...

class ExportPersonRequest(_message.Message):
    __slots__ = ("user_ids", "visitor_ids", "actor")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    VISITOR_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    visitor_ids: _containers.RepeatedScalarFieldContainer[str]
    actor: str
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., visitor_ids: _Optional[_Iterable[str]] = ..., actor: _Optional[str] = ...) -> None: ...

class ExportPersonResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
