"""Flag fake traffic (click bots) in an event dataset; cached per dataset version in the object store.

The rule is robust rather than tuned to one data set:

1. Per user: clicks, days with clicks, pays. The rate is clicks per active day, on a log scale.
2. The population's median and MAD of the log rate define a robust z-score (bots are a small minority,
   so they barely move either statistic, unlike a mean and standard deviation).
3. Candidates: z above ``k`` and at least ``min_events`` clicks (too few clicks prove nothing).
4. Confirmation, for the candidates only (a second, narrow scan): scripted clicking is regular. The
   robust spread of the gaps between clicks (MAD / median of the intervals) is near 0 for a bot and
   large for a person. A candidate is a bot if its clicks are regular, or if its rate is extreme
   (z above ``extreme_k``). Optionally an ``IsolationForest`` over the per-user features must agree.

The result is cached at ``{dataset prefix}derived/bots/v{version}.roaring`` with a small JSON manifest
written after it (``publish``: data first). The manifest holds a fingerprint of the dataset's files,
so a dataset regenerated under the same version number is never answered from a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
from flashcrowd.audience.v1 import events_pb2
from pyroaring import BitMap

from services.audience.compiler import ids_to_bitmap
from services.events.dataset import EventDataset
from services.events.schema import PLATFORM_OWNER
from services.storage import ObjectNotFound, publish, read_manifest

__all__ = ["BotReport", "BotRule", "bot_bitmap", "bots_cache_key", "detect_bots"]

log = logging.getLogger(__name__)

CLICK = events_pb2.EventType.EVENT_TYPE_CLICK
PAY = events_pb2.EventType.EVENT_TYPE_PAY
# Consistency constant: 1.4826 * MAD estimates the standard deviation of a normal distribution.
_MAD_SCALE = 1.4826
# The MAD of a discrete, mostly-1 rate can be 0; a floor keeps the z-score finite and meaningful.
_MIN_MAD = 0.05
ALGORITHM = "rate-mad+regularity/v1"


@dataclass(frozen=True)
class BotRule:
    """Thresholds of the rule; the defaults are what the cache holds."""

    k: float = 4.5
    extreme_k: float = 8.0
    min_events: int = 20
    max_irregularity: float = 0.3
    use_isolation_forest: bool = False

    def tag(self) -> str:
        """Cache-key suffix: empty for the default rule."""
        if self == BotRule():
            return ""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"-{digest}"


@dataclass
class BotReport:
    """What ``detect_bots`` found, with the numbers behind the threshold."""

    bots: BitMap
    clicking_users: int
    candidates: int
    median_log_rate: float
    mad_log_rate: float
    threshold_rate: float  # clicks per active day above which a user is a candidate

    def summary(self) -> dict[str, Any]:
        return {
            "algorithm": ALGORITHM,
            "bots": len(self.bots),
            "clicking_users": self.clicking_users,
            "candidates": self.candidates,
            "median_log_rate": self.median_log_rate,
            "mad_log_rate": self.mad_log_rate,
            # None when nobody clicked (no threshold): strict JSON has no Infinity.
            "threshold_clicks_per_day": self.threshold_rate if math.isfinite(self.threshold_rate) else None,
        }


def detect_bots(dataset: EventDataset, rule: BotRule | None = None) -> BotReport:
    """Run the rule over the platform's own events (no cache).

    Only the platform's behaviour stream counts: a tenant's conversion events must not be able to
    get a user flagged as a bot (and so dropped from every other tenant's packs).
    """
    rule = rule or BotRule()
    per_user = (
        dataset.scan_events(columns=["user_id", "ts", "event_type"], owners=(PLATFORM_OWNER,))
        .filter(pl.col("event_type").is_in([CLICK, PAY]))
        .group_by("user_id")
        .agg(
            (pl.col("event_type") == CLICK).sum().alias("clicks"),
            pl.col("ts").filter(pl.col("event_type") == CLICK).dt.date().n_unique().alias("days"),
            (pl.col("event_type") == PAY).sum().alias("pays"),
        )
        .filter(pl.col("clicks") > 0)
        .sort("user_id")  # deterministic order for the optional forest's sample
        .collect(engine="streaming")
    )
    if per_user.height == 0:
        return BotReport(BitMap(), 0, 0, 0.0, 0.0, float("inf"))
    users = per_user.get_column("user_id").to_numpy()
    clicks = per_user.get_column("clicks").to_numpy().astype(np.float64)
    days = np.maximum(per_user.get_column("days").to_numpy(), 1).astype(np.float64)
    log_rate = np.log(clicks / days)
    median = float(np.median(log_rate))
    mad = float(np.median(np.abs(log_rate - median)))
    scale = _MAD_SCALE * max(mad, _MIN_MAD)
    z = (log_rate - median) / scale
    is_candidate = (z > rule.k) & (clicks >= rule.min_events)
    candidates = users[is_candidate]
    report = BotReport(
        BitMap(),
        clicking_users=len(users),
        candidates=len(candidates),
        median_log_rate=median,
        mad_log_rate=mad,
        threshold_rate=float(np.exp(median + rule.k * scale)),
    )
    if len(candidates) == 0:
        return report

    irregularity = _irregularity(dataset, candidates)
    cand_z = z[is_candidate]
    flagged = (irregularity <= rule.max_irregularity) | (cand_z > rule.extreme_k)
    if rule.use_isolation_forest:
        pays = per_user.get_column("pays").to_numpy().astype(np.float64)
        features = np.column_stack([log_rate, np.log(clicks), np.log1p(pays)])
        flagged &= _forest_agrees(features, is_candidate)
    report.bots = ids_to_bitmap(candidates[flagged])
    return report


def _irregularity(dataset: EventDataset, candidates: np.ndarray) -> np.ndarray:
    """Median over active days of MAD / median of the day's click gaps, aligned with ``candidates``.

    Per day, because a script's pace may differ between runs (a sale-day burst versus a slow
    background crawl): mixing them would make a perfectly regular bot look irregular.
    """
    wanted = pl.Series(candidates, dtype=pl.UInt32).implode()
    gap = pl.col("ts").sort().diff().dt.total_microseconds().drop_nulls()
    per_day = (
        dataset.scan_events(columns=["user_id", "ts", "event_type"], owners=(PLATFORM_OWNER,))
        .filter((pl.col("event_type") == CLICK) & pl.col("user_id").is_in(wanted))
        .group_by("user_id", pl.col("ts").dt.date().alias("day"))
        .agg(
            gap.median().alias("median"),
            (gap - gap.median()).abs().median().alias("mad"),
            pl.len().alias("n"),
        )
        .filter(pl.col("n") >= 5)
        .group_by("user_id")
        .agg((pl.col("mad") / pl.col("median").clip(lower_bound=1)).median().alias("irregularity"))
    )
    aligned = (
        pl.DataFrame({"user_id": pl.Series(candidates, dtype=pl.UInt32)})
        .join(per_day.collect(), on="user_id", how="left", maintain_order="left")
        .get_column("irregularity")
        .fill_null(float("inf"))  # no day with enough clicks to judge: not regular
    )
    return aligned.to_numpy()


def _forest_agrees(features: np.ndarray, is_candidate: np.ndarray) -> np.ndarray:
    """IsolationForest verdict (anomalous = True) for the candidates; fitted on a fixed sample."""
    from sklearn.ensemble import IsolationForest  # heavy import, only when asked for

    rng = np.random.default_rng(0)
    sample = (
        features if len(features) <= 50_000 else features[rng.choice(len(features), 50_000, replace=False)]
    )
    forest = IsolationForest(n_estimators=100, contamination="auto", random_state=0).fit(sample)
    return forest.predict(features[is_candidate]) == -1


# --- cache --------------------------------------------------------------------------------------------


def bots_cache_key(dataset: EventDataset, rule: BotRule | None = None) -> str:
    return f"{dataset.prefix}derived/bots/v{dataset.version}{(rule or BotRule()).tag()}.roaring"


def _fingerprint(dataset: EventDataset) -> str:
    files = sorted((f["key"], f.get("sha256", "")) for f in dataset.manifest.get("files", []))
    return hashlib.sha256(json.dumps([dataset.version, files]).encode()).hexdigest()


def bot_bitmap(dataset: EventDataset, rule: BotRule | None = None, *, use_cache: bool = True) -> BitMap:
    """The dataset's bots, from the cache when it matches this dataset, else computed and cached."""
    rule = rule or BotRule()
    key = bots_cache_key(dataset, rule)
    manifest_key = key.removesuffix(".roaring") + ".json"
    fingerprint = _fingerprint(dataset)
    store = dataset.store
    if use_cache:
        try:
            manifest = read_manifest(store, manifest_key)
            if manifest.get("fingerprint") == fingerprint and manifest.get("algorithm") == ALGORITHM:
                return BitMap.deserialize(store.get_bytes(key))
        except (ObjectNotFound, ValueError):
            pass
    report = detect_bots(dataset, rule)
    if use_cache:
        try:
            publish(
                store,
                data={key: bytes(report.bots.serialize())},
                manifest_key=manifest_key,
                manifest={**report.summary(), "fingerprint": fingerprint, "rule": asdict(rule)},
                overwrite=True,
            )
        except Exception:  # a cache that cannot be written only costs time
            log.warning("could not cache bots at %s", key, exc_info=True)
    return report.bots
