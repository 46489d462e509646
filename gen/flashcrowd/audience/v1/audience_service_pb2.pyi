import datetime

from flashcrowd.audience.v1 import pack_pb2 as _pack_pb2
from flashcrowd.audience.v1 import spec_pb2 as _spec_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import client_pb2 as _client_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_USER_ID: _ClassVar[ExportFormat]
    EXPORT_FORMAT_SHA256_PHONE: _ClassVar[ExportFormat]
    EXPORT_FORMAT_SHA256_OAID: _ClassVar[ExportFormat]
    EXPORT_FORMAT_MD5_PHONE: _ClassVar[ExportFormat]
    EXPORT_FORMAT_KEYED_SHA256_PHONE: _ClassVar[ExportFormat]
    EXPORT_FORMAT_KEYED_SHA256_OAID: _ClassVar[ExportFormat]

class IdType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ID_TYPE_UNSPECIFIED: _ClassVar[IdType]
    ID_TYPE_PHONE: _ClassVar[IdType]
    ID_TYPE_OAID: _ClassVar[IdType]
    ID_TYPE_IMEI: _ClassVar[IdType]
    ID_TYPE_IDFA: _ClassVar[IdType]
    ID_TYPE_EMAIL: _ClassVar[IdType]
    ID_TYPE_USER_ID: _ClassVar[IdType]

class HashType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HASH_TYPE_UNSPECIFIED: _ClassVar[HashType]
    HASH_TYPE_SHA256: _ClassVar[HashType]
    HASH_TYPE_MD5: _ClassVar[HashType]
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_USER_ID: ExportFormat
EXPORT_FORMAT_SHA256_PHONE: ExportFormat
EXPORT_FORMAT_SHA256_OAID: ExportFormat
EXPORT_FORMAT_MD5_PHONE: ExportFormat
EXPORT_FORMAT_KEYED_SHA256_PHONE: ExportFormat
EXPORT_FORMAT_KEYED_SHA256_OAID: ExportFormat
ID_TYPE_UNSPECIFIED: IdType
ID_TYPE_PHONE: IdType
ID_TYPE_OAID: IdType
ID_TYPE_IMEI: IdType
ID_TYPE_IDFA: IdType
ID_TYPE_EMAIL: IdType
ID_TYPE_USER_ID: IdType
HASH_TYPE_UNSPECIFIED: HashType
HASH_TYPE_SHA256: HashType
HASH_TYPE_MD5: HashType

