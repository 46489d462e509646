"""User feature snapshots for lookalike models, built with polars one user shard at a time.

A snapshot is one row per user of the population (everyone with a profile or an event before
``as_of``) and a fixed list of float32 columns:

=================  =====================================================================================
family             columns
=================  =====================================================================================
event types        ``ev_<type>``: log1p(count) of each of the 12 event types
categories         ``cat_<id>``: share of the user's category-tagged events in each of the top-K
                   categories of the population (by events), ``cat_other`` for the rest
recency            ``rec_last_days`` / ``rec_pay_days``: log1p(days since the last event / payment);
                   never = the whole observed horizon + 1 day
frequency          ``freq_active_days`` (log1p distinct UTC days), ``freq_events_per_day``
monetary           ``mon_paid`` (log1p yuan paid), ``mon_aov`` (log1p yuan per payment), ``mon_refund_share``
engagement         ``eng_video_finish_rate``, ``eng_video_share``, ``eng_live_share``
funnel             ``conv_click_per_view``, ``conv_cart_per_view``, ``conv_pay_per_cart``
profile one-hots   ``age_<band>``, ``gender_<g>``, ``region_<code>`` (+ ``region_unknown``),
                   ``interest_<tag>``
=================  =====================================================================================

Standardisation (``Scaler``): numeric columns are z-scored one by one; a one-hot (or share) group is
centred and every column of it divided by the same factor so that the *group* has total variance
equal to its weight. Z-scoring each one-hot column on its own would give a user of a rare region a
value of ~20 and let that one bit dominate every distance; the group rule makes "other region" worth
a fixed distance whatever the region, and the weights say how much taste (categories) or
demography counts next to one behaviour column. Values are clipped to ``[-CLIP, CLIP]``.

The column list, the category vocabulary, the group weights and ``FEATURE_VERSION`` are the
*feature schema*; its SHA-256 fingerprint is stored with the snapshot and with every model trained
on it, so that a model is never applied to columns it was not trained on.

An optional ``FeatureExclusion`` (``exclusion.py``) drops events before anything is computed
(types, categories, items: the behaviour a seed or an evaluation target is defined by). It is part
of the snapshot's identity (id suffix, manifest) but not of its schema: the columns are the same,
so a model scores snapshots built with or without it.

Building is chunked by user shard (``services.events.sharding``): a global pass picks the category
vocabulary, then each shard's events are aggregated and written as one Parquet file, and running
sums give the scaler. Memory is bounded by one shard's events; the manifest is published last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from services.audience.lookalike.exclusion import FeatureExclusion
from services.events.schema import (
    AGE_BAND_NAMES,
    EVENT_TYPE_NAMES,
    GENDER_NAMES,
    INTEREST_TAGS,
    REGIONS,
    EventType,
)
from services.events.sharding import Shard
from services.storage import ObjectNotFound, ObjectStore, publish, read_manifest

log = logging.getLogger(__name__)

__all__ = [
    "CLIP",
    "DEFAULT_GROUP_WEIGHTS",
    "FEATURE_VERSION",
    "FeatureSchema",
    "FeatureSnapshot",
    "FeatureSource",
    "FrameSource",
    "Scaler",
    "activity_from_raw",
    "build_snapshot",
    "compute_shard_features",
    "default_shard_count",
    "pick_categories",
]

#: Bump when the meaning of any column changes: models of another version are refused.
FEATURE_VERSION = 1
#: Standardised values are clipped to this many standard deviations.
CLIP = 6.0
#: Total variance of each one-hot/share group after standardisation (a numeric column has 1).
DEFAULT_GROUP_WEIGHTS: dict[str, float] = {
    "category": 4.0,
    "age": 1.0,
    "gender": 1.0,
    "region": 1.0,
    "interest": 2.0,
}
FORMAT = "flashcrowd.lookalike.features/v1"
_DAY_US = 86_400 * 1_000_000
_PAY = int(EventType.PAY)
_REFUND = int(EventType.REFUND)

NUMERIC_COLUMNS: tuple[str, ...] = (
    *(f"ev_{name}" for _code, name in sorted(EVENT_TYPE_NAMES.items())),
    "rec_last_days",
    "rec_pay_days",
    "freq_active_days",
    "freq_events_per_day",
    "mon_paid",
    "mon_aov",
    "mon_refund_share",
    "eng_video_finish_rate",
    "eng_video_share",
    "eng_live_share",
    "conv_click_per_view",
    "conv_cart_per_view",
    "conv_pay_per_cart",
)


class FeatureSource(Protocol):
    """Where features come from: events and profiles of one user shard, as lazy frames.

    ``services.events.EventDataset`` satisfies it; ``FrameSource`` wraps in-memory frames.
    """

    def scan_events(self, *, shard: Shard | None = None, end: datetime | None = None) -> pl.LazyFrame: ...

    def scan_profiles(self, *, shard: Shard | None = None) -> pl.LazyFrame: ...


@dataclass
class FrameSource:
    """A ``FeatureSource`` over in-memory (or lazy) frames in the events/profiles schema."""

    events: pl.DataFrame | pl.LazyFrame
    profiles: pl.DataFrame | pl.LazyFrame | None = None

    def scan_events(self, *, shard: Shard | None = None, end: datetime | None = None) -> pl.LazyFrame:
        lf = self.events.lazy()
        if end is not None:
            lf = lf.filter(pl.col("ts") < end)
        shard = shard or Shard.whole()
        return lf if shard.is_whole else lf.filter(shard.user_predicate("user_id"))

    def scan_profiles(self, *, shard: Shard | None = None) -> pl.LazyFrame:
        if self.profiles is None:
            return pl.LazyFrame(schema={"user_id": pl.UInt32})
        lf = self.profiles.lazy()
        shard = shard or Shard.whole()
        return lf if shard.is_whole else lf.filter(shard.user_predicate("user_id"))


# --------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class FeatureSchema:
    """Columns of a snapshot; equal schemas have equal fingerprints."""

    categories: tuple[int, ...]
    group_weights: tuple[tuple[str, float], ...] = tuple(sorted(DEFAULT_GROUP_WEIGHTS.items()))
    version: int = FEATURE_VERSION

    @property
    def columns(self) -> list[str]:
        return [name for name, _group in self.column_groups()]

    def column_groups(self) -> list[tuple[str, str]]:
        """``(column, group)``; numeric columns are their own group (``"numeric"``)."""
        out = [(name, "numeric") for name in NUMERIC_COLUMNS]
        out += [(f"cat_{c}", "category") for c in self.categories] + [("cat_other", "category")]
        out += [(f"age_{AGE_BAND_NAMES[b]}", "age") for b in sorted(AGE_BAND_NAMES)]
        out += [(f"gender_{GENDER_NAMES[g]}", "gender") for g in sorted(GENDER_NAMES)]
        out += [(f"region_{r}", "region") for r in REGIONS] + [("region_unknown", "region")]
        out += [(f"interest_{t}", "interest") for t in INTEREST_TAGS]
        return out

    def weight(self, group: str) -> float:
        return dict(self.group_weights).get(group, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "categories": list(self.categories),
            "group_weights": dict(self.group_weights),
            "columns": self.columns,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FeatureSchema:
        schema = cls(
            categories=tuple(int(c) for c in doc["categories"]),
            group_weights=tuple(sorted((str(k), float(v)) for k, v in doc["group_weights"].items())),
            version=int(doc["version"]),
        )
        if "columns" in doc and list(doc["columns"]) != schema.columns:
            raise ValueError("feature schema columns do not match what this code derives from them")
        return schema

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(payload).hexdigest()


def pick_categories(events: pl.LazyFrame, as_of: datetime, top_k: int) -> tuple[int, ...]:
    """The ``top_k`` categories with most events before ``as_of`` (ties: lower id), sorted by id."""
    counts = (
        events.filter((pl.col("ts") < as_of) & pl.col("category_id").is_not_null())
        .group_by("category_id")
        .agg(pl.len().alias("n"))
        .sort(["n", "category_id"], descending=[True, False])
        .head(top_k)
        .collect(engine="streaming")
    )
    return tuple(sorted(int(c) for c in counts["category_id"].to_list()))


# --------------------------------------------------------------------------------------------------
# One shard


def _safe_div(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num / den).otherwise(0.0)


def compute_shard_features(
    events: pl.LazyFrame,
    profiles: pl.LazyFrame,
    schema: FeatureSchema,
    *,
    as_of: datetime,
    horizon_days: float,
) -> pl.DataFrame:
    """Raw (unstandardised) features of the users in ``events`` ∪ ``profiles``, sorted by user id.

    Only events with ``ts < as_of`` count. ``horizon_days`` is the recency given to "never".
    """
    as_of = _utc(as_of)
    ev = events.filter(pl.col("ts") < as_of).select(
        "user_id", "ts", "event_type", "category_id", "amount_fen"
    )
    et = pl.col("event_type")
    aggs: list[pl.Expr] = [pl.len().alias("n_total")]
    aggs += [(et == code).sum().alias(f"n_{name}") for code, name in sorted(EVENT_TYPE_NAMES.items())]
    aggs += [
        pl.col("ts").max().alias("last_ts"),
        pl.col("ts").filter(et == _PAY).max().alias("last_pay_ts"),
        pl.col("ts").dt.truncate("1d").n_unique().alias("active_days"),
        pl.col("amount_fen").filter(et == _PAY).sum().alias("paid_fen"),
        pl.col("amount_fen").filter(et == _REFUND).sum().alias("refund_fen"),
        pl.col("category_id").is_not_null().sum().alias("n_cat"),
    ]
    cat = pl.col("category_id")
    aggs += [(cat == c).sum().alias(f"c_{c}") for c in schema.categories]
    behaviour = ev.group_by("user_id").agg(aggs)

    prof_cols = ["user_id", "age_band", "gender", "region", "interests"]
    prof = profiles.select([c for c in prof_cols if c in profiles.collect_schema().names()])
    users = pl.concat(
        [behaviour.select("user_id"), prof.select(pl.col("user_id").cast(pl.UInt32))], how="vertical"
    ).unique()
    frame = (
        users.join(behaviour, on="user_id", how="left")
        .join(prof.with_columns(pl.col("user_id").cast(pl.UInt32)), on="user_id", how="left")
        .sort("user_id")
        .collect(engine="streaming")
    )
    frame = _ensure_profile_columns(frame)

    def n(name: str) -> pl.Expr:
        return pl.col(f"n_{name}").fill_null(0).cast(pl.Float64)

    horizon = float(horizon_days) + 1.0
    as_of_us = int(as_of.timestamp() * 1_000_000)

    def days_since(column: str) -> pl.Expr:
        since = (pl.lit(as_of_us) - pl.col(column).dt.epoch("us")).cast(pl.Float64) / _DAY_US
        return since.clip(0.0, horizon).fill_null(horizon).log1p()

    total = pl.col("n_total").fill_null(0).cast(pl.Float64)
    n_cat = pl.col("n_cat").fill_null(0).cast(pl.Float64)
    active = pl.col("active_days").fill_null(0).cast(pl.Float64)
    paid_yuan = pl.col("paid_fen").fill_null(0).cast(pl.Float64).clip(0.0) / 100.0
    refund_yuan = pl.col("refund_fen").fill_null(0).cast(pl.Float64).clip(0.0) / 100.0
    exprs: list[pl.Expr] = [pl.col("user_id")]
    exprs += [n(name).log1p().alias(f"ev_{name}") for _code, name in sorted(EVENT_TYPE_NAMES.items())]
    video = n("video_play") + n("video_finish")
    exprs += [
        days_since("last_ts").alias("rec_last_days"),
        days_since("last_pay_ts").alias("rec_pay_days"),
        active.log1p().alias("freq_active_days"),
        _safe_div(total, active).log1p().alias("freq_events_per_day"),
        paid_yuan.log1p().alias("mon_paid"),
        _safe_div(paid_yuan, n("pay")).log1p().alias("mon_aov"),
        _safe_div(refund_yuan, paid_yuan).clip(0.0, 1.0).alias("mon_refund_share"),
        _safe_div(n("video_finish"), n("video_play")).clip(0.0, 1.0).alias("eng_video_finish_rate"),
        _safe_div(video, total).alias("eng_video_share"),
        _safe_div(n("live_enter"), total).alias("eng_live_share"),
        _safe_div(n("click"), n("product_view")).clip(0.0, 1.0).alias("conv_click_per_view"),
        _safe_div(n("add_cart"), n("product_view")).clip(0.0, 1.0).alias("conv_cart_per_view"),
        _safe_div(n("pay"), n("add_cart")).clip(0.0, 1.0).alias("conv_pay_per_cart"),
    ]
    in_top = pl.sum_horizontal([pl.col(f"c_{c}").fill_null(0) for c in schema.categories] or [pl.lit(0)])
    exprs += [
        _safe_div(pl.col(f"c_{c}").fill_null(0).cast(pl.Float64), n_cat).alias(f"cat_{c}")
        for c in schema.categories
    ]
    exprs.append(_safe_div(n_cat - in_top.cast(pl.Float64), n_cat).alias("cat_other"))
    age = pl.col("age_band").fill_null(0)
    exprs += [(age == b).cast(pl.Float64).alias(f"age_{AGE_BAND_NAMES[b]}") for b in sorted(AGE_BAND_NAMES)]
    gender = pl.col("gender").fill_null(0)
    exprs += [(gender == g).cast(pl.Float64).alias(f"gender_{GENDER_NAMES[g]}") for g in sorted(GENDER_NAMES)]
    region = pl.col("region")
    exprs += [(region == r).fill_null(False).cast(pl.Float64).alias(f"region_{r}") for r in REGIONS]
    exprs.append((~region.is_in(list(REGIONS))).fill_null(True).cast(pl.Float64).alias("region_unknown"))
    interests = pl.col("interests").fill_null(pl.lit([], dtype=pl.List(pl.Utf8)))
    exprs += [interests.list.contains(t).cast(pl.Float64).alias(f"interest_{t}") for t in INTEREST_TAGS]

    out = frame.select(exprs)
    return out.select(
        pl.col("user_id").cast(pl.UInt32), *[pl.col(c).cast(pl.Float32) for c in schema.columns]
    )


def activity_from_raw(schema: FeatureSchema, raw: np.ndarray) -> np.ndarray:
    """Events per user (float64), recovered exactly from the raw ``ev_*`` columns (log1p counts).

    The "most active users" a ranking is compared with, and one of its inputs.
    """
    cols = [i for i, c in enumerate(schema.columns) if c.startswith("ev_")]
    if not cols or raw.shape[0] == 0:
        return np.zeros(raw.shape[0], np.float64)
    return np.rint(np.expm1(raw[:, cols].astype(np.float64))).sum(axis=1)


def _ensure_profile_columns(frame: pl.DataFrame) -> pl.DataFrame:
    defaults: dict[str, pl.Expr] = {
        "age_band": pl.lit(0, dtype=pl.UInt8),
        "gender": pl.lit(0, dtype=pl.UInt8),
        "region": pl.lit(None, dtype=pl.Utf8),
        "interests": pl.lit(None, dtype=pl.List(pl.Utf8)),
    }
    missing = [expr.alias(name) for name, expr in defaults.items() if name not in frame.columns]
    return frame.with_columns(missing) if missing else frame


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --------------------------------------------------------------------------------------------------
# Scaler


@dataclass
class _Moments:
    n: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None

    def add(self, matrix: np.ndarray) -> None:
        m = matrix.astype(np.float64, copy=False)
        s, q = m.sum(axis=0), np.square(m).sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.n += m.shape[0]


@dataclass(frozen=True)
class Scaler:
    """``z = clip((raw - mean) / scale, -CLIP, CLIP)`` column by column (see the module doc)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_moments(cls, schema: FeatureSchema, moments: _Moments) -> Scaler:
        d = len(schema.columns)
        if moments.n == 0 or moments.total is None or moments.squares is None:
            return cls(np.zeros(d), np.ones(d))
        mean = moments.total / moments.n
        var = np.maximum(moments.squares / moments.n - np.square(mean), 0.0)
        scale = np.sqrt(var)
        groups = [g for _c, g in schema.column_groups()]
        for group in set(groups) - {"numeric"}:
            idx = [i for i, g in enumerate(groups) if g == group]
            group_var = float(var[idx].sum())
            weight = schema.weight(group)
            scale[idx] = math.sqrt(group_var / weight) if group_var > 0 and weight > 0 else 0.0
        scale = np.where(scale > 1e-12, scale, 1.0)  # constant columns become 0
        return cls(mean, scale)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Standardised float32 copy of ``raw`` (computed in float32: this runs over every user)."""
        z = np.subtract(raw, self.mean.astype(np.float32), dtype=np.float32, order="C")  # rows: C order
        z *= (1.0 / self.scale).astype(np.float32)
        return np.clip(z, -CLIP, CLIP, out=z)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": [float(x) for x in self.mean], "scale": [float(x) for x in self.scale]}

    @classmethod
    def from_json(cls, doc: dict[str, Sequence[float]]) -> Scaler:
        return cls(np.asarray(doc["mean"], dtype=np.float64), np.asarray(doc["scale"], dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Snapshots in the object store


def default_shard_count(population_estimate: int, users_per_shard: int = 400_000) -> int:
    """Enough shards that one shard's events fit comfortably (≈400k users each), at most 256."""
    return max(1, min(256, math.ceil(max(population_estimate, 1) / users_per_shard)))


