"""Independent, straightforward answers on the eager events frame, to compare builds against.

Written from the definitions, not from the compiler: plain eager polars, Python sets.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

CLICK, VIDEO_PLAY, VIDEO_FINISH, PRODUCT_VIEW = 5, 1, 2, 4
ADD_CART, ORDER, PAY, REFUND, FOLLOW = 6, 7, 8, 9, 10


def users(
    events: pl.DataFrame,
    types: list[int],
    start: datetime,
    end: datetime,
    *,
    min_count: int = 1,
    **filters: list[int],
) -> set[int]:
    """Users with >= min_count events of ``types`` in [start, end) matching column filters."""
    rows = events.filter(pl.col("event_type").is_in(types) & (pl.col("ts") >= start) & (pl.col("ts") < end))
    for column, values in filters.items():
        rows = rows.filter(pl.col(column).is_in(values))
    counts = rows.group_by("user_id").len()
    return set(counts.filter(pl.col("len") >= min_count).get_column("user_id").to_list())


def purchasers(events: pl.DataFrame, start: datetime, end: datetime, horizon: datetime) -> set[int]:
    """Paid in [start, end), unless every order paid there was fully refunded before ``horizon``."""
    paid = (
        events.filter((pl.col("event_type") == PAY) & (pl.col("ts") >= start) & (pl.col("ts") < end))
        .group_by("user_id", "order_id")
        .agg(pl.col("amount_fen").sum().alias("paid"))
    )
    refunds = (
        events.filter((pl.col("event_type") == REFUND) & (pl.col("ts") >= start) & (pl.col("ts") < horizon))
        .group_by("order_id")
        .agg(pl.col("amount_fen").sum().alias("refunded"))
    )
    keep: set[int] = set()
    refunded = dict(zip(refunds["order_id"].to_list(), refunds["refunded"].to_list(), strict=True))
    for user, order, amount in paid.iter_rows():
        if refunded.get(order, 0) < amount:
            keep.add(user)
    return keep


def profile_users(
    profiles: pl.DataFrame,
    *,
    age_bands: list[int] | None = None,
    genders: list[int] | None = None,
    regions: list[str] | None = None,
    interests: list[str] | None = None,
) -> set[int]:
    out = set()
    for row in profiles.iter_rows(named=True):
        if age_bands and row["age_band"] not in age_bands:
            continue
        if genders and row["gender"] not in genders:
            continue
        if regions and row["region"] not in regions:
            continue
        if interests and not set(row["interests"] or []) & set(interests):
            continue
        out.add(row["user_id"])
    return out
