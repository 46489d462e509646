import datetime

from flashcrowd.retarget.v1 import sale_monitor_pb2 as _sale_monitor_pb2
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

class Campaign(_message.Message):
    __slots__ = ("name", "display_name", "audience_pack", "offer_item_ids", "coupon_template", "arms", "holdout_basis_points", "start_time", "end_time", "loss_cap_fen", "delivery_rate_per_second", "rules", "state", "progress", "create_time", "update_time", "etag", "attribution_window", "item_costs", "expected_conversion_rate", "power_plan")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Campaign.State]
        STATE_DRAFT: _ClassVar[Campaign.State]
        STATE_RUNNING: _ClassVar[Campaign.State]
        STATE_PAUSED: _ClassVar[Campaign.State]
        STATE_COMPLETED: _ClassVar[Campaign.State]
        STATE_CANCELLED: _ClassVar[Campaign.State]
    STATE_UNSPECIFIED: Campaign.State
    STATE_DRAFT: Campaign.State
    STATE_RUNNING: Campaign.State
    STATE_PAUSED: Campaign.State
    STATE_COMPLETED: Campaign.State
    STATE_CANCELLED: Campaign.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_PACK_FIELD_NUMBER: _ClassVar[int]
    OFFER_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    COUPON_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_BASIS_POINTS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LOSS_CAP_FEN_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ITEM_COSTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    POWER_PLAN_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    audience_pack: str
    offer_item_ids: _containers.RepeatedScalarFieldContainer[int]
    coupon_template: str
    arms: _containers.RepeatedCompositeFieldContainer[Arm]
    holdout_basis_points: int
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    loss_cap_fen: int
    delivery_rate_per_second: int
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    state: Campaign.State
    progress: LaunchProgress
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    attribution_window: _duration_pb2.Duration
    item_costs: _containers.RepeatedCompositeFieldContainer[ItemCost]
    expected_conversion_rate: float
    power_plan: PowerPlan
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., audience_pack: _Optional[str] = ..., offer_item_ids: _Optional[_Iterable[int]] = ..., coupon_template: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[Arm, _Mapping]]] = ..., holdout_basis_points: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loss_cap_fen: _Optional[int] = ..., delivery_rate_per_second: _Optional[int] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., state: _Optional[_Union[Campaign.State, str]] = ..., progress: _Optional[_Union[LaunchProgress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., attribution_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., item_costs: _Optional[_Iterable[_Union[ItemCost, _Mapping]]] = ..., expected_conversion_rate: _Optional[float] = ..., power_plan: _Optional[_Union[PowerPlan, _Mapping]] = ...) -> None: ...

class ItemCost(_message.Message):
    __slots__ = ("item_id", "unit_cost_fen", "hook")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    unit_cost_fen: int
    hook: bool
    def __init__(self, item_id: _Optional[int] = ..., unit_cost_fen: _Optional[int] = ..., hook: _Optional[bool] = ...) -> None: ...

class PowerPlan(_message.Message):
    __slots__ = ("arm_members", "holdout_members", "minimum_detectable_effect")
    ARM_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_DETECTABLE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    arm_members: int
    holdout_members: int
    minimum_detectable_effect: float
    def __init__(self, arm_members: _Optional[int] = ..., holdout_members: _Optional[int] = ..., minimum_detectable_effect: _Optional[float] = ...) -> None: ...

class Arm(_message.Message):
    __slots__ = ("arm_id", "weight", "coupon_template")
    ARM_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    COUPON_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    arm_id: str
    weight: int
    coupon_template: str
    def __init__(self, arm_id: _Optional[str] = ..., weight: _Optional[int] = ..., coupon_template: _Optional[str] = ...) -> None: ...

class LaunchProgress(_message.Message):
    __slots__ = ("audience_size", "processed", "issued", "held_out", "skipped", "stop_reason")
    AUDIENCE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_FIELD_NUMBER: _ClassVar[int]
    ISSUED_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    audience_size: int
    processed: int
    issued: int
    held_out: int
    skipped: int
    stop_reason: str
    def __init__(self, audience_size: _Optional[int] = ..., processed: _Optional[int] = ..., issued: _Optional[int] = ..., held_out: _Optional[int] = ..., skipped: _Optional[int] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("rule_id", "action", "metric", "comparison", "threshold", "sustain", "cooldown", "boost_rate_ceiling", "copy_to_pack", "scope")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Rule.Action]
        ACTION_STOP: _ClassVar[Rule.Action]
        ACTION_BOOST: _ClassVar[Rule.Action]
        ACTION_COPY: _ClassVar[Rule.Action]
    ACTION_UNSPECIFIED: Rule.Action
    ACTION_STOP: Rule.Action
    ACTION_BOOST: Rule.Action
    ACTION_COPY: Rule.Action
    class Comparison(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMPARISON_UNSPECIFIED: _ClassVar[Rule.Comparison]
        COMPARISON_LESS: _ClassVar[Rule.Comparison]
        COMPARISON_LESS_OR_EQUAL: _ClassVar[Rule.Comparison]
        COMPARISON_GREATER: _ClassVar[Rule.Comparison]
        COMPARISON_GREATER_OR_EQUAL: _ClassVar[Rule.Comparison]
    COMPARISON_UNSPECIFIED: Rule.Comparison
    COMPARISON_LESS: Rule.Comparison
    COMPARISON_LESS_OR_EQUAL: Rule.Comparison
    COMPARISON_GREATER: Rule.Comparison
    COMPARISON_GREATER_OR_EQUAL: Rule.Comparison
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SUSTAIN_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    BOOST_RATE_CEILING_FIELD_NUMBER: _ClassVar[int]
    COPY_TO_PACK_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    action: Rule.Action
    metric: str
    comparison: Rule.Comparison
    threshold: float
    sustain: _duration_pb2.Duration
    cooldown: _duration_pb2.Duration
    boost_rate_ceiling: int
    copy_to_pack: str
    scope: _sale_monitor_pb2.SaleScope
    def __init__(self, rule_id: _Optional[str] = ..., action: _Optional[_Union[Rule.Action, str]] = ..., metric: _Optional[str] = ..., comparison: _Optional[_Union[Rule.Comparison, str]] = ..., threshold: _Optional[float] = ..., sustain: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cooldown: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., boost_rate_ceiling: _Optional[int] = ..., copy_to_pack: _Optional[str] = ..., scope: _Optional[_Union[_sale_monitor_pb2.SaleScope, _Mapping]] = ...) -> None: ...

class ArmFunnel(_message.Message):
    __slots__ = ("arm_id", "targeted", "delivered", "claimed", "redeemed", "orders", "revenue_fen", "coupon_cost_fen", "roi", "conversion_rate", "uplift_vs_holdout", "p_value", "converters", "refunded_orders", "revenue_per_member_fen", "conversion_difference", "revenue_difference", "revenue_p_value", "incremental_roi", "cuped_revenue_difference", "cuped_conversion_difference", "cuped_variance_reduction", "sequential_conversion_difference", "sequential_revenue_difference", "adjusted_p_value", "viewed", "clicked", "added_to_cart", "ordered")
    ARM_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETED_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    REDEEMED_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    REVENUE_FEN_FIELD_NUMBER: _ClassVar[int]
    COUPON_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    ROI_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_RATE_FIELD_NUMBER: _ClassVar[int]
    UPLIFT_VS_HOLDOUT_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    CONVERTERS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_ORDERS_FIELD_NUMBER: _ClassVar[int]
    REVENUE_PER_MEMBER_FEN_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    REVENUE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    REVENUE_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    INCREMENTAL_ROI_FIELD_NUMBER: _ClassVar[int]
    CUPED_REVENUE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CUPED_CONVERSION_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    CUPED_VARIANCE_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_CONVERSION_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_REVENUE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_P_VALUE_FIELD_NUMBER: _ClassVar[int]
    VIEWED_FIELD_NUMBER: _ClassVar[int]
    CLICKED_FIELD_NUMBER: _ClassVar[int]
    ADDED_TO_CART_FIELD_NUMBER: _ClassVar[int]
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    arm_id: str
    targeted: int
    delivered: int
    claimed: int
    redeemed: int
    orders: int
    revenue_fen: int
    coupon_cost_fen: int
    roi: float
    conversion_rate: float
    uplift_vs_holdout: float
    p_value: float
    converters: int
    refunded_orders: int
    revenue_per_member_fen: float
    conversion_difference: Estimate
    revenue_difference: Estimate
    revenue_p_value: float
    incremental_roi: Estimate
    cuped_revenue_difference: Estimate
    cuped_conversion_difference: Estimate
    cuped_variance_reduction: float
    sequential_conversion_difference: Estimate
    sequential_revenue_difference: Estimate
    adjusted_p_value: float
    viewed: int
    clicked: int
    added_to_cart: int
    ordered: int
    def __init__(self, arm_id: _Optional[str] = ..., targeted: _Optional[int] = ..., delivered: _Optional[int] = ..., claimed: _Optional[int] = ..., redeemed: _Optional[int] = ..., orders: _Optional[int] = ..., revenue_fen: _Optional[int] = ..., coupon_cost_fen: _Optional[int] = ..., roi: _Optional[float] = ..., conversion_rate: _Optional[float] = ..., uplift_vs_holdout: _Optional[float] = ..., p_value: _Optional[float] = ..., converters: _Optional[int] = ..., refunded_orders: _Optional[int] = ..., revenue_per_member_fen: _Optional[float] = ..., conversion_difference: _Optional[_Union[Estimate, _Mapping]] = ..., revenue_difference: _Optional[_Union[Estimate, _Mapping]] = ..., revenue_p_value: _Optional[float] = ..., incremental_roi: _Optional[_Union[Estimate, _Mapping]] = ..., cuped_revenue_difference: _Optional[_Union[Estimate, _Mapping]] = ..., cuped_conversion_difference: _Optional[_Union[Estimate, _Mapping]] = ..., cuped_variance_reduction: _Optional[float] = ..., sequential_conversion_difference: _Optional[_Union[Estimate, _Mapping]] = ..., sequential_revenue_difference: _Optional[_Union[Estimate, _Mapping]] = ..., adjusted_p_value: _Optional[float] = ..., viewed: _Optional[int] = ..., clicked: _Optional[int] = ..., added_to_cart: _Optional[int] = ..., ordered: _Optional[int] = ...) -> None: ...

class Estimate(_message.Message):
    __slots__ = ("value", "low", "high")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    value: float
    low: float
    high: float
    def __init__(self, value: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class SampleRatioCheck(_message.Message):
    __slots__ = ("chi_square", "p_value", "mismatch")
    CHI_SQUARE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    chi_square: float
    p_value: float
    mismatch: bool
    def __init__(self, chi_square: _Optional[float] = ..., p_value: _Optional[float] = ..., mismatch: _Optional[bool] = ...) -> None: ...

class CampaignReport(_message.Message):
    __slots__ = ("campaign", "arms", "revenue_fen", "coupon_cost_fen", "projected_loss_fen", "rule_firings", "sample_ratio", "attributed_through", "attribution_window", "minimum_detectable_effect", "covariate_window", "economics")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    REVENUE_FEN_FIELD_NUMBER: _ClassVar[int]
    COUPON_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_LOSS_FEN_FIELD_NUMBER: _ClassVar[int]
    RULE_FIRINGS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_DETECTABLE_EFFECT_FIELD_NUMBER: _ClassVar[int]
    COVARIATE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ECONOMICS_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    arms: _containers.RepeatedCompositeFieldContainer[ArmFunnel]
    revenue_fen: int
    coupon_cost_fen: int
    projected_loss_fen: int
    rule_firings: _containers.RepeatedCompositeFieldContainer[RuleFiring]
    sample_ratio: SampleRatioCheck
    attributed_through: _timestamp_pb2.Timestamp
    attribution_window: _duration_pb2.Duration
    minimum_detectable_effect: float
    covariate_window: _duration_pb2.Duration
    economics: ActivityEconomics
    def __init__(self, campaign: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ArmFunnel, _Mapping]]] = ..., revenue_fen: _Optional[int] = ..., coupon_cost_fen: _Optional[int] = ..., projected_loss_fen: _Optional[int] = ..., rule_firings: _Optional[_Iterable[_Union[RuleFiring, _Mapping]]] = ..., sample_ratio: _Optional[_Union[SampleRatioCheck, _Mapping]] = ..., attributed_through: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attribution_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., minimum_detectable_effect: _Optional[float] = ..., covariate_window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., economics: _Optional[_Union[ActivityEconomics, _Mapping]] = ...) -> None: ...

