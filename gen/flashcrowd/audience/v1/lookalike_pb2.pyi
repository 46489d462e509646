import datetime

from flashcrowd.audience.v1 import events_pb2 as _events_pb2
from flashcrowd.audience.v1 import pack_pb2 as _pack_pb2
from flashcrowd.audience.v1 import spec_pb2 as _spec_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeedWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_WEIGHTING_UNSPECIFIED: _ClassVar[SeedWeighting]
    SEED_WEIGHTING_UNIFORM: _ClassVar[SeedWeighting]
    SEED_WEIGHTING_SPEND: _ClassVar[SeedWeighting]
SEED_WEIGHTING_UNSPECIFIED: SeedWeighting
SEED_WEIGHTING_UNIFORM: SeedWeighting
SEED_WEIGHTING_SPEND: SeedWeighting

class LookalikeRefreshPolicy(_message.Message):
    __slots__ = ("interval", "ignore_seed_versions", "manual")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    IGNORE_SEED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    ignore_seed_versions: bool
    manual: bool
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ignore_seed_versions: _Optional[bool] = ..., manual: _Optional[bool] = ...) -> None: ...

class LookalikeModel(_message.Message):
    __slots__ = ("name", "algorithm", "cluster_count", "feature_schema", "feature_snapshot", "population_size", "create_time", "version", "fit_count", "cluster_rule", "feature_exclusions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_RULE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    algorithm: str
    cluster_count: int
    feature_schema: str
    feature_snapshot: str
    population_size: int
    create_time: _timestamp_pb2.Timestamp
    version: int
    fit_count: int
    cluster_rule: str
    feature_exclusions: _containers.RepeatedCompositeFieldContainer[FeatureExclusion]
    def __init__(self, name: _Optional[str] = ..., algorithm: _Optional[str] = ..., cluster_count: _Optional[int] = ..., feature_schema: _Optional[str] = ..., feature_snapshot: _Optional[str] = ..., population_size: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ..., fit_count: _Optional[int] = ..., cluster_rule: _Optional[str] = ..., feature_exclusions: _Optional[_Iterable[_Union[FeatureExclusion, _Mapping]]] = ...) -> None: ...

class FeatureExclusion(_message.Message):
    __slots__ = ("event_types", "category_ids", "item_ids")
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    event_types: _containers.RepeatedScalarFieldContainer[_events_pb2.EventType]
    category_ids: _containers.RepeatedScalarFieldContainer[int]
    item_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_types: _Optional[_Iterable[_Union[_events_pb2.EventType, str]]] = ..., category_ids: _Optional[_Iterable[int]] = ..., item_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainLookalikeModelRequest(_message.Message):
    __slots__ = ("model_id", "cluster_count", "as_of", "feature_exclusions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_COUNT_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    cluster_count: int
    as_of: _timestamp_pb2.Timestamp
    feature_exclusions: _containers.RepeatedCompositeFieldContainer[FeatureExclusion]
    def __init__(self, model_id: _Optional[str] = ..., cluster_count: _Optional[int] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., feature_exclusions: _Optional[_Iterable[_Union[FeatureExclusion, _Mapping]]] = ...) -> None: ...

class TrainLookalikeModelMetadata(_message.Message):
    __slots__ = ("model", "stage", "progress_percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    stage: str
    progress_percent: float
    def __init__(self, model: _Optional[str] = ..., stage: _Optional[str] = ..., progress_percent: _Optional[float] = ...) -> None: ...

class GetLookalikeModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExpandLookalikeRequest(_message.Message):
    __slots__ = ("parent", "seed_pack", "model", "reach_fraction", "reach_size", "pack_id", "include_seed", "exclude_packs", "profile", "model_version", "refresh_model", "feature_exclusions", "min_seed_size", "negative_seed_packs", "seed_weighting", "refresh_policy")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SEED_PACK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REACH_FRACTION_FIELD_NUMBER: _ClassVar[int]
    REACH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEED_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PACKS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFRESH_MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEED_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SEED_PACKS_FIELD_NUMBER: _ClassVar[int]
    SEED_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    REFRESH_POLICY_FIELD_NUMBER: _ClassVar[int]
    parent: str
    seed_pack: str
    model: str
    reach_fraction: float
    reach_size: int
    pack_id: str
    include_seed: bool
    exclude_packs: _containers.RepeatedScalarFieldContainer[str]
    profile: _spec_pb2.ProfileFilter
    model_version: int
    refresh_model: bool
    feature_exclusions: _containers.RepeatedCompositeFieldContainer[FeatureExclusion]
    min_seed_size: int
    negative_seed_packs: _containers.RepeatedScalarFieldContainer[str]
    seed_weighting: SeedWeighting
    refresh_policy: LookalikeRefreshPolicy
    def __init__(self, parent: _Optional[str] = ..., seed_pack: _Optional[str] = ..., model: _Optional[str] = ..., reach_fraction: _Optional[float] = ..., reach_size: _Optional[int] = ..., pack_id: _Optional[str] = ..., include_seed: _Optional[bool] = ..., exclude_packs: _Optional[_Iterable[str]] = ..., profile: _Optional[_Union[_spec_pb2.ProfileFilter, _Mapping]] = ..., model_version: _Optional[int] = ..., refresh_model: _Optional[bool] = ..., feature_exclusions: _Optional[_Iterable[_Union[FeatureExclusion, _Mapping]]] = ..., min_seed_size: _Optional[int] = ..., negative_seed_packs: _Optional[_Iterable[str]] = ..., seed_weighting: _Optional[_Union[SeedWeighting, str]] = ..., refresh_policy: _Optional[_Union[LookalikeRefreshPolicy, _Mapping]] = ...) -> None: ...

class LiftStep(_message.Message):
    __slots__ = ("reach_fraction", "size", "expected_lift", "expected_lift_low", "expected_lift_high", "withheld_reason", "requested")
    REACH_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LIFT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LIFT_LOW_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LIFT_HIGH_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    reach_fraction: float
    size: int
    expected_lift: float
    expected_lift_low: float
    expected_lift_high: float
    withheld_reason: str
    requested: bool
    def __init__(self, reach_fraction: _Optional[float] = ..., size: _Optional[int] = ..., expected_lift: _Optional[float] = ..., expected_lift_low: _Optional[float] = ..., expected_lift_high: _Optional[float] = ..., withheld_reason: _Optional[str] = ..., requested: _Optional[bool] = ...) -> None: ...

class RankingBlend(_message.Message):
    __slots__ = ("cluster_weight", "classifier_weight", "activity_weight", "rule")
    CLUSTER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    cluster_weight: float
    classifier_weight: float
    activity_weight: float
    rule: str
    def __init__(self, cluster_weight: _Optional[float] = ..., classifier_weight: _Optional[float] = ..., activity_weight: _Optional[float] = ..., rule: _Optional[str] = ...) -> None: ...

class LookalikeTier(_message.Message):
    __slots__ = ("start_fraction", "end_fraction", "size")
    START_FRACTION_FIELD_NUMBER: _ClassVar[int]
    END_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start_fraction: float
    end_fraction: float
    size: int
    def __init__(self, start_fraction: _Optional[float] = ..., end_fraction: _Optional[float] = ..., size: _Optional[int] = ...) -> None: ...

class ExpandLookalikeResponse(_message.Message):
    __slots__ = ("pack", "seed_matched", "clusters_covered", "seed_concentration", "lift_curve", "model", "model_version", "heldout_auc", "blend", "feature_exclusions", "tiers", "min_seed_size", "negative_matched", "seed_weighting", "seed_pack_version", "next_refresh_time")
    PACK_FIELD_NUMBER: _ClassVar[int]
    SEED_MATCHED_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_COVERED_FIELD_NUMBER: _ClassVar[int]
    SEED_CONCENTRATION_FIELD_NUMBER: _ClassVar[int]
    LIFT_CURVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_AUC_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEED_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_MATCHED_FIELD_NUMBER: _ClassVar[int]
    SEED_WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    SEED_PACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_TIME_FIELD_NUMBER: _ClassVar[int]
    pack: _pack_pb2.Pack
    seed_matched: int
    clusters_covered: int
    seed_concentration: float
    lift_curve: _containers.RepeatedCompositeFieldContainer[LiftStep]
    model: str
    model_version: int
    heldout_auc: float
    blend: RankingBlend
    feature_exclusions: _containers.RepeatedCompositeFieldContainer[FeatureExclusion]
    tiers: _containers.RepeatedCompositeFieldContainer[LookalikeTier]
    min_seed_size: int
    negative_matched: int
    seed_weighting: SeedWeighting
    seed_pack_version: int
    next_refresh_time: _timestamp_pb2.Timestamp
    def __init__(self, pack: _Optional[_Union[_pack_pb2.Pack, _Mapping]] = ..., seed_matched: _Optional[int] = ..., clusters_covered: _Optional[int] = ..., seed_concentration: _Optional[float] = ..., lift_curve: _Optional[_Iterable[_Union[LiftStep, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[int] = ..., heldout_auc: _Optional[float] = ..., blend: _Optional[_Union[RankingBlend, _Mapping]] = ..., feature_exclusions: _Optional[_Iterable[_Union[FeatureExclusion, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[LookalikeTier, _Mapping]]] = ..., min_seed_size: _Optional[int] = ..., negative_matched: _Optional[int] = ..., seed_weighting: _Optional[_Union[SeedWeighting, str]] = ..., seed_pack_version: _Optional[int] = ..., next_refresh_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportLookalikeScoresRequest(_message.Message):
    __slots__ = ("name", "version", "page_size", "max_tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    page_size: int
    max_tier: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., page_size: _Optional[int] = ..., max_tier: _Optional[int] = ...) -> None: ...

class ScoredMember(_message.Message):
    __slots__ = ("user_id", "rank", "tier", "score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    rank: int
    tier: int
    score: float
    def __init__(self, user_id: _Optional[int] = ..., rank: _Optional[int] = ..., tier: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class ExportLookalikeScoresResponse(_message.Message):
    __slots__ = ("members", "version", "tiers", "exported", "total")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[ScoredMember]
    version: int
    tiers: _containers.RepeatedCompositeFieldContainer[LookalikeTier]
    exported: int
    total: int
    def __init__(self, members: _Optional[_Iterable[_Union[ScoredMember, _Mapping]]] = ..., version: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[LookalikeTier, _Mapping]]] = ..., exported: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...
