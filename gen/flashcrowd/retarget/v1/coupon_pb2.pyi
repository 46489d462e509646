import datetime

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

class RefundPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUND_POLICY_UNSPECIFIED: _ClassVar[RefundPolicy]
    REFUND_POLICY_RELEASE: _ClassVar[RefundPolicy]
    REFUND_POLICY_VOID: _ClassVar[RefundPolicy]
REFUND_POLICY_UNSPECIFIED: RefundPolicy
REFUND_POLICY_RELEASE: RefundPolicy
REFUND_POLICY_VOID: RefundPolicy

class CouponTemplate(_message.Message):
    __slots__ = ("name", "display_name", "fixed_amount", "percent_off", "min_spend_fen", "valid_start_time", "valid_end_time", "valid_for", "applicable_item_ids", "total_stock", "budget_cap_fen", "per_user_limit", "refund_policy", "currency_code", "issued_count", "issued_value_fen", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    FIXED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PERCENT_OFF_FIELD_NUMBER: _ClassVar[int]
    MIN_SPEND_FEN_FIELD_NUMBER: _ClassVar[int]
    VALID_START_TIME_FIELD_NUMBER: _ClassVar[int]
    VALID_END_TIME_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_FIELD_NUMBER: _ClassVar[int]
    APPLICABLE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STOCK_FIELD_NUMBER: _ClassVar[int]
    BUDGET_CAP_FEN_FIELD_NUMBER: _ClassVar[int]
    PER_USER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    REFUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_COUNT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_VALUE_FEN_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    fixed_amount: FixedAmountOff
    percent_off: PercentOff
    min_spend_fen: int
    valid_start_time: _timestamp_pb2.Timestamp
    valid_end_time: _timestamp_pb2.Timestamp
    valid_for: _duration_pb2.Duration
    applicable_item_ids: _containers.RepeatedScalarFieldContainer[int]
    total_stock: int
    budget_cap_fen: int
    per_user_limit: int
    refund_policy: RefundPolicy
    currency_code: str
    issued_count: int
    issued_value_fen: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., fixed_amount: _Optional[_Union[FixedAmountOff, _Mapping]] = ..., percent_off: _Optional[_Union[PercentOff, _Mapping]] = ..., min_spend_fen: _Optional[int] = ..., valid_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., applicable_item_ids: _Optional[_Iterable[int]] = ..., total_stock: _Optional[int] = ..., budget_cap_fen: _Optional[int] = ..., per_user_limit: _Optional[int] = ..., refund_policy: _Optional[_Union[RefundPolicy, str]] = ..., currency_code: _Optional[str] = ..., issued_count: _Optional[int] = ..., issued_value_fen: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FixedAmountOff(_message.Message):
    __slots__ = ("amount_fen",)
    AMOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    amount_fen: int
    def __init__(self, amount_fen: _Optional[int] = ...) -> None: ...

class PercentOff(_message.Message):
    __slots__ = ("basis_points", "cap_fen")
    BASIS_POINTS_FIELD_NUMBER: _ClassVar[int]
    CAP_FEN_FIELD_NUMBER: _ClassVar[int]
    basis_points: int
    cap_fen: int
    def __init__(self, basis_points: _Optional[int] = ..., cap_fen: _Optional[int] = ...) -> None: ...

class Coupon(_message.Message):
    __slots__ = ("name", "coupon_template", "campaign", "arm", "user_id", "state", "face_value_fen", "issue_time", "expire_time", "order_id", "discount_fen")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Coupon.State]
        STATE_ISSUED: _ClassVar[Coupon.State]
        STATE_REDEEMED: _ClassVar[Coupon.State]
        STATE_VOID: _ClassVar[Coupon.State]
        STATE_EXPIRED: _ClassVar[Coupon.State]
    STATE_UNSPECIFIED: Coupon.State
    STATE_ISSUED: Coupon.State
    STATE_REDEEMED: Coupon.State
    STATE_VOID: Coupon.State
    STATE_EXPIRED: Coupon.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUPON_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FACE_VALUE_FEN_FIELD_NUMBER: _ClassVar[int]
    ISSUE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    coupon_template: str
    campaign: str
    arm: str
    user_id: int
    state: Coupon.State
    face_value_fen: int
    issue_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    order_id: str
    discount_fen: int
    def __init__(self, name: _Optional[str] = ..., coupon_template: _Optional[str] = ..., campaign: _Optional[str] = ..., arm: _Optional[str] = ..., user_id: _Optional[int] = ..., state: _Optional[_Union[Coupon.State, str]] = ..., face_value_fen: _Optional[int] = ..., issue_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., order_id: _Optional[str] = ..., discount_fen: _Optional[int] = ...) -> None: ...
