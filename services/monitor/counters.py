"""Sale monitor: live sale counters from the event stream (GetSaleStats, WatchSale).

Counters are kept per minute of event time and per ``(owner, campaign_id, item_id)`` of the events
(0 when an event has none), for the last ``horizon`` of the stream (replayed on start). A query sums
the minutes of ``[start, end)`` (minute granularity) over the keys visible to the query's tenant and
in its scope, and derives the ratios; events are de-duplicated by ``(owner, event_id)``. The clock
is event time (newest event time seen, advanced by wall time since), like live packs, so a replay
faster than real time is watched at its pace.

What a tenant T sees (``SaleMonitor.stats(..., tenant=T)``; GetSaleStats / WatchSale for
``tenants/T``, and the rules of T's campaigns):

* T's own events (owner T) that match the scope;
* platform events (owner ``PLATFORM_OWNER``) of the items and campaigns the scope *names*
  (``item_ids``, hook products, ``campaign_ids``; ``SaleScope.names``): an empty scope means "all of
  my own events", never "every merchant's sales";
* never another tenant's events, whatever the scope names.

The parent must name a tenant the caller may act for: another tenant's parent is NOT_FOUND, like
any other tenant's resource. Nothing here checks that the items a scope names are the tenant's
(the platform has no catalog of item ownership yet): naming another merchant's item ids shows the
platform's behaviour counters of those items, never that merchant's own events.

Derived metrics (``SaleCounters``): ``stock_left`` = stock of the scope's hook products - paid
hook pieces + refunded hook pieces; hook loss = (unit cost - sale price) x net pieces sold;
``projected_loss_fen`` = hook loss if the whole stock sells at the current sell-through (0 until a
piece sells) + coupon cost; ``roi`` = (paid GMV - refunded - coupon cost - hook loss) / (coupon
cost + hook loss).

The process (``python -m services.monitor``) is assembled in ``services.monitor.server``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

import numpy as np
import polars as pl
from flashcrowd.retarget.v1 import sale_monitor_pb2
from pyroaring import BitMap64

from services.events.bus import EventBus
from services.events.follower import StreamFollower
from services.events.schema import OWNER, PLATFORM_OWNER, EventType
from services.runtime import InvalidArgument

__all__ = ["COUNTERS", "HookProduct", "SaleMonitor", "SaleScope", "metrics_of"]

logger = logging.getLogger(__name__)

MINUTE_US = 60_000_000
_E = EventType
#: Stored counters, in this order, per (minute, owner, campaign_id, item_id).
COUNTERS = (
    "views",
    "clicks",
    "live_entries",
    "add_to_cart",
    "orders",
    "paid_orders",
    "paid_gmv_fen",
    "refunds",
    "refunded_fen",
    "coupons_claimed",
    "coupons_redeemed",
    "coupon_cost_fen",
)
_COUNT_OF = {
    "views": _E.PRODUCT_VIEW,
    "clicks": _E.CLICK,
    "live_entries": _E.LIVE_ENTER,
    "add_to_cart": _E.ADD_CART,
    "orders": _E.ORDER,
    "paid_orders": _E.PAY,
    "refunds": _E.REFUND,
    "coupons_claimed": _E.COUPON_CLAIM,
    "coupons_redeemed": _E.COUPON_REDEEM,
}
_SUM_OF = {"paid_gmv_fen": _E.PAY, "refunded_fen": _E.REFUND, "coupon_cost_fen": _E.COUPON_REDEEM}


@dataclass(frozen=True)
class HookProduct:
    item_id: int
    stock: int
    sale_price_fen: int
    unit_cost_fen: int


@dataclass(frozen=True)
class SaleScope:
    item_ids: frozenset[int] = frozenset()
    campaign_ids: frozenset[int] = frozenset()
    hooks: tuple[HookProduct, ...] = ()
    coupon_discount_fen: int = 0

    @classmethod
    def from_pb(cls, scope: sale_monitor_pb2.SaleScope, field: str = "scope") -> SaleScope:
        hooks = []
        for i, h in enumerate(scope.hook_products):
            if h.item_id == 0 or h.stock < 0 or h.sale_price_fen < 0 or h.unit_cost_fen < 0:
                raise InvalidArgument(
                    f"{field}.hook_products[{i}]", "item_id required; stock and amounts >= 0"
                )
            hooks.append(HookProduct(h.item_id, h.stock, h.sale_price_fen, h.unit_cost_fen))
        if scope.coupon_discount_fen < 0:
            raise InvalidArgument(f"{field}.coupon_discount_fen", "must be >= 0")
        return cls(
            frozenset(scope.item_ids), frozenset(scope.campaign_ids), tuple(hooks), scope.coupon_discount_fen
        )

    @cached_property
    def hook_items(self) -> frozenset[int]:
        return frozenset(h.item_id for h in self.hooks)

    def matches(self, campaign_id: int, item_id: int) -> bool:
        """Is the key in the scope (empty lists: any item / any campaign)?"""
        item_ok = not self.item_ids or item_id in self.item_ids or item_id in self.hook_items
        return item_ok and (not self.campaign_ids or campaign_id in self.campaign_ids)

    def names(self, campaign_id: int, item_id: int) -> bool:
        """Does the scope name the key explicitly: one of its items or hook products, or campaigns?

        Only named keys bring platform events into a tenant's counters.
        """
        return (item_id != 0 and (item_id in self.item_ids or item_id in self.hook_items)) or (
            campaign_id != 0 and campaign_id in self.campaign_ids
        )

    def visible(self, owner: str, campaign_id: int, item_id: int, tenant: str) -> bool:
        """Does a counter of ``owner`` count for ``tenant`` under this scope (see the module doc)?"""
        if owner == tenant:
            return self.matches(campaign_id, item_id)
        return (
            owner == PLATFORM_OWNER
            and self.matches(campaign_id, item_id)
            and self.names(campaign_id, item_id)
        )


class SaleMonitor(StreamFollower):
    """Per-minute counters fed from the bus."""

    consumer = "sale-monitor"

    def __init__(
        self, bus: EventBus, *, horizon: timedelta = timedelta(hours=6), clock=time.monotonic
    ) -> None:
        super().__init__(bus, clock=clock)
        self.horizon = horizon
        #: minute -> (owner, campaign_id, item_id) -> counters
        self.minutes: dict[int, dict[tuple[str, int, int], np.ndarray]] = defaultdict(dict)
        #: owner -> event ids counted (since start)
        self._seen: dict[str, BitMap64] = {}

    def _fresh(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The first of each ``(owner, event_id)`` not counted yet (a message has one owner)."""
        owners = frame.get_column(OWNER)
        parts = [frame] if owners.n_unique() == 1 else frame.partition_by(OWNER, maintain_order=True)
        kept: list[pl.DataFrame] = []
        for part in parts:
            seen = self._seen.setdefault(str(part.get_column(OWNER)[0]), BitMap64())
            fresh = BitMap64(part.get_column("event_id").to_numpy()) - seen
            if len(fresh) != part.height:
                part = part.unique(subset="event_id", keep="first", maintain_order=True)
                part = part.filter(pl.col("event_id").is_in(list(fresh)))
            seen |= fresh
            kept.append(part)
        return kept[0] if len(kept) == 1 else pl.concat(kept)

    def apply(self, frame: pl.DataFrame, seq: int) -> None:
        if frame.height:
            frame = self._fresh(frame)
        if frame.height:
            newest = frame.get_column("ts").dt.epoch("us").max()
            assert isinstance(newest, int)  # a non-empty column's max
            self.observe(newest)
            t = pl.col("event_type")
            aggs = [(t == int(code)).sum().alias(name) for name, code in _COUNT_OF.items()]
            aggs += [
                pl.col("amount_fen").filter(t == int(code)).sum().alias(n) for n, code in _SUM_OF.items()
            ]
            grouped = (
                frame.with_columns(
                    (pl.col("ts").dt.epoch("us") // MINUTE_US).alias("_m"),
                    pl.col("campaign_id").fill_null(0),
                    pl.col("item_id").fill_null(0),
                )
                .group_by("_m", OWNER, "campaign_id", "item_id")
                .agg(aggs)
            )
            for row in grouped.iter_rows():
                minute, owner, campaign, item, *values = row
                bucket = self.minutes[int(minute)]
                key = (str(owner), int(campaign), int(item))
                ordered = dict(zip([*_COUNT_OF, *_SUM_OF], values, strict=True))
                vector = np.array([int(ordered[n] or 0) for n in COUNTERS], dtype=np.int64)
                if key in bucket:
                    bucket[key] += vector
                else:
                    bucket[key] = vector
            oldest = (self.now_us() - int(self.horizon.total_seconds() * 1_000_000)) // MINUTE_US
            for minute in [m for m in self.minutes if m < oldest]:
                del self.minutes[minute]
        self.seq = max(self.seq, seq)

    def stats(
        self, scope: SaleScope, start_us: int, end_us: int, group_by: int = 0, *, tenant: str
    ) -> sale_monitor_pb2.SaleStats:
        """Counters of ``[start_us, end_us)`` visible to ``tenant`` under ``scope`` (module doc)."""
        first, last = start_us // MINUTE_US, (end_us - 1) // MINUTE_US
        total = np.zeros(len(COUNTERS), dtype=np.int64)
        groups: dict[str, np.ndarray] = {}
        hook_sold: dict[int, int] = defaultdict(int)
        hooks = {h.item_id: h for h in scope.hooks}
        for minute, keys in self.minutes.items():
            if not first <= minute <= last:
                continue
            for (owner, campaign, item), vector in keys.items():
                if not scope.visible(owner, campaign, item, tenant):
                    continue
                total += vector
                if item in hooks:
                    hook_sold[item] += int(
                        vector[COUNTERS.index("paid_orders")] - vector[COUNTERS.index("refunds")]
                    )
                if group_by == sale_monitor_pb2.SALE_GROUP_BY_CAMPAIGN:
                    key = f"campaign/{campaign}"
                elif group_by == sale_monitor_pb2.SALE_GROUP_BY_ITEM:
                    key = f"item/{item}"
                else:
                    continue
                groups[key] = groups.get(key, np.zeros(len(COUNTERS), dtype=np.int64)) + vector
        out = sale_monitor_pb2.SaleStats(stream_sequence=self.seq)
        out.start_time.FromMicroseconds(start_us)
        out.end_time.FromMicroseconds(end_us)
        out.total.CopyFrom(_counters("total", total, scope, hook_sold))
        for key in sorted(groups):
            group_item = int(key.split("/")[1]) if key.startswith("item/") else None
            sold = {group_item: hook_sold[group_item]} if group_item in hooks else {}
            sub_scope = SaleScope(
                hooks=tuple(h for h in scope.hooks if h.item_id == group_item),
                coupon_discount_fen=scope.coupon_discount_fen,
            )
            out.groups.append(_counters(key, groups[key], sub_scope, sold))
        return out

    # ---- feeding --------------------------------------------------------------------------------

    def first_start_time(self) -> datetime:
        return datetime.now(UTC) - self.horizon


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def _counters(
    key: str, vector: np.ndarray, scope: SaleScope, hook_sold: dict[int, int]
) -> sale_monitor_pb2.SaleCounters:
    values = {name: int(v) for name, v in zip(COUNTERS, vector, strict=True)}
    if scope.coupon_discount_fen:
        values["coupon_cost_fen"] = values["coupons_redeemed"] * scope.coupon_discount_fen
    hook_loss = projected = 0
    stock_left = -1
    if scope.hooks:
        stock_left = 0
        for hook in scope.hooks:
            sold = max(0, hook_sold.get(hook.item_id, 0))
            per_piece = max(0, hook.unit_cost_fen - hook.sale_price_fen)
            hook_loss += per_piece * sold
            if sold:
                projected += per_piece * max(hook.stock, sold)
            stock_left += max(0, hook.stock - sold)
    cost = values["coupon_cost_fen"] + hook_loss
    net = values["paid_gmv_fen"] - values["refunded_fen"] - cost
    return sale_monitor_pb2.SaleCounters(
        key=key,
        **values,
        stock_left=stock_left,
        ctr=_ratio(values["clicks"], values["views"]),
        cvr=_ratio(values["paid_orders"], values["clicks"]),
        roi=_ratio(net, cost),
        projected_loss_fen=projected + values["coupon_cost_fen"],
    )


def metrics_of(counters: sale_monitor_pb2.SaleCounters) -> dict[str, float]:
    """Flat metric map of one SaleCounters (what rules compare)."""
    names = (*COUNTERS, "stock_left", "ctr", "cvr", "roi", "projected_loss_fen")
    return {name: float(getattr(counters, name)) for name in names}