class ActivityEconomics(_message.Message):
    __slots__ = ("gmv_fen", "cost_of_goods_fen", "coupon_cost_fen", "margin_fen", "roi", "hook_loss_fen", "break_even_hook_loss_fen", "items", "orders_without_cost")
    GMV_FEN_FIELD_NUMBER: _ClassVar[int]
    COST_OF_GOODS_FEN_FIELD_NUMBER: _ClassVar[int]
    COUPON_COST_FEN_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FEN_FIELD_NUMBER: _ClassVar[int]
    ROI_FIELD_NUMBER: _ClassVar[int]
    HOOK_LOSS_FEN_FIELD_NUMBER: _ClassVar[int]
    BREAK_EVEN_HOOK_LOSS_FEN_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ORDERS_WITHOUT_COST_FIELD_NUMBER: _ClassVar[int]
    gmv_fen: int
    cost_of_goods_fen: int
    coupon_cost_fen: int
    margin_fen: int
    roi: float
    hook_loss_fen: int
    break_even_hook_loss_fen: int
    items: _containers.RepeatedCompositeFieldContainer[ItemEconomics]
    orders_without_cost: int
    def __init__(self, gmv_fen: _Optional[int] = ..., cost_of_goods_fen: _Optional[int] = ..., coupon_cost_fen: _Optional[int] = ..., margin_fen: _Optional[int] = ..., roi: _Optional[float] = ..., hook_loss_fen: _Optional[int] = ..., break_even_hook_loss_fen: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ItemEconomics, _Mapping]]] = ..., orders_without_cost: _Optional[int] = ...) -> None: ...

class ItemEconomics(_message.Message):
    __slots__ = ("item_id", "hook", "units", "gmv_fen", "cost_of_goods_fen", "margin_fen")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    GMV_FEN_FIELD_NUMBER: _ClassVar[int]
    COST_OF_GOODS_FEN_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FEN_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    hook: bool
    units: int
    gmv_fen: int
    cost_of_goods_fen: int
    margin_fen: int
    def __init__(self, item_id: _Optional[int] = ..., hook: _Optional[bool] = ..., units: _Optional[int] = ..., gmv_fen: _Optional[int] = ..., cost_of_goods_fen: _Optional[int] = ..., margin_fen: _Optional[int] = ...) -> None: ...

class RuleFiring(_message.Message):
    __slots__ = ("rule_id", "action", "fire_time", "metrics", "outcome")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    action: Rule.Action
    fire_time: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    outcome: str
    def __init__(self, rule_id: _Optional[str] = ..., action: _Optional[_Union[Rule.Action, str]] = ..., fire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., outcome: _Optional[str] = ...) -> None: ...
