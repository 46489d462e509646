import datetime

from flashcrowd.retarget.v1 import campaign_pb2 as _campaign_pb2
from flashcrowd.retarget.v1 import coupon_pb2 as _coupon_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCouponTemplateRequest(_message.Message):
    __slots__ = ("parent", "coupon_template_id", "coupon_template")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    COUPON_TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    COUPON_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    parent: str
    coupon_template_id: str
    coupon_template: _coupon_pb2.CouponTemplate
    def __init__(self, parent: _Optional[str] = ..., coupon_template_id: _Optional[str] = ..., coupon_template: _Optional[_Union[_coupon_pb2.CouponTemplate, _Mapping]] = ...) -> None: ...

class GetCouponTemplateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCouponTemplatesRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCouponTemplatesResponse(_message.Message):
    __slots__ = ("coupon_templates", "next_page_token")
    COUPON_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    coupon_templates: _containers.RepeatedCompositeFieldContainer[_coupon_pb2.CouponTemplate]
    next_page_token: str
    def __init__(self, coupon_templates: _Optional[_Iterable[_Union[_coupon_pb2.CouponTemplate, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateCampaignRequest(_message.Message):
    __slots__ = ("parent", "campaign_id", "campaign")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    campaign_id: str
    campaign: _campaign_pb2.Campaign
    def __init__(self, parent: _Optional[str] = ..., campaign_id: _Optional[str] = ..., campaign: _Optional[_Union[_campaign_pb2.Campaign, _Mapping]] = ...) -> None: ...

class GetCampaignRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCampaignsRequest(_message.Message):
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

class ListCampaignsResponse(_message.Message):
    __slots__ = ("campaigns", "next_page_token")
    CAMPAIGNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    campaigns: _containers.RepeatedCompositeFieldContainer[_campaign_pb2.Campaign]
    next_page_token: str
    def __init__(self, campaigns: _Optional[_Iterable[_Union[_campaign_pb2.Campaign, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateCampaignRequest(_message.Message):
    __slots__ = ("campaign", "update_mask", "rule_firing")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    RULE_FIRING_FIELD_NUMBER: _ClassVar[int]
    campaign: _campaign_pb2.Campaign
    update_mask: _field_mask_pb2.FieldMask
    rule_firing: _campaign_pb2.RuleFiring
    def __init__(self, campaign: _Optional[_Union[_campaign_pb2.Campaign, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., rule_firing: _Optional[_Union[_campaign_pb2.RuleFiring, _Mapping]] = ...) -> None: ...

class LaunchCampaignRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PauseCampaignRequest(_message.Message):
    __slots__ = ("name", "reason", "rule_firing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RULE_FIRING_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    rule_firing: _campaign_pb2.RuleFiring
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., rule_firing: _Optional[_Union[_campaign_pb2.RuleFiring, _Mapping]] = ...) -> None: ...

class ResumeCampaignRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelCampaignRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CopyCampaignRequest(_message.Message):
    __slots__ = ("name", "campaign_id", "audience_pack", "rule_firing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_PACK_FIELD_NUMBER: _ClassVar[int]
    RULE_FIRING_FIELD_NUMBER: _ClassVar[int]
    name: str
    campaign_id: str
    audience_pack: str
    rule_firing: _campaign_pb2.RuleFiring
    def __init__(self, name: _Optional[str] = ..., campaign_id: _Optional[str] = ..., audience_pack: _Optional[str] = ..., rule_firing: _Optional[_Union[_campaign_pb2.RuleFiring, _Mapping]] = ...) -> None: ...

class ClaimCouponRequest(_message.Message):
    __slots__ = ("coupon_template", "user_id", "campaign", "request_id")
    COUPON_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    coupon_template: str
    user_id: int
    campaign: str
    request_id: str
    def __init__(self, coupon_template: _Optional[str] = ..., user_id: _Optional[int] = ..., campaign: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RedeemCouponRequest(_message.Message):
    __slots__ = ("coupon", "user_id", "order_id", "order_amount_fen", "item_ids", "idempotency_key", "order_time")
    COUPON_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_AMOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ORDER_TIME_FIELD_NUMBER: _ClassVar[int]
    coupon: str
    user_id: int
    order_id: str
    order_amount_fen: int
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    idempotency_key: str
    order_time: _timestamp_pb2.Timestamp
    def __init__(self, coupon: _Optional[str] = ..., user_id: _Optional[int] = ..., order_id: _Optional[str] = ..., order_amount_fen: _Optional[int] = ..., item_ids: _Optional[_Iterable[int]] = ..., idempotency_key: _Optional[str] = ..., order_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RedeemCouponResponse(_message.Message):
    __slots__ = ("coupon", "discount_fen", "payable_fen", "replayed")
    COUPON_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FEN_FIELD_NUMBER: _ClassVar[int]
    PAYABLE_FEN_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    coupon: _coupon_pb2.Coupon
    discount_fen: int
    payable_fen: int
    replayed: bool
    def __init__(self, coupon: _Optional[_Union[_coupon_pb2.Coupon, _Mapping]] = ..., discount_fen: _Optional[int] = ..., payable_fen: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RefundRedemptionRequest(_message.Message):
    __slots__ = ("coupon", "order_id", "idempotency_key")
    COUPON_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    coupon: str
    order_id: str
    idempotency_key: str
    def __init__(self, coupon: _Optional[str] = ..., order_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class StreamOffersRequest(_message.Message):
    __slots__ = ("parent", "campaign", "cursor", "follow")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    parent: str
    campaign: str
    cursor: str
    follow: bool
    def __init__(self, parent: _Optional[str] = ..., campaign: _Optional[str] = ..., cursor: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("cursor", "campaign", "arm_id", "user_id", "coupon", "item_ids", "create_time")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    ARM_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    COUPON_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    campaign: str
    arm_id: str
    user_id: int
    coupon: str
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[str] = ..., campaign: _Optional[str] = ..., arm_id: _Optional[str] = ..., user_id: _Optional[int] = ..., coupon: _Optional[str] = ..., item_ids: _Optional[_Iterable[int]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetCampaignReportRequest(_message.Message):
    __slots__ = ("campaign",)
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    def __init__(self, campaign: _Optional[str] = ...) -> None: ...
