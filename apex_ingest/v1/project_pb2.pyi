import datetime

from apex_ingest.v1 import ingest_pb2 as _ingest_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeadLetter(_message.Message):
    __slots__ = ("id", "received_at", "reason", "violations", "event_index", "event_json", "user_id", "origin", "client_ip", "user_agent", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    EVENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_JSON_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    received_at: _timestamp_pb2.Timestamp
    reason: str
    violations: _containers.RepeatedCompositeFieldContainer[_ingest_pb2.FieldViolation]
    event_index: int
    event_json: str
    user_id: str
    origin: str
    client_ip: str
    user_agent: str
    request_id: str
    def __init__(self, id: _Optional[int] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., violations: _Optional[_Iterable[_Union[_ingest_pb2.FieldViolation, _Mapping]]] = ..., event_index: _Optional[int] = ..., event_json: _Optional[str] = ..., user_id: _Optional[str] = ..., origin: _Optional[str] = ..., client_ip: _Optional[str] = ..., user_agent: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("limit", "before_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before_id: int
    def __init__(self, limit: _Optional[int] = ..., before_id: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters",)
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ...) -> None: ...

class ReplayDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "all")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    all: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., all: _Optional[bool] = ...) -> None: ...

class ReplayDeadLettersResponse(_message.Message):
    __slots__ = ("replayed", "failed")
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    replayed: int
    failed: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    def __init__(self, replayed: _Optional[int] = ..., failed: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ...) -> None: ...

class PurgeDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "all")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    all: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., all: _Optional[bool] = ...) -> None: ...

class PurgeDeadLettersResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class TailEventsRequest(_message.Message):
    __slots__ = ("after_event_id", "after_dead_letter_id", "backlog", "type", "visitor_id", "user_id", "since", "backlog_only", "events_only")
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_DEAD_LETTER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VISITOR_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_ONLY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    after_event_id: int
    after_dead_letter_id: int
    backlog: int
    type: str
    visitor_id: str
    user_id: str
    since: _timestamp_pb2.Timestamp
    backlog_only: bool
    events_only: bool
    def __init__(self, after_event_id: _Optional[int] = ..., after_dead_letter_id: _Optional[int] = ..., backlog: _Optional[int] = ..., type: _Optional[str] = ..., visitor_id: _Optional[str] = ..., user_id: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backlog_only: _Optional[bool] = ..., events_only: _Optional[bool] = ...) -> None: ...

class GetProjectRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetProjectResponse(_message.Message):
    __slots__ = ("id", "name", "allowed_origins", "redact_params", "rate_limit", "public_keys")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    REDACT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    allowed_origins: _containers.RepeatedScalarFieldContainer[str]
    redact_params: _containers.RepeatedScalarFieldContainer[str]
    rate_limit: str
    public_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., allowed_origins: _Optional[_Iterable[str]] = ..., redact_params: _Optional[_Iterable[str]] = ..., rate_limit: _Optional[str] = ..., public_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class StoredEvent(_message.Message):
    __slots__ = ("id", "event_id", "type", "visitor_id", "user_id", "url", "referrer", "data", "occurred_at", "received_at", "client_occurred_at", "clock_skew_ms", "browser", "browser_version", "os", "device_class", "is_bot", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "gclid", "fbclid", "referrer_host", "referrer_class", "country")
    ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VISITOR_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    REFERRER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_SKEW_MS_FIELD_NUMBER: _ClassVar[int]
    BROWSER_FIELD_NUMBER: _ClassVar[int]
    BROWSER_VERSION_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    IS_BOT_FIELD_NUMBER: _ClassVar[int]
    UTM_SOURCE_FIELD_NUMBER: _ClassVar[int]
    UTM_MEDIUM_FIELD_NUMBER: _ClassVar[int]
    UTM_CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    UTM_TERM_FIELD_NUMBER: _ClassVar[int]
    UTM_CONTENT_FIELD_NUMBER: _ClassVar[int]
    GCLID_FIELD_NUMBER: _ClassVar[int]
    FBCLID_FIELD_NUMBER: _ClassVar[int]
    REFERRER_HOST_FIELD_NUMBER: _ClassVar[int]
    REFERRER_CLASS_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    id: int
    event_id: str
    type: str
    visitor_id: str
    user_id: str
    url: str
    referrer: str
    data: str
    occurred_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    client_occurred_at: _timestamp_pb2.Timestamp
    clock_skew_ms: int
    browser: str
    browser_version: str
    os: str
    device_class: str
    is_bot: bool
    utm_source: str
    utm_medium: str
    utm_campaign: str
    utm_term: str
    utm_content: str
    gclid: str
    fbclid: str
    referrer_host: str
    referrer_class: str
    country: str
    def __init__(self, id: _Optional[int] = ..., event_id: _Optional[str] = ..., type: _Optional[str] = ..., visitor_id: _Optional[str] = ..., user_id: _Optional[str] = ..., url: _Optional[str] = ..., referrer: _Optional[str] = ..., data: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., client_occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., clock_skew_ms: _Optional[int] = ..., browser: _Optional[str] = ..., browser_version: _Optional[str] = ..., os: _Optional[str] = ..., device_class: _Optional[str] = ..., is_bot: _Optional[bool] = ..., utm_source: _Optional[str] = ..., utm_medium: _Optional[str] = ..., utm_campaign: _Optional[str] = ..., utm_term: _Optional[str] = ..., utm_content: _Optional[str] = ..., gclid: _Optional[str] = ..., fbclid: _Optional[str] = ..., referrer_host: _Optional[str] = ..., referrer_class: _Optional[str] = ..., country: _Optional[str] = ...) -> None: ...

class TailEventsResponse(_message.Message):
    __slots__ = ("event", "dead_letter")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    event: StoredEvent
    dead_letter: DeadLetter
    def __init__(self, event: _Optional[_Union[StoredEvent, _Mapping]] = ..., dead_letter: _Optional[_Union[DeadLetter, _Mapping]] = ...) -> None: ...

class ProjectKey(_message.Message):
    __slots__ = ("id", "kind", "key", "label", "created_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    key: str
    label: str
    created_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., key: _Optional[str] = ..., label: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ProjectKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ProjectKey, _Mapping]]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("kind", "label")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    label: str
    def __init__(self, kind: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "info")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    key: str
    info: ProjectKey
    def __init__(self, key: _Optional[str] = ..., info: _Optional[_Union[ProjectKey, _Mapping]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id", "allow_last")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LAST_FIELD_NUMBER: _ClassVar[int]
    id: int
    allow_last: bool
    def __init__(self, id: _Optional[int] = ..., allow_last: _Optional[bool] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ProjectKey
    def __init__(self, info: _Optional[_Union[ProjectKey, _Mapping]] = ...) -> None: ...
