"""Value-weighted seeds: how much each seed member counts, from what the member paid.

``spend_weights`` reads the tenant-visible events (the platform's and the tenant's own) before the
features' ``as_of``: net spend = Σ pay − Σ refund (fen), clipped at 0. Weights are spend over the
seed's mean spend, capped at ``cap`` (one whale must not become the whole seed) and floored at
``floor`` (a member who paid nothing is still a member of the seed the advertiser chose). A seed in
which nobody paid gets uniform weights and says so. The ranking rescales weights to mean 1, so
only their ratios matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from services.events.dataset import EventDataset
from services.events.schema import EventType, visible_owners

__all__ = ["SeedWeights", "spend_weights"]

SPEND_CAP = 10.0
SPEND_FLOOR = 0.1


@dataclass(frozen=True)
class SeedWeights:
    weights: np.ndarray  # float64, aligned with the seed ids given
    paying: int  # seed members with a positive net spend
    note: str  # how the weights were made (recorded with the expansion)


def spend_weights(
    dataset: EventDataset,
    tenant: str,
    seed_ids: np.ndarray,
    as_of: datetime,
    *,
    cap: float = SPEND_CAP,
    floor: float = SPEND_FLOOR,
) -> SeedWeights:
    """Weights of ``seed_ids`` (sorted uint32) by net spend before ``as_of``; see the module doc."""
    seed = pl.Series("user_id", seed_ids.astype(np.uint32))
    money = (
        dataset.scan_events(
            columns=["user_id", "ts", "event_type", "amount_fen"], end=as_of, owners=visible_owners(tenant)
        )
        .filter(pl.col("event_type").is_in([int(EventType.PAY), int(EventType.REFUND)]))
        .filter(pl.col("user_id").cast(pl.UInt32).is_in(seed.implode()))
        .group_by(pl.col("user_id").cast(pl.UInt32))
        .agg(
            pl.when(pl.col("event_type") == int(EventType.PAY))
            .then(pl.col("amount_fen"))
            .otherwise(-pl.col("amount_fen"))
            .sum()
            .alias("net")
        )
        .collect(engine="streaming")
    )
    spend = np.zeros(len(seed_ids), np.float64)
    if money.height:
        ids = money["user_id"].to_numpy().astype(np.uint32)
        pos = np.searchsorted(seed_ids, ids)
        ok = (pos < len(seed_ids)) & (seed_ids[np.minimum(pos, len(seed_ids) - 1)] == ids)
        spend[pos[ok]] = np.maximum(money["net"].to_numpy()[ok].astype(np.float64), 0.0)
    paying = int((spend > 0).sum())
    mean = float(spend.mean()) if len(spend) else 0.0
    if mean <= 0:
        return SeedWeights(np.ones(len(seed_ids)), 0, "spend: no seed member paid before as_of; uniform")
    weights = np.clip(spend / mean, floor, cap)
    note = (
        f"spend: {paying:,} of {len(seed_ids):,} members paid; weight = spend / mean, in [{floor:g}, {cap:g}]"
    )
    return SeedWeights(weights, paying, note)
