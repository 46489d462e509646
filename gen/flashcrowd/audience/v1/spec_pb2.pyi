import datetime

from flashcrowd.audience.v1 import events_pb2 as _events_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgeBand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGE_BAND_UNSPECIFIED: _ClassVar[AgeBand]
    AGE_BAND_UNDER_18: _ClassVar[AgeBand]
    AGE_BAND_18_24: _ClassVar[AgeBand]
    AGE_BAND_25_30: _ClassVar[AgeBand]
    AGE_BAND_31_35: _ClassVar[AgeBand]
    AGE_BAND_36_40: _ClassVar[AgeBand]
    AGE_BAND_41_50: _ClassVar[AgeBand]
    AGE_BAND_OVER_50: _ClassVar[AgeBand]

class Gender(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENDER_UNSPECIFIED: _ClassVar[Gender]
    GENDER_FEMALE: _ClassVar[Gender]
    GENDER_MALE: _ClassVar[Gender]
AGE_BAND_UNSPECIFIED: AgeBand
AGE_BAND_UNDER_18: AgeBand
AGE_BAND_18_24: AgeBand
AGE_BAND_25_30: AgeBand
AGE_BAND_31_35: AgeBand
AGE_BAND_36_40: AgeBand
AGE_BAND_41_50: AgeBand
AGE_BAND_OVER_50: AgeBand
GENDER_UNSPECIFIED: Gender
GENDER_FEMALE: Gender
GENDER_MALE: Gender

class PackSpec(_message.Message):
    __slots__ = ("behavior", "profile", "pack", "union", "intersect", "exclude", "shortcut")
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    UNION_FIELD_NUMBER: _ClassVar[int]
    INTERSECT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    SHORTCUT_FIELD_NUMBER: _ClassVar[int]
    behavior: BehaviorCondition
    profile: ProfileFilter
    pack: PackReference
    union: SetOperands
    intersect: SetOperands
    exclude: ExcludeOperands
    shortcut: Shortcut
    def __init__(self, behavior: _Optional[_Union[BehaviorCondition, _Mapping]] = ..., profile: _Optional[_Union[ProfileFilter, _Mapping]] = ..., pack: _Optional[_Union[PackReference, _Mapping]] = ..., union: _Optional[_Union[SetOperands, _Mapping]] = ..., intersect: _Optional[_Union[SetOperands, _Mapping]] = ..., exclude: _Optional[_Union[ExcludeOperands, _Mapping]] = ..., shortcut: _Optional[_Union[Shortcut, _Mapping]] = ...) -> None: ...

class SetOperands(_message.Message):
    __slots__ = ("operands",)
    OPERANDS_FIELD_NUMBER: _ClassVar[int]
    operands: _containers.RepeatedCompositeFieldContainer[PackSpec]
    def __init__(self, operands: _Optional[_Iterable[_Union[PackSpec, _Mapping]]] = ...) -> None: ...

class ExcludeOperands(_message.Message):
    __slots__ = ("base", "subtract")
    BASE_FIELD_NUMBER: _ClassVar[int]
    SUBTRACT_FIELD_NUMBER: _ClassVar[int]
    base: PackSpec
    subtract: _containers.RepeatedCompositeFieldContainer[PackSpec]
    def __init__(self, base: _Optional[_Union[PackSpec, _Mapping]] = ..., subtract: _Optional[_Iterable[_Union[PackSpec, _Mapping]]] = ...) -> None: ...

class TimeWindow(_message.Message):
    __slots__ = ("absolute", "last")
    ABSOLUTE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    absolute: AbsoluteWindow
    last: _duration_pb2.Duration
    def __init__(self, absolute: _Optional[_Union[AbsoluteWindow, _Mapping]] = ..., last: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AbsoluteWindow(_message.Message):
    __slots__ = ("start_time", "end_time")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AmountRange(_message.Message):
    __slots__ = ("min_fen", "max_fen")
    MIN_FEN_FIELD_NUMBER: _ClassVar[int]
    MAX_FEN_FIELD_NUMBER: _ClassVar[int]
    min_fen: int
    max_fen: int
    def __init__(self, min_fen: _Optional[int] = ..., max_fen: _Optional[int] = ...) -> None: ...

class EventFilter(_message.Message):
    __slots__ = ("item_ids", "category_ids", "campaign_ids", "video_ids", "amount")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_IDS_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_IDS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_IDS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    category_ids: _containers.RepeatedScalarFieldContainer[int]
    campaign_ids: _containers.RepeatedScalarFieldContainer[int]
    video_ids: _containers.RepeatedScalarFieldContainer[int]
    amount: AmountRange
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ..., category_ids: _Optional[_Iterable[int]] = ..., campaign_ids: _Optional[_Iterable[int]] = ..., video_ids: _Optional[_Iterable[int]] = ..., amount: _Optional[_Union[AmountRange, _Mapping]] = ...) -> None: ...

class BehaviorCondition(_message.Message):
    __slots__ = ("event_types", "window", "min_count", "filter")
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    event_types: _containers.RepeatedScalarFieldContainer[_events_pb2.EventType]
    window: TimeWindow
    min_count: int
    filter: EventFilter
    def __init__(self, event_types: _Optional[_Iterable[_Union[_events_pb2.EventType, str]]] = ..., window: _Optional[_Union[TimeWindow, _Mapping]] = ..., min_count: _Optional[int] = ..., filter: _Optional[_Union[EventFilter, _Mapping]] = ...) -> None: ...

class ProfileFilter(_message.Message):
    __slots__ = ("age_bands", "genders", "regions", "interests")
    AGE_BANDS_FIELD_NUMBER: _ClassVar[int]
    GENDERS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    INTERESTS_FIELD_NUMBER: _ClassVar[int]
    age_bands: _containers.RepeatedScalarFieldContainer[AgeBand]
    genders: _containers.RepeatedScalarFieldContainer[Gender]
    regions: _containers.RepeatedScalarFieldContainer[str]
    interests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, age_bands: _Optional[_Iterable[_Union[AgeBand, str]]] = ..., genders: _Optional[_Iterable[_Union[Gender, str]]] = ..., regions: _Optional[_Iterable[str]] = ..., interests: _Optional[_Iterable[str]] = ...) -> None: ...

