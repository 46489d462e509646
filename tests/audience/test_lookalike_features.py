"""Lookalike features: every column against an independent per-user computation, shard invariance,
the group standardisation, and snapshots in both stores (publish, reload, reuse, fingerprint)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from flashcrowd.audience.v1 import events_pb2, spec_pb2

from services.audience.lookalike.exclusion import ExclusionRule, FeatureExclusion
from services.audience.lookalike.features import (
    CLIP,
    FeatureSchema,
    FeatureSnapshot,
    FrameSource,
    activity_from_raw,
    build_snapshot,
    compute_shard_features,
    pick_categories,
)
from services.events.schema import AGE_BAND_NAMES, EVENT_TYPE_NAMES, GENDER_NAMES, INTEREST_TAGS, REGIONS
from services.storage import ObjectStore
from tests.audience.conftest import World

DAY = 86_400.0


def reference_features(
    events: list[dict], profiles: dict[int, dict], schema: FeatureSchema, as_of: datetime, horizon: float
) -> dict[int, dict[str, float]]:
    """Plain-Python features, written from the module doc without looking at the polars code."""
    by_user: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e["ts"] < as_of:
            by_user[e["user_id"]].append(e)
    out = {}
    for user in sorted(set(by_user) | set(profiles)):
        evs = by_user.get(user, [])
        n = {name: sum(1 for e in evs if e["event_type"] == code) for code, name in EVENT_TYPE_NAMES.items()}
        total = len(evs)
        days = len({e["ts"].date() for e in evs})

        def since(ts: list[datetime]) -> float:
            if not ts:
                return math.log1p(horizon + 1)
            return math.log1p(min(max((as_of - max(ts)).total_seconds() / DAY, 0), horizon + 1))

        paid = sum(e["amount_fen"] or 0 for e in evs if e["event_type"] == 8) / 100
        refunded = sum(e["amount_fen"] or 0 for e in evs if e["event_type"] == 9) / 100
        f = {f"ev_{name}": math.log1p(count) for name, count in n.items()}
        f["rec_last_days"] = since([e["ts"] for e in evs])
        f["rec_pay_days"] = since([e["ts"] for e in evs if e["event_type"] == 8])
        f["freq_active_days"] = math.log1p(days)
        f["freq_events_per_day"] = math.log1p(total / days) if days else 0.0
        f["mon_paid"] = math.log1p(paid)
        f["mon_aov"] = math.log1p(paid / n["pay"]) if n["pay"] else 0.0
        f["mon_refund_share"] = min(refunded / paid, 1.0) if paid else 0.0
        f["eng_video_finish_rate"] = min(n["video_finish"] / n["video_play"], 1) if n["video_play"] else 0.0
        f["eng_video_share"] = (n["video_play"] + n["video_finish"]) / total if total else 0.0
        f["eng_live_share"] = n["live_enter"] / total if total else 0.0
        f["conv_click_per_view"] = min(n["click"] / n["product_view"], 1) if n["product_view"] else 0.0
        f["conv_cart_per_view"] = min(n["add_cart"] / n["product_view"], 1) if n["product_view"] else 0.0
        f["conv_pay_per_cart"] = min(n["pay"] / n["add_cart"], 1) if n["add_cart"] else 0.0
        tagged = [e["category_id"] for e in evs if e["category_id"] is not None]
        for c in schema.categories:
            f[f"cat_{c}"] = tagged.count(c) / len(tagged) if tagged else 0.0
        f["cat_other"] = sum(1 for c in tagged if c not in schema.categories) / len(tagged) if tagged else 0.0
        p = profiles.get(user, {})
        for code, name in AGE_BAND_NAMES.items():
            f[f"age_{name}"] = float((p.get("age_band") or 0) == code)
        for code, name in GENDER_NAMES.items():
            f[f"gender_{name}"] = float((p.get("gender") or 0) == code)
        for r in REGIONS:
            f[f"region_{r}"] = float(p.get("region") == r)
        f["region_unknown"] = float(p.get("region") not in REGIONS)
        for tag in INTEREST_TAGS:
            f[f"interest_{tag}"] = float(tag in (p.get("interests") or []))
        out[user] = f
    return out


def _check(frame: pl.DataFrame, expected: dict[int, dict[str, float]], schema: FeatureSchema) -> None:
    assert frame["user_id"].to_list() == sorted(expected)
    assert frame.columns == ["user_id", *schema.columns]
    for row in frame.iter_rows(named=True):
        want = expected[row["user_id"]]
        for column in schema.columns:
            assert row[column] == pytest.approx(want[column], abs=1e-5), (row["user_id"], column)


def ev(user: int, day: float, etype: int, cat: int | None = None, amount: int | None = None) -> dict:
    return {
        "event_id": None,
        "user_id": user,
        "ts": datetime(2025, 6, 1, tzinfo=UTC) + timedelta(days=day),
        "event_type": etype,
        "item_id": None,
        "category_id": cat,
        "campaign_id": None,
        "video_id": None,
        "order_id": None,
        "amount_fen": amount,
    }


def test_tiny_world_matches_reference() -> None:
    events = [
        ev(1, 0.1, 4, 10), ev(1, 0.2, 5, 10), ev(1, 0.3, 6, 10), ev(1, 0.4, 7, 10, 5000),
        ev(1, 0.4, 8, 10, 5000), ev(1, 2.5, 9, 10, 2000), ev(1, 2.6, 1), ev(1, 2.7, 2),
        ev(2, 1.0, 4, 20), ev(2, 1.5, 4, 30), ev(2, 3.2, 3), ev(2, 3.3, 10),
        ev(3, 0.0, 1), ev(3, 0.5, 1), ev(3, 0.6, 2), ev(3, 5.0, 8, 20, 900),  # the pay is after as_of
        ev(5, 4.0, 4, 10),  # after as_of only and no profile: not in the population
    ]  # fmt: skip
    profiles = {
        1: {"user_id": 1, "age_band": 3, "gender": 1, "region": "CN-GD", "interests": ["apparel", "deals"]},
        4: {"user_id": 4, "age_band": 7, "gender": 2, "region": None, "interests": []},  # profile only
    }
    frame_events = pl.DataFrame(events).with_columns(
        pl.col("user_id").cast(pl.UInt32),
        pl.col("event_type").cast(pl.UInt8),
        pl.col("category_id").cast(pl.UInt32),
        pl.col("amount_fen").cast(pl.Int64),
    )
    frame_profiles = pl.DataFrame(list(profiles.values())).with_columns(
        pl.col("user_id").cast(pl.UInt32), pl.col("age_band").cast(pl.UInt8), pl.col("gender").cast(pl.UInt8)
    )
    as_of = datetime(2025, 6, 5, tzinfo=UTC)
    categories = pick_categories(frame_events.lazy(), as_of, 2)
    assert categories == (10, 20)  # 10: 7 events; 20, 30: one each -> the tie goes to the lower id
    schema = FeatureSchema(categories=categories)
    frame = compute_shard_features(
        frame_events.lazy(), frame_profiles.lazy(), schema, as_of=as_of, horizon_days=4.0
    )
    _check(frame, reference_features(events, profiles, schema, as_of, 4.0), schema)
    one = frame.filter(pl.col("user_id") == 1).row(0, named=True)
    assert one["mon_refund_share"] == pytest.approx(0.4)
    assert one["cat_10"] == pytest.approx(1.0) and one["cat_other"] == 0.0


def test_generated_world_matches_reference(world: World) -> None:
    as_of = world.dataset.end - timedelta(hours=12)
    schema = FeatureSchema(categories=pick_categories(world.dataset.scan_events(), as_of, 8))
    frame = compute_shard_features(
        world.dataset.scan_events(), world.dataset.scan_profiles(), schema, as_of=as_of, horizon_days=2.5
    )
    assert frame.height == world.profiles.height  # everybody has a profile in the generated world
    sample = set(np.random.default_rng(0).choice(frame["user_id"].to_numpy(), 60, replace=False).tolist())
    events = world.events.filter(pl.col("user_id").is_in(sorted(sample))).to_dicts()
    profiles = {
        p["user_id"]: p for p in world.profiles.filter(pl.col("user_id").is_in(sorted(sample))).to_dicts()
    }
    _check(
        frame.filter(pl.col("user_id").is_in(sorted(sample))),
        reference_features(events, profiles, schema, as_of, 2.5),
        schema,
    )


def test_snapshot_shards_scaler_and_reload(any_store: ObjectStore, world: World) -> None:
    source = world.dataset
    as_of = world.dataset.end
    one = build_snapshot(any_store, source, as_of=as_of, shards=1, snapshot_id="one")
    four = build_snapshot(any_store, source, as_of=as_of, shards=4, snapshot_id="four", schema=one.schema)
    assert one.fingerprint == four.fingerprint and four.population == one.population == 5_000
    assert len(four.shard_keys()) == 4
    ids1, raw1 = one.load_all()
    ids4, raw4 = four.load_all()
    order1, order4 = np.argsort(ids1), np.argsort(ids4)
    assert np.array_equal(ids1[order1], ids4[order4])
    assert np.allclose(raw1[order1], raw4[order4], atol=1e-6)
    assert np.allclose(one.scaler.mean, four.scaler.mean) and np.allclose(one.scaler.scale, four.scaler.scale)

    # Standardised: numeric columns have unit variance (or are constant), one-hot groups total their weight.
    z = one.scaler.transform(raw1)
    assert np.abs(z).max() <= CLIP
    var = ((raw1 - one.scaler.mean) / one.scaler.scale).var(axis=0)  # before clipping
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_col, group) in enumerate(one.schema.column_groups()):
        groups[group].append(i)
    for i in groups["numeric"]:
        assert var[i] == pytest.approx(1.0, abs=0.05) or var[i] < 1e-9
    for group, idx in groups.items():
        if group != "numeric" and var[idx].sum() > 1e-9:
            assert var[idx].sum() == pytest.approx(one.schema.weight(group), rel=0.05), group

    # Reload from the store; the default id is derived from the inputs, so a rebuild reuses it.
    again = FeatureSnapshot.load(any_store, "lookalike/", "one")
    assert again.fingerprint == one.fingerprint and again.population == one.population
    auto = build_snapshot(any_store, source, as_of=as_of, dataset={"version": 1})
    reused = build_snapshot(any_store, source, as_of=as_of, dataset={"version": 1})
    assert (
        reused.snapshot_id == auto.snapshot_id
        and reused.manifest["published_at"] == auto.manifest["published_at"]
    )


def test_fingerprint_is_the_schema() -> None:
    a, b = FeatureSchema(categories=(1, 2, 3)), FeatureSchema(categories=(1, 2, 3))
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    assert FeatureSchema(categories=(1, 2, 4)).fingerprint != a.fingerprint
    heavier = FeatureSchema(categories=(1, 2, 3), group_weights=(("category", 8.0),))
    assert heavier.fingerprint != a.fingerprint
    assert FeatureSchema.from_json(a.to_json()) == a


def test_frame_source_shards() -> None:
    events = pl.DataFrame([ev(u, 0.5, 4, 1) for u in range(1, 200)]).with_columns(
        pl.col("user_id").cast(pl.UInt32),
        pl.col("event_type").cast(pl.UInt8),
        pl.col("category_id").cast(pl.UInt32),
    )
    src = FrameSource(events)
    from services.events.sharding import Shard

    parts = [src.scan_events(shard=s).collect()["user_id"].to_list() for s in Shard.all(3)]
    assert sorted(u for p in parts for u in p) == list(range(1, 200))


# --- feature exclusions ------------------------------------------------------------------------------


def test_exclusion_rules_normalise_and_match() -> None:
    a = FeatureExclusion((ExclusionRule((8, 9, 8)), ExclusionRule(category_ids=(7,))))
    b = FeatureExclusion((ExclusionRule(category_ids=(7, 7)), ExclusionRule((9, 8))))
    assert a == b and a.key == b.key and a.key.startswith("x") and FeatureExclusion().key == ""
    assert FeatureExclusion.from_json(a.to_json()) == a
    assert a.union(FeatureExclusion((ExclusionRule((8, 9)),))) == a  # union never duplicates a rule
    assert a.describe() == "categories 7; pay/refund"
    with pytest.raises(ValueError, match="needs event types"):
        ExclusionRule()
    with pytest.raises(ValueError, match="unknown event types"):
        ExclusionRule((42,))
    frame = pl.DataFrame(
        {
            "event_type": [8, 8, 4, 4, 6],
            "category_id": [7, 1, 7, None, 1],
            "item_id": [1, 2, 3, 4, 5],
        },
        schema={"event_type": pl.UInt8, "category_id": pl.UInt32, "item_id": pl.UInt32},
    )
    both = FeatureExclusion((ExclusionRule((8,), (7,)),))  # payments in category 7 only
    kept = both.apply(frame.lazy()).collect()["item_id"].to_list()
    assert kept == [2, 3, 4, 5]  # an event without a category never matches a category rule
    items = FeatureExclusion((ExclusionRule(item_ids=(5,)), ExclusionRule(category_ids=(7,))))
    assert items.apply(frame.lazy()).collect()["item_id"].to_list() == [2, 4]


def test_snapshot_without_a_category(any_store: ObjectStore, world: World) -> None:
    """Every event of the category is gone before anything is computed; the schema stays the model's."""
    as_of = world.dataset.end
    base = build_snapshot(any_store, world.dataset, as_of=as_of, dataset={"version": 1})
    category = base.schema.categories[0]
    rule = FeatureExclusion((ExclusionRule(category_ids=(category,)),))
    excluded = build_snapshot(
        any_store, world.dataset, as_of=as_of, schema=base.schema, dataset={"version": 1}, exclusion=rule
    )
    assert excluded.snapshot_id == f"{base.snapshot_id}-{rule.key}" and excluded.exclusion == rule
    assert excluded.fingerprint == base.fingerprint and excluded.population == base.population
    again = build_snapshot(
        any_store, world.dataset, as_of=as_of, schema=base.schema, dataset={"version": 1}, exclusion=rule
    )
    assert again.manifest["published_at"] == excluded.manifest["published_at"]  # reused
    ids, raw = excluded.load_all()
    cols = excluded.schema.columns
    assert np.all(raw[:, cols.index(f"cat_{category}")] == 0)
    # Events per user dropped by exactly that category's events (the activity the rankings see).
    base_ids, base_raw = base.load_all()
    assert np.array_equal(ids, base_ids)
    dropped = (
        world.events.filter((pl.col("category_id") == category) & (pl.col("ts") < as_of))
        .group_by("user_id")
        .len()
    )
    expected = dict(zip(dropped["user_id"].to_list(), dropped["len"].to_list(), strict=True))
    diff = activity_from_raw(base.schema, base_raw) - activity_from_raw(excluded.schema, raw)
    assert diff.tolist() == [float(expected.get(int(u), 0)) for u in ids]
    with pytest.raises(FileExistsError, match="another exclusion"):
        build_snapshot(any_store, world.dataset, as_of=as_of, snapshot_id=excluded.snapshot_id)


