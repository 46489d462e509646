"""Conversions between the lookalike protos and the domain: feature exclusions, models, responses.

Invariants: an invalid ``FeatureExclusion`` message is reported as field violations
(``feature_exclusions[i].event_types[j]``...), never silently dropped; a response's withheld lift
step carries ``expected_lift = 0`` and its reason; nan figures are sent as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from flashcrowd.audience.v1 import events_pb2, lookalike_pb2, pack_pb2
from google.protobuf import timestamp_pb2

from services.audience.lookalike.exclusion import ExclusionRule, FeatureExclusion
from services.audience.lookalike.expand import ExpandResult
from services.audience.lookalike.model import LookalikeModel
from services.events.schema import EventType

__all__ = [
    "WEIGHTING_NAMES",
    "exclusion_from_proto",
    "exclusion_to_proto",
    "model_proto",
    "response_proto",
    "tiers_proto",
]

_EVENT_TYPES = {int(e) for e in EventType}


def exclusion_from_proto(
    messages: Sequence[lookalike_pb2.FeatureExclusion], field: str = "feature_exclusions"
) -> tuple[FeatureExclusion, list[tuple[str, str]]]:
    """The domain exclusion and the violations of ``messages`` (empty when valid)."""
    rules, problems = [], []
    for i, m in enumerate(messages):
        path = f"{field}[{i}]"
        bad = [j for j, t in enumerate(m.event_types) if int(t) not in _EVENT_TYPES]
        problems += [(f"{path}.event_types[{j}]", "unknown or unspecified event type") for j in bad]
        if not (m.event_types or m.category_ids or m.item_ids):
            problems.append(
                (path, "set event_types, category_ids or item_ids (an empty rule excludes everything)")
            )
        if not bad and (m.event_types or m.category_ids or m.item_ids):
            rules.append(ExclusionRule(tuple(m.event_types), tuple(m.category_ids), tuple(m.item_ids)))
    return FeatureExclusion(tuple(rules)), problems


def exclusion_to_proto(exclusion: FeatureExclusion) -> list[lookalike_pb2.FeatureExclusion]:
    return [
        lookalike_pb2.FeatureExclusion(
            event_types=[cast(events_pb2.EventType, t) for t in r.event_types],
            category_ids=list(r.category_ids),
            item_ids=list(r.item_ids),
        )
        for r in exclusion.rules
    ]


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment.astimezone(UTC))
    return out


def model_proto(model: LookalikeModel) -> lookalike_pb2.LookalikeModel:
    return lookalike_pb2.LookalikeModel(
        name=model.name,
        algorithm=str(model.manifest.get("algorithm", "")),
        cluster_count=model.cluster_count,
        feature_schema=model.feature_schema,
        feature_snapshot=model.feature_snapshot,
        population_size=model.population,
        create_time=_ts(model.created),
        version=model.version,
        fit_count=model.fits,
        cluster_rule=str(model.manifest.get("cluster_rule", "fixed")),
        feature_exclusions=exclusion_to_proto(model.exclusion),
    )


def _finite(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


_WEIGHTINGS = {"uniform": lookalike_pb2.SEED_WEIGHTING_UNIFORM, "spend": lookalike_pb2.SEED_WEIGHTING_SPEND}
#: proto enum -> the domain's name (unspecified = uniform)
WEIGHTING_NAMES = {
    lookalike_pb2.SEED_WEIGHTING_UNSPECIFIED: "uniform",
    lookalike_pb2.SEED_WEIGHTING_UNIFORM: "uniform",
    lookalike_pb2.SEED_WEIGHTING_SPEND: "spend",
}


def response_proto(
    stored: pack_pb2.Pack,
    result: ExpandResult,
    model: LookalikeModel,
    exclusion: FeatureExclusion,
    *,
    min_seed: int = 0,
    seed_weighting: str = "uniform",
    seed_version: int = 0,
    next_refresh: str | None = None,
) -> lookalike_pb2.ExpandLookalikeResponse:
    weights = result.blend
    out = lookalike_pb2.ExpandLookalikeResponse(
        min_seed_size=min_seed,
        negative_matched=result.negative_matched,
        seed_weighting=_WEIGHTINGS.get(seed_weighting, lookalike_pb2.SEED_WEIGHTING_UNIFORM),
        seed_pack_version=seed_version,
        pack=stored,
        seed_matched=result.seed_matched,
        clusters_covered=result.clusters_covered,
        seed_concentration=result.seed_concentration,
        lift_curve=[
            lookalike_pb2.LiftStep(
                reach_fraction=s.reach_fraction,
                size=s.size,
                expected_lift=_finite(s.lift) if not s.withheld else 0.0,
                expected_lift_low=_finite(s.low) if not s.withheld else 0.0,
                expected_lift_high=_finite(s.high) if not s.withheld else 0.0,
                withheld_reason=s.withheld,
                requested=s.requested,
            )
            for s in result.lift_curve
        ],
        model=model.name,
        model_version=model.version,
        heldout_auc=_finite(result.heldout_auc),
        blend=lookalike_pb2.RankingBlend(
            cluster_weight=weights.get("cluster", 0.0),
            classifier_weight=weights.get("classifier", 0.0),
            activity_weight=weights.get("activity", 0.0),
            rule=result.blend_rule,
        ),
        feature_exclusions=exclusion_to_proto(exclusion),
        tiers=[
            lookalike_pb2.LookalikeTier(
                start_fraction=t.start_fraction, end_fraction=t.end_fraction, size=t.size
            )
            for t in result.tiers
        ],
    )
    if next_refresh:
        out.next_refresh_time.FromDatetime(datetime.fromisoformat(next_refresh.replace("Z", "+00:00")))
    return out


def tiers_proto(tiers: Sequence[dict[str, float | int]]) -> list[lookalike_pb2.LookalikeTier]:
    """Tiers as recorded (``Tier.to_json``) -> messages."""
    return [
        lookalike_pb2.LookalikeTier(
            start_fraction=float(t["start_fraction"]),
            end_fraction=float(t["end_fraction"]),
            size=int(t["size"]),
        )
        for t in tiers
    ]