def snapshot_prefix(root: str, snapshot_id: str) -> str:
    return f"{root}features/{snapshot_id}/"


@dataclass
class FeatureSnapshot:
    """A published snapshot: manifest + one Parquet file per shard (``user_id`` + raw columns)."""

    store: ObjectStore
    manifest_key: str
    manifest: dict[str, Any]
    schema: FeatureSchema = field(init=False)
    scaler: Scaler = field(init=False)

    def __post_init__(self) -> None:
        self.schema = FeatureSchema.from_json(self.manifest["schema"])
        if self.schema.fingerprint != self.manifest["schema_fingerprint"]:
            raise ValueError(f"feature snapshot {self.manifest_key!r}: schema fingerprint does not match")
        self.scaler = Scaler.from_json(self.manifest["scaler"])

    @classmethod
    def load(cls, store: ObjectStore, root: str, snapshot_id: str) -> FeatureSnapshot:
        """``ObjectNotFound`` when no such snapshot was published."""
        key = snapshot_prefix(root, snapshot_id) + "manifest.json"
        return cls(store, key, read_manifest(store, key))

    @property
    def snapshot_id(self) -> str:
        return str(self.manifest["snapshot_id"])

    @property
    def population(self) -> int:
        return int(self.manifest["population"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["schema_fingerprint"])

    @property
    def as_of(self) -> datetime:
        return datetime.fromisoformat(self.manifest["as_of"].replace("Z", "+00:00"))

    @property
    def exclusion(self) -> FeatureExclusion:
        """Events kept out of these features (empty for snapshots from before exclusions)."""
        return FeatureExclusion.from_json(self.manifest.get("exclusion"))

    def shard_keys(self) -> list[str]:
        return [s["key"] for s in self.manifest["shards"]]

    def read_shard(self, key: str, user_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(user_ids uint32, raw float32 matrix)`` of one shard file, optionally only ``user_ids``."""
        source, options = self.store.scan_target(key)
        lf = pl.scan_parquet(source, storage_options=options)
        if user_ids is not None:
            lf = lf.filter(pl.col("user_id").is_in(pl.Series(user_ids, dtype=pl.UInt32)))
        df = lf.collect()
        ids = df.get_column("user_id").to_numpy().astype(np.uint32, copy=False)
        raw = df.select(self.schema.columns).to_numpy(order="c").astype(np.float32, copy=False)
        return ids, raw

    def iter_shards(self, user_ids: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for key in self.shard_keys():
            yield self.read_shard(key, user_ids)

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything in memory (small populations, tests and the eval)."""
        parts = list(self.iter_shards())
        if not parts:
            return np.zeros(0, np.uint32), np.zeros((0, len(self.schema.columns)), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def user_ids(self) -> np.ndarray:
        parts = []
        for key in self.shard_keys():
            source, options = self.store.scan_target(key)
            parts.append(
                pl.scan_parquet(source, storage_options=options).select("user_id").collect()["user_id"]
            )
        if not parts:
            return np.zeros(0, np.uint32)
        return pl.concat(parts).to_numpy().astype(np.uint32, copy=False)


Progress = Callable[[float, str], None]


def build_snapshot(
    store: ObjectStore,
    source: FeatureSource,
    *,
    root: str = "lookalike/",
    as_of: datetime,
    snapshot_id: str | None = None,
    shards: int | None = None,
    top_categories: int = 32,
    schema: FeatureSchema | None = None,
    lookback: timedelta | None = None,
    population_estimate: int | None = None,
    dataset: dict[str, Any] | None = None,
    exclusion: FeatureExclusion | None = None,
    progress: Progress | None = None,
) -> FeatureSnapshot:
    """Compute features shard by shard, publish them (manifest last) and return the snapshot.

    ``exclusion`` drops matching events first (its key is appended to the default id).

    ``schema`` reuses a given column list (e.g. a model's, so that the model can score fresh
    features); otherwise the top ``top_categories`` categories before ``as_of`` are picked. The
    default ``snapshot_id`` is derived from ``as_of``, the dataset version and the schema, so the
    same inputs give the same snapshot: if it exists it is returned without recomputation.
    """
    started = time.perf_counter()
    as_of = _utc(as_of)
    since = as_of - lookback if lookback is not None else None
    exclusion = exclusion or FeatureExclusion()
    all_events = exclusion.apply(source.scan_events(shard=Shard.whole(), end=as_of))
    if since is not None:
        all_events = all_events.filter(pl.col("ts") >= since)
    if schema is None:
        schema = FeatureSchema(categories=pick_categories(all_events, as_of, top_categories))
    if snapshot_id is None:
        version = (dataset or {}).get("version", "")
        snapshot_id = (
            f"{as_of.strftime('%Y%m%dt%H%M%Sz')}-d{version}-{schema.fingerprint.removeprefix('sha256:')[:12]}"
        )
        if exclusion:
            snapshot_id += f"-{exclusion.key}"
    existing = _try_load(store, root, snapshot_id)
    if existing is not None:
        if existing.fingerprint != schema.fingerprint:
            raise FileExistsError(f"feature snapshot {snapshot_id!r} exists with another schema")
        if existing.exclusion != exclusion:
            raise FileExistsError(f"feature snapshot {snapshot_id!r} exists with another exclusion")
        return existing

    first = (
        all_events.filter(pl.col("ts") < as_of).select(pl.col("ts").min()).collect(engine="streaming").item()
    )
    horizon_days = max((as_of - first).total_seconds() / 86_400, 1.0) if first is not None else 1.0
    if shards is None:
        estimate = population_estimate
        if estimate is None:
            estimate = int(source.scan_profiles(shard=Shard.whole()).select(pl.len()).collect().item())
        shards = default_shard_count(estimate)

    prefix = snapshot_prefix(root, snapshot_id)
    moments = _Moments()
    entries: list[dict[str, Any]] = []
    data: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="flashcrowd-features-") as tmp:
        for i, shard in enumerate(Shard.all(shards)):
            events = exclusion.apply(source.scan_events(shard=shard, end=as_of))
            if since is not None:
                events = events.filter(pl.col("ts") >= since)
            frame = compute_shard_features(
                events, source.scan_profiles(shard=shard), schema, as_of=as_of, horizon_days=horizon_days
            )
            moments.add(frame.select(schema.columns).to_numpy())
            key = f"{prefix}shard-{shard.index:03d}-of-{shard.count:03d}.parquet"
            path = Path(tmp) / f"shard-{shard.index:03d}.parquet"
            frame.write_parquet(path, compression="zstd", statistics=True)
            data[key] = path
            entries.append({"key": key, "shard": str(shard), "users": frame.height})
            del frame
            if progress is not None:
                progress(100.0 * (i + 1) / shards, f"features shard {shard}")
        scaler = Scaler.from_moments(schema, moments)
        manifest = {
            "format": FORMAT,
            "snapshot_id": snapshot_id,
            "as_of": as_of.isoformat().replace("+00:00", "Z"),
            "lookback_days": lookback.total_seconds() / 86_400 if lookback is not None else None,
            "horizon_days": horizon_days,
            "population": moments.n,
            "schema": schema.to_json(),
            "schema_fingerprint": schema.fingerprint,
            "exclusion": exclusion.to_json(),
            "scaler": scaler.to_json(),
            "shards": entries,
            "dataset": dataset or {},
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        key = prefix + "manifest.json"
        document = publish(store, data=data, manifest_key=key, manifest=manifest)
    log.info("feature snapshot %s: %d users, %d columns", snapshot_id, moments.n, len(schema.columns))
    return FeatureSnapshot(store, key, document)


def _try_load(store: ObjectStore, root: str, snapshot_id: str) -> FeatureSnapshot | None:
    try:
        return FeatureSnapshot.load(store, root, snapshot_id)
    except ObjectNotFound:
        return None