def test_exclusion_from_a_seed_spec() -> None:
    from google.protobuf import duration_pb2

    from services.events.schema import EventType as E

    window = spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=86_400))
    purchasers = spec_pb2.PackSpec(
        shortcut=spec_pb2.Shortcut(kind=spec_pb2.Shortcut.KIND_PURCHASERS, window=window)
    )
    got = FeatureExclusion.from_seed_spec(purchasers)
    assert got == FeatureExclusion((ExclusionRule((int(E.ORDER), int(E.PAY), int(E.REFUND))),))
    clicked_not_paid = spec_pb2.PackSpec(
        exclude=spec_pb2.ExcludeOperands(
            base=spec_pb2.PackSpec(
                behavior=spec_pb2.BehaviorCondition(
                    event_types=[events_pb2.EVENT_TYPE_CLICK],
                    window=window,
                    filter=spec_pb2.EventFilter(category_ids=[7], campaign_ids=[3]),  # campaign: widened
                )
            ),
            subtract=[spec_pb2.PackSpec(behavior=spec_pb2.BehaviorCondition(
                event_types=[events_pb2.EVENT_TYPE_PAY], window=window))],
        )
    )  # fmt: skip
    rules = FeatureExclusion.from_seed_spec(clicked_not_paid).rules
    # Filtered to category 7: every event of the category goes (as the evaluation removes a target).
    assert set(rules) == {ExclusionRule(category_ids=(7,)), ExclusionRule((int(E.ORDER), int(E.PAY)))}
    upload_like = spec_pb2.PackSpec(profile=spec_pb2.ProfileFilter(genders=[spec_pb2.GENDER_FEMALE]))
    assert not FeatureExclusion.from_seed_spec(upload_like) and not FeatureExclusion.from_seed_spec(None)
