import datetime

from flashcrowd.audience.v1 import spec_pb2 as _spec_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SizeDisclosure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIZE_DISCLOSURE_UNSPECIFIED: _ClassVar[SizeDisclosure]
    SIZE_DISCLOSURE_EXACT: _ClassVar[SizeDisclosure]
    SIZE_DISCLOSURE_NOISY: _ClassVar[SizeDisclosure]
    SIZE_DISCLOSURE_BELOW_MINIMUM: _ClassVar[SizeDisclosure]
    SIZE_DISCLOSURE_BUDGET_EXHAUSTED: _ClassVar[SizeDisclosure]
SIZE_DISCLOSURE_UNSPECIFIED: SizeDisclosure
SIZE_DISCLOSURE_EXACT: SizeDisclosure
SIZE_DISCLOSURE_NOISY: SizeDisclosure
SIZE_DISCLOSURE_BELOW_MINIMUM: SizeDisclosure
SIZE_DISCLOSURE_BUDGET_EXHAUSTED: SizeDisclosure

class Pack(_message.Message):
    __slots__ = ("name", "display_name", "labels", "spec", "options", "ttl", "version", "state", "size", "source", "build_stats", "upload_stats", "inputs", "create_time", "update_time", "expire_time", "etag", "failure_reason", "size_disclosure")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Pack.State]
        STATE_BUILDING: _ClassVar[Pack.State]
        STATE_READY: _ClassVar[Pack.State]
        STATE_FAILED: _ClassVar[Pack.State]
    STATE_UNSPECIFIED: Pack.State
    STATE_BUILDING: Pack.State
    STATE_READY: Pack.State
    STATE_FAILED: Pack.State
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[Pack.Source]
        SOURCE_SPEC: _ClassVar[Pack.Source]
        SOURCE_UPLOAD: _ClassVar[Pack.Source]
        SOURCE_LOOKALIKE: _ClassVar[Pack.Source]
        SOURCE_LIVE_SNAPSHOT: _ClassVar[Pack.Source]
    SOURCE_UNSPECIFIED: Pack.Source
    SOURCE_SPEC: Pack.Source
    SOURCE_UPLOAD: Pack.Source
    SOURCE_LOOKALIKE: Pack.Source
    SOURCE_LIVE_SNAPSHOT: Pack.Source
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BUILD_STATS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_STATS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    SIZE_DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    labels: _containers.ScalarMap[str, str]
    spec: _spec_pb2.PackSpec
    options: _spec_pb2.BuildOptions
    ttl: _duration_pb2.Duration
    version: int
    state: Pack.State
    size: int
    source: Pack.Source
    build_stats: BuildStats
    upload_stats: UploadStats
    inputs: _containers.RepeatedCompositeFieldContainer[_spec_pb2.PackReference]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    etag: str
    failure_reason: str
    size_disclosure: SizeDisclosure
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., spec: _Optional[_Union[_spec_pb2.PackSpec, _Mapping]] = ..., options: _Optional[_Union[_spec_pb2.BuildOptions, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., version: _Optional[int] = ..., state: _Optional[_Union[Pack.State, str]] = ..., size: _Optional[int] = ..., source: _Optional[_Union[Pack.Source, str]] = ..., build_stats: _Optional[_Union[BuildStats, _Mapping]] = ..., upload_stats: _Optional[_Union[UploadStats, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[_spec_pb2.PackReference, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., failure_reason: _Optional[str] = ..., size_disclosure: _Optional[_Union[SizeDisclosure, str]] = ...) -> None: ...

class BuildStats(_message.Message):
    __slots__ = ("files_total", "files_read", "events_matched", "bots_excluded", "duration", "dataset_version", "as_of", "shard")
    FILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FILES_READ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_MATCHED_FIELD_NUMBER: _ClassVar[int]
    BOTS_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    files_total: int
    files_read: int
    events_matched: int
    bots_excluded: int
    duration: _duration_pb2.Duration
    dataset_version: int
    as_of: _timestamp_pb2.Timestamp
    shard: str
    def __init__(self, files_total: _Optional[int] = ..., files_read: _Optional[int] = ..., events_matched: _Optional[int] = ..., bots_excluded: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dataset_version: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shard: _Optional[str] = ...) -> None: ...

class UploadStats(_message.Message):
    __slots__ = ("received", "valid", "invalid", "duplicates", "matched", "match_rate", "matched_disclosure")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    MATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    received: int
    valid: int
    invalid: int
    duplicates: int
    matched: int
    match_rate: float
    matched_disclosure: SizeDisclosure
    def __init__(self, received: _Optional[int] = ..., valid: _Optional[int] = ..., invalid: _Optional[int] = ..., duplicates: _Optional[int] = ..., matched: _Optional[int] = ..., match_rate: _Optional[float] = ..., matched_disclosure: _Optional[_Union[SizeDisclosure, str]] = ...) -> None: ...

class PersonaBucket(_message.Message):
    __slots__ = ("value", "count", "share", "population_share", "tgi")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SHARE_FIELD_NUMBER: _ClassVar[int]
    TGI_FIELD_NUMBER: _ClassVar[int]
    value: str
    count: int
    share: float
    population_share: float
    tgi: float
    def __init__(self, value: _Optional[str] = ..., count: _Optional[int] = ..., share: _Optional[float] = ..., population_share: _Optional[float] = ..., tgi: _Optional[float] = ...) -> None: ...

class PersonaDimension(_message.Message):
    __slots__ = ("dimension", "buckets")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    buckets: _containers.RepeatedCompositeFieldContainer[PersonaBucket]
    def __init__(self, dimension: _Optional[str] = ..., buckets: _Optional[_Iterable[_Union[PersonaBucket, _Mapping]]] = ...) -> None: ...

class PackPersona(_message.Message):
    __slots__ = ("pack", "version", "size", "population_size", "bots_excluded", "dimensions", "disclosure")
    PACK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    BOTS_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    pack: str
    version: int
    size: int
    population_size: int
    bots_excluded: int
    dimensions: _containers.RepeatedCompositeFieldContainer[PersonaDimension]
    disclosure: SizeDisclosure
    def __init__(self, pack: _Optional[str] = ..., version: _Optional[int] = ..., size: _Optional[int] = ..., population_size: _Optional[int] = ..., bots_excluded: _Optional[int] = ..., dimensions: _Optional[_Iterable[_Union[PersonaDimension, _Mapping]]] = ..., disclosure: _Optional[_Union[SizeDisclosure, str]] = ...) -> None: ...
