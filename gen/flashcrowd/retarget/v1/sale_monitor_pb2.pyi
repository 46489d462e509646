import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SaleGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SALE_GROUP_BY_UNSPECIFIED: _ClassVar[SaleGroupBy]
    SALE_GROUP_BY_CAMPAIGN: _ClassVar[SaleGroupBy]
    SALE_GROUP_BY_ITEM: _ClassVar[SaleGroupBy]
SALE_GROUP_BY_UNSPECIFIED: SaleGroupBy
SALE_GROUP_BY_CAMPAIGN: SaleGroupBy
SALE_GROUP_BY_ITEM: SaleGroupBy

class SaleScope(_message.Message):
    __slots__ = ("item_ids", "campaign_ids", "hook_products", "coupon_discount_fen")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_IDS_FIELD_NUMBER: _ClassVar[int]
    HOOK_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    COUPON_DISCOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    campaign_ids: _containers.RepeatedScalarFieldContainer[int]
    hook_products: _containers.RepeatedCompositeFieldContainer[HookProduct]
    coupon_discount_fen: int
    def __init__(self, item_ids: _Optional[_Iterable[int]] = ..., campaign_ids: _Optional[_Iterable[int]] = ..., hook_products: _Optional[_Iterable[_Union[HookProduct, _Mapping]]] = ..., coupon_discount_fen: _Optional[int] = ...) -> None: ...

class HookProduct(_message.Message):
    __slots__ = ("item_id", "stock", "sale_price_fen", "unit_cost_fen")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    SALE_PRICE_FEN_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    stock: int
    sale_price_fen: int
    unit_cost_fen: int
    def __init__(self, item_id: _Optional[int] = ..., stock: _Optional[int] = ..., sale_price_fen: _Optional[int] = ..., unit_cost_fen: _Optional[int] = ...) -> None: ...

class GetSaleStatsRequest(_message.Message):
    __slots__ = ("parent", "scope", "start_time", "end_time", "group_by")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    scope: SaleScope
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: SaleGroupBy
    def __init__(self, parent: _Optional[str] = ..., scope: _Optional[_Union[SaleScope, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[SaleGroupBy, str]] = ...) -> None: ...

class WatchSaleRequest(_message.Message):
    __slots__ = ("parent", "scope", "start_time", "group_by")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    scope: SaleScope
    start_time: _timestamp_pb2.Timestamp
    group_by: SaleGroupBy
    def __init__(self, parent: _Optional[str] = ..., scope: _Optional[_Union[SaleScope, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[SaleGroupBy, str]] = ...) -> None: ...

class SaleCounters(_message.Message):
    __slots__ = ("key", "views", "clicks", "live_entries", "add_to_cart", "orders", "paid_orders", "paid_gmv_fen", "refunds", "refunded_fen", "coupons_claimed", "coupons_redeemed", "coupon_cost_fen", "stock_left", "ctr", "cvr", "roi", "projected_loss_fen")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    CLICKS_FIELD_NUMBER: _ClassVar[int]
    LIVE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ADD_TO_CART_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    PAID_ORDERS_FIELD_NUMBER: _ClassVar[int]
    PAID_GMV_FEN_FIELD_NUMBER: _ClassVar[int]
    REFUNDS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FEN_FIELD_NUMBER: _ClassVar[int]
    COUPONS_CLAIMED_FIELD_NUMBER: _ClassVar[int]
    COUPONS_REDEEMED_FIELD_NUMBER: _ClassVar[int]
    COUPON_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    STOCK_LEFT_FIELD_NUMBER: _ClassVar[int]
    CTR_FIELD_NUMBER: _ClassVar[int]
    CVR_FIELD_NUMBER: _ClassVar[int]
    ROI_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_LOSS_FEN_FIELD_NUMBER: _ClassVar[int]
    key: str
    views: int
    clicks: int
    live_entries: int
    add_to_cart: int
    orders: int
    paid_orders: int
    paid_gmv_fen: int
    refunds: int
    refunded_fen: int
    coupons_claimed: int
    coupons_redeemed: int
    coupon_cost_fen: int
    stock_left: int
    ctr: float
    cvr: float
    roi: float
    projected_loss_fen: int
    def __init__(self, key: _Optional[str] = ..., views: _Optional[int] = ..., clicks: _Optional[int] = ..., live_entries: _Optional[int] = ..., add_to_cart: _Optional[int] = ..., orders: _Optional[int] = ..., paid_orders: _Optional[int] = ..., paid_gmv_fen: _Optional[int] = ..., refunds: _Optional[int] = ..., refunded_fen: _Optional[int] = ..., coupons_claimed: _Optional[int] = ..., coupons_redeemed: _Optional[int] = ..., coupon_cost_fen: _Optional[int] = ..., stock_left: _Optional[int] = ..., ctr: _Optional[float] = ..., cvr: _Optional[float] = ..., roi: _Optional[float] = ..., projected_loss_fen: _Optional[int] = ...) -> None: ...

class SaleStats(_message.Message):
    __slots__ = ("start_time", "end_time", "total", "groups", "stream_sequence")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    total: SaleCounters
    groups: _containers.RepeatedCompositeFieldContainer[SaleCounters]
    stream_sequence: int
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total: _Optional[_Union[SaleCounters, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[SaleCounters, _Mapping]]] = ..., stream_sequence: _Optional[int] = ...) -> None: ...
