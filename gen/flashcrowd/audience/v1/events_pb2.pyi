import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIDEO_PLAY: _ClassVar[EventType]
    EVENT_TYPE_VIDEO_FINISH: _ClassVar[EventType]
    EVENT_TYPE_LIVE_ENTER: _ClassVar[EventType]
    EVENT_TYPE_PRODUCT_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_CART: _ClassVar[EventType]
    EVENT_TYPE_ORDER: _ClassVar[EventType]
    EVENT_TYPE_PAY: _ClassVar[EventType]
    EVENT_TYPE_REFUND: _ClassVar[EventType]
    EVENT_TYPE_FOLLOW: _ClassVar[EventType]
    EVENT_TYPE_COUPON_CLAIM: _ClassVar[EventType]
    EVENT_TYPE_COUPON_REDEEM: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIDEO_PLAY: EventType
EVENT_TYPE_VIDEO_FINISH: EventType
EVENT_TYPE_LIVE_ENTER: EventType
EVENT_TYPE_PRODUCT_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_CART: EventType
EVENT_TYPE_ORDER: EventType
EVENT_TYPE_PAY: EventType
EVENT_TYPE_REFUND: EventType
EVENT_TYPE_FOLLOW: EventType
EVENT_TYPE_COUPON_CLAIM: EventType
EVENT_TYPE_COUPON_REDEEM: EventType

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "event_time", "event_type", "item_id", "category_id", "campaign_id", "video_id", "order_id", "amount_fen")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    user_id: int
    event_time: _timestamp_pb2.Timestamp
    event_type: EventType
    item_id: int
    category_id: int
    campaign_id: int
    video_id: int
    order_id: int
    amount_fen: int
    def __init__(self, event_id: _Optional[int] = ..., user_id: _Optional[int] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_type: _Optional[_Union[EventType, str]] = ..., item_id: _Optional[int] = ..., category_id: _Optional[int] = ..., campaign_id: _Optional[int] = ..., video_id: _Optional[int] = ..., order_id: _Optional[int] = ..., amount_fen: _Optional[int] = ...) -> None: ...
