"""Taobao UserBehavior (Tianchi data set 649) -> flashcrowd events.

Input: ``UserBehavior.csv`` without header: ``user_id,item_id,category_id,behavior_type,timestamp``
(Unix seconds). Cite: Zhu et al., *Learning Tree-based Deep Model for Recommender Systems*, KDD 2018.

Mapping (one row -> events of the same user, item, category and time):

==========  ==============================================================================
``pv``      ``product_view``
``cart``    ``add_cart``
``fav``     ``follow``: a favourite (收藏) is a standing subscription to one item's updates,
            the same act as following a shop or live room in our schema (a durable "keep me
            posted" signal, stronger than a view, not a step of the purchase funnel). Mapping
            it to ``click`` would overstate the funnel; ``follow`` keeps the item id.
``buy``     ``order`` + ``pay`` with one synthetic ``order_id``: Taobao logs a completed
            purchase, i.e. both steps. The price is not in the data: ``amount_fen`` is 0
            (a known purchase of unknown value), never an invented amount.
==========  ==============================================================================

* User ids fit uint32 in the published data (max ≈ 1.02M) and are kept as they are, so results can
  be checked against the source; if a file ever had larger ids they would be remapped densely
  (sorted order) and the report says so.
* Events outside the official window (2017-11-25 .. 2017-12-03 Beijing time = 2017-11-24T16:00Z ..
  2017-12-03T16:00Z) are dropped unless ``keep_outside_window``; the report counts them.
* There are no profiles: every user gets an "unknown" profile row (age band 0, gender 0, no region,
  no interests, no signup date), so the population is every user of the file.
* Event ids carry the source in the top byte (``0x01``), the row number below, so they never collide
  with generator ids (< 2**56).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from services.events.adapters.common import AdaptedData, unknown_profiles
from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER, EventType
from services.events.sharding import bucket_expr

__all__ = ["BEHAVIOR_MAP", "OFFICIAL_END", "OFFICIAL_START", "SOURCE_TAG", "read_taobao"]

SOURCE_TAG = 0x01
OFFICIAL_START = datetime(2017, 11, 24, 16, 0, tzinfo=UTC)
OFFICIAL_END = datetime(2017, 12, 3, 16, 0, tzinfo=UTC)
#: behaviour -> event types emitted (in this order; the ordinal is part of the event id).
BEHAVIOR_MAP: dict[str, tuple[EventType, ...]] = {
    "pv": (EventType.PRODUCT_VIEW,),
    "cart": (EventType.ADD_CART,),
    "fav": (EventType.FOLLOW,),
    "buy": (EventType.ORDER, EventType.PAY),
}
_UINT32_MAX = 0xFFFFFFFF


def read_taobao(path: str | Path, *, keep_outside_window: bool = False) -> AdaptedData:
    """Events and (unknown) profiles from one ``UserBehavior.csv``; see the module doc."""
    path = Path(path)
    if path.is_dir():
        path = path / "UserBehavior.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no Taobao UserBehavior.csv at {path}")
    raw = pl.read_csv(
        path,
        has_header=False,
        new_columns=["user_id", "item_id", "category_id", "behavior", "timestamp"],
        schema_overrides={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "category_id": pl.Int64,
            "behavior": pl.Utf8,
            "timestamp": pl.Int64,
        },
    ).with_row_index("row")
    report: dict[str, Any] = {"source": "taobao", "file": str(path), "rows": raw.height}

    unknown = raw.filter(~pl.col("behavior").is_in(list(BEHAVIOR_MAP)))
    report["rows_unknown_behavior"] = unknown.height
    raw = raw.filter(pl.col("behavior").is_in(list(BEHAVIOR_MAP)))
    raw = raw.with_columns(ts=pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC"))
    outside = (pl.col("ts") < OFFICIAL_START) | (pl.col("ts") >= OFFICIAL_END)
    report["rows_outside_window"] = int(raw.select(outside.sum()).item())
    if not keep_outside_window:
        raw = raw.filter(~outside)
    report["outside_window"] = "kept" if keep_outside_window else "dropped"

    bad_ids = raw.filter(
        (pl.col("item_id") < 0) | (pl.col("item_id") > _UINT32_MAX)
        | (pl.col("category_id") < 0) | (pl.col("category_id") > _UINT32_MAX)
        | (pl.col("user_id") < 0)
    )  # fmt: skip
    report["rows_bad_ids"] = bad_ids.height
    raw = raw.filter(~pl.col("row").is_in(bad_ids["row"].implode()))

    max_user = raw["user_id"].max()
    if max_user is not None and int(max_user) > _UINT32_MAX:  # type: ignore[arg-type]
        ids = raw.select(pl.col("user_id").unique().sort())
        mapping = ids.with_row_index("dense", offset=1)
        raw = raw.join(mapping, on="user_id").with_columns(pl.col("dense").alias("user_id")).drop("dense")
        report["user_ids"] = "remapped densely (source ids exceed uint32)"
    else:
        report["user_ids"] = "kept (fit uint32)"

    rows = []
    for behavior, types in BEHAVIOR_MAP.items():
        for ordinal, etype in enumerate(types):
            rows.append(
                raw.filter(pl.col("behavior") == behavior).with_columns(
                    event_type=pl.lit(int(etype), dtype=pl.UInt8),
                    ordinal=pl.lit(ordinal, dtype=pl.UInt64),
                    is_buy=pl.lit(behavior == "buy"),
                )
            )
    both = pl.concat(rows)
    row = pl.col("row").cast(pl.UInt64)
    source = pl.lit(SOURCE_TAG << 56, dtype=pl.UInt64)
    events = both.select(
        event_id=source | (row * 4 + pl.col("ordinal")),
        user_id=pl.col("user_id").cast(pl.UInt32),
        bucket=bucket_expr(pl.col("user_id").cast(pl.UInt32)),
        ts=pl.col("ts").dt.cast_time_unit("us"),
        event_type=pl.col("event_type"),
        item_id=pl.col("item_id").cast(pl.UInt32),
        category_id=pl.col("category_id").cast(pl.UInt32),
        campaign_id=pl.lit(None, dtype=pl.UInt32),
        video_id=pl.lit(None, dtype=pl.UInt32),
        order_id=pl.when(pl.col("is_buy")).then(source | (row + 1)).otherwise(None).cast(pl.UInt64),
        amount_fen=pl.when(pl.col("is_buy")).then(pl.lit(0, dtype=pl.Int64)).otherwise(None),
        owner=pl.lit(PLATFORM_OWNER, dtype=pl.Utf8),  # public data: platform behaviour
    ).cast(EVENTS_SCHEMA)
    users = events.get_column("user_id").unique().sort()
    report["events"] = events.height
    report["users"] = users.len()
    report["events_by_type"] = {
        EventType(int(code)).label: int(n)
        for code, n in events.group_by("event_type").len().sort("event_type").iter_rows()
    }
    categories = events.get_column("category_id").unique().sort()
    meta = {"source": "taobao-userbehavior", "citation": "Zhu et al., KDD 2018 (Tianchi data set 649)"}
    return AdaptedData(
        events=events,
        profiles=unknown_profiles(users),
        report=report,
        categories=[{"category_id": int(c), "name": f"taobao category {c}"} for c in categories],
        meta=meta,
    )
