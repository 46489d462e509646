import datetime

from flashcrowd.audience.v1 import pack_pb2 as _pack_pb2
from flashcrowd.audience.v1 import spec_pb2 as _spec_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LivePack(_message.Message):
    __slots__ = ("name", "display_name", "spec", "size", "as_of", "stream_sequence", "create_time", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    spec: _spec_pb2.PackSpec
    size: int
    as_of: _timestamp_pb2.Timestamp
    stream_sequence: int
    create_time: _timestamp_pb2.Timestamp
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., spec: _Optional[_Union[_spec_pb2.PackSpec, _Mapping]] = ..., size: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream_sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class CreateLivePackRequest(_message.Message):
    __slots__ = ("parent", "live_pack_id", "live_pack")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    LIVE_PACK_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_PACK_FIELD_NUMBER: _ClassVar[int]
    parent: str
    live_pack_id: str
    live_pack: LivePack
    def __init__(self, parent: _Optional[str] = ..., live_pack_id: _Optional[str] = ..., live_pack: _Optional[_Union[LivePack, _Mapping]] = ...) -> None: ...

class GetLivePackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListLivePacksRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLivePacksResponse(_message.Message):
    __slots__ = ("live_packs", "next_page_token")
    LIVE_PACKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    live_packs: _containers.RepeatedCompositeFieldContainer[LivePack]
    next_page_token: str
    def __init__(self, live_packs: _Optional[_Iterable[_Union[LivePack, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteLivePackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SnapshotLivePackRequest(_message.Message):
    __slots__ = ("name", "pack_id", "display_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    pack_id: str
    display_name: str
    def __init__(self, name: _Optional[str] = ..., pack_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...