class CreatePackRequest(_message.Message):
    __slots__ = ("parent", "pack_id", "pack", "request_id")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    parent: str
    pack_id: str
    pack: _pack_pb2.Pack
    request_id: str
    def __init__(self, parent: _Optional[str] = ..., pack_id: _Optional[str] = ..., pack: _Optional[_Union[_pack_pb2.Pack, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BuildPackMetadata(_message.Message):
    __slots__ = ("pack", "version", "stage", "progress_percent", "start_time", "end_time")
    PACK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    pack: str
    version: int
    stage: str
    progress_percent: float
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, pack: _Optional[str] = ..., version: _Optional[int] = ..., stage: _Optional[str] = ..., progress_percent: _Optional[float] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EstimatePackSizeRequest(_message.Message):
    __slots__ = ("parent", "spec", "options", "sample_fraction")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    parent: str
    spec: _spec_pb2.PackSpec
    options: _spec_pb2.BuildOptions
    sample_fraction: float
    def __init__(self, parent: _Optional[str] = ..., spec: _Optional[_Union[_spec_pb2.PackSpec, _Mapping]] = ..., options: _Optional[_Union[_spec_pb2.BuildOptions, _Mapping]] = ..., sample_fraction: _Optional[float] = ...) -> None: ...

class EstimatePackSizeResponse(_message.Message):
    __slots__ = ("estimated_size", "sample_size", "sample_fraction", "lower_bound", "upper_bound", "disclosure")
    ESTIMATED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    DISCLOSURE_FIELD_NUMBER: _ClassVar[int]
    estimated_size: int
    sample_size: int
    sample_fraction: float
    lower_bound: int
    upper_bound: int
    disclosure: _pack_pb2.SizeDisclosure
    def __init__(self, estimated_size: _Optional[int] = ..., sample_size: _Optional[int] = ..., sample_fraction: _Optional[float] = ..., lower_bound: _Optional[int] = ..., upper_bound: _Optional[int] = ..., disclosure: _Optional[_Union[_pack_pb2.SizeDisclosure, str]] = ...) -> None: ...

class GetPackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPacksRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token", "filter")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    filter: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListPacksResponse(_message.Message):
    __slots__ = ("packs", "next_page_token")
    PACKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    packs: _containers.RepeatedCompositeFieldContainer[_pack_pb2.Pack]
    next_page_token: str
    def __init__(self, packs: _Optional[_Iterable[_Union[_pack_pb2.Pack, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeletePackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RefreshPackRequest(_message.Message):
    __slots__ = ("name", "as_of")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    name: str
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckMembershipRequest(_message.Message):
    __slots__ = ("parent", "packs", "user_ids")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    parent: str
    packs: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, parent: _Optional[str] = ..., packs: _Optional[_Iterable[str]] = ..., user_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PackMembership(_message.Message):
    __slots__ = ("pack", "version", "members")
    PACK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    pack: str
    version: int
    members: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, pack: _Optional[str] = ..., version: _Optional[int] = ..., members: _Optional[_Iterable[bool]] = ...) -> None: ...

class CheckMembershipResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PackMembership]
    def __init__(self, results: _Optional[_Iterable[_Union[PackMembership, _Mapping]]] = ...) -> None: ...

class ExportPackRequest(_message.Message):
    __slots__ = ("name", "format", "page_size", "page_token", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: ExportFormat
    page_size: int
    page_token: str
    version: int
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ExportPackResponse(_message.Message):
    __slots__ = ("user_ids", "hashed_ids", "next_page_token", "exported", "total")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    HASHED_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    hashed_ids: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    exported: int
    total: int
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ..., hashed_ids: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ..., exported: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class UploadPackHeader(_message.Message):
    __slots__ = ("parent", "pack_id", "display_name", "labels", "id_type", "hash_type", "ttl")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ID_TYPE_FIELD_NUMBER: _ClassVar[int]
    HASH_TYPE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    parent: str
    pack_id: str
    display_name: str
    labels: _containers.ScalarMap[str, str]
    id_type: IdType
    hash_type: HashType
    ttl: _duration_pb2.Duration
    def __init__(self, parent: _Optional[str] = ..., pack_id: _Optional[str] = ..., display_name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., id_type: _Optional[_Union[IdType, str]] = ..., hash_type: _Optional[_Union[HashType, str]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class UploadPackChunk(_message.Message):
    __slots__ = ("hashed_ids", "user_ids")
    HASHED_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    hashed_ids: _containers.RepeatedScalarFieldContainer[str]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hashed_ids: _Optional[_Iterable[str]] = ..., user_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class UploadPackRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadPackHeader
    chunk: UploadPackChunk
    def __init__(self, header: _Optional[_Union[UploadPackHeader, _Mapping]] = ..., chunk: _Optional[_Union[UploadPackChunk, _Mapping]] = ...) -> None: ...

class InvalidRow(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class UploadPackResponse(_message.Message):
    __slots__ = ("pack", "stats", "invalid_rows")
    PACK_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    INVALID_ROWS_FIELD_NUMBER: _ClassVar[int]
    pack: _pack_pb2.Pack
    stats: _pack_pb2.UploadStats
    invalid_rows: _containers.RepeatedCompositeFieldContainer[InvalidRow]
    def __init__(self, pack: _Optional[_Union[_pack_pb2.Pack, _Mapping]] = ..., stats: _Optional[_Union[_pack_pb2.UploadStats, _Mapping]] = ..., invalid_rows: _Optional[_Iterable[_Union[InvalidRow, _Mapping]]] = ...) -> None: ...

class GetPackPersonaRequest(_message.Message):
    __slots__ = ("name", "top_n")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    name: str
    top_n: int
    def __init__(self, name: _Optional[str] = ..., top_n: _Optional[int] = ...) -> None: ...