class PackReference(_message.Message):
    __slots__ = ("pack", "version")
    PACK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    pack: str
    version: int
    def __init__(self, pack: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Shortcut(_message.Message):
    __slots__ = ("kind", "window", "filter")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Shortcut.Kind]
        KIND_PURCHASERS: _ClassVar[Shortcut.Kind]
        KIND_CLICKERS: _ClassVar[Shortcut.Kind]
        KIND_VIDEO_VIEWERS: _ClassVar[Shortcut.Kind]
        KIND_CART_ABANDONERS: _ClassVar[Shortcut.Kind]
        KIND_FOLLOWERS: _ClassVar[Shortcut.Kind]
        KIND_HIGH_INTENT: _ClassVar[Shortcut.Kind]
    KIND_UNSPECIFIED: Shortcut.Kind
    KIND_PURCHASERS: Shortcut.Kind
    KIND_CLICKERS: Shortcut.Kind
    KIND_VIDEO_VIEWERS: Shortcut.Kind
    KIND_CART_ABANDONERS: Shortcut.Kind
    KIND_FOLLOWERS: Shortcut.Kind
    KIND_HIGH_INTENT: Shortcut.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    kind: Shortcut.Kind
    window: TimeWindow
    filter: EventFilter
    def __init__(self, kind: _Optional[_Union[Shortcut.Kind, str]] = ..., window: _Optional[_Union[TimeWindow, _Mapping]] = ..., filter: _Optional[_Union[EventFilter, _Mapping]] = ...) -> None: ...

class BuildOptions(_message.Message):
    __slots__ = ("include_bots", "as_of")
    INCLUDE_BOTS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    include_bots: bool
    as_of: _timestamp_pb2.Timestamp
    def __init__(self, include_bots: _Optional[bool] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
