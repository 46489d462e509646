"""The real-time part of the flash-sale demo: the sale hour replayed live through the event stream.

``use_demo_bus()`` (before the services start) points every service of the demo process at one
shared in-process bus (``memory://flashcrowd-demo``); ``await realtime_step(demo, tenant=...)``
(after the pack and persona steps) then:

1. starts the processes a user would run next to the audience service, in this process on free
   loopback ports: the retarget service (SQLite ledger in the work dir) unless the story already
   runs one, and the sale monitor (``services.monitor``: SaleMonitorService plus the
   campaign rules, acting through retarget's RPCs). The audience service itself serves EventService
   and LivePackService (and runs the compactor on the in-process bus);
2. creates the live pack "clicked a live-room item in the last 15 minutes and not paid in the last
   15 minutes", and launches a live-room coupon push to the teaser viewers with a STOP rule on
   ``stock_left <= 0`` of the 500-piece hook T-shirt;
3. replays the generated sale hour (T-0 - 5 min .. T-0 + 30 min, read with polars from the
   dataset) through ``EventService.IngestEvents`` (one stream, requests of 1,000 events), one
   simulated minute per ``pace`` seconds. Event times are shifted by whole minutes so that the
   replay ends now (ingest refuses events from the future or beyond retention; minute buckets keep
   their alignment). After each minute, once the sale monitor and the live pack have applied the
   stream up to its last sequence, the view shows the counters of ``GetSaleStats`` (cumulative since
   T-0 - 5 min: deterministic), the live pack's size and how many of that minute's clickers
   ``CheckMembership`` finds in it. A rich Live table on a terminal; one line per minute otherwise
   (CI logs). When the stock is gone the replay waits for the rule to pause the campaign and shows
   the audit entry;
4. shows the per-item counters of one ``WatchSale`` update, snapshots the live pack into an
   ordinary pack (``SnapshotLivePack``) and launches a small retarget campaign on the snapshot: a
   recall of the warm non-payers to the rest of the live room (the room is live until T+60; the
   story's next step runs the after-sale jacket test on the batch "clickers, not buyers" pack).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import polars as pl
from flashcrowd.audience.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    live_pack_pb2,
    live_pack_pb2_grpc,
)
from flashcrowd.retarget.v1 import (
    campaign_pb2,
    coupon_pb2,
    retarget_service_pb2,
    retarget_service_pb2_grpc,
    sale_monitor_pb2,
    sale_monitor_pb2_grpc,
)
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from services.audience.spec_io import spec_from_data
from services.demo import render
from services.runtime.assertion import platform_channel

__all__ = ["DEMO_BUS_URL", "realtime_step", "use_demo_bus"]

#: The in-process event bus every service of the demo process shares (audience, sale monitor).
DEMO_BUS_URL = "memory://flashcrowd-demo"
MINUTE = timedelta(minutes=1)
#: Minutes replayed before and after T-0.
BEFORE, AFTER = 5, 30
LIVE_PACK_ID = "warm-clickers"
SNAPSHOT_ID = "warm-clickers-t30"
PUSH_CAMPAIGN = "t0-live-coupon"
RETARGET_CAMPAIGN = "t30-recall-warm-clickers"
#: Unit cost assumed for the hook T-shirt (the world gives list and sale price only).
HOOK_UNIT_COST_FEN = 6000
Campaign = campaign_pb2.Campaign
Rule = campaign_pb2.Rule


def use_demo_bus() -> str:
    """Make the services this process starts share one in-process bus (call before they start).

    The demo runs on embedded defaults: audience and sale monitor are separate servers in one
    process, so they meet on the named in-process bus the way separate processes meet on NATS.
    """
    os.environ["FLASHCROWD_BUS_URL"] = DEMO_BUS_URL
    return DEMO_BUS_URL


# ---------------------------------------------------------------------------------------------------
# The replay


@dataclass
class Minute:
    """One simulated minute: its offset from T-0, its ingest requests and the users who clicked in it."""

    offset: int
    start_us: int  # shifted
    requests: list[event_service_pb2.IngestEventsRequest]
    events: int
    clickers: np.ndarray


def _iso(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromMicroseconds(us)
    return out


def _us(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


_OPTIONAL = ("item_id", "category_id", "campaign_id", "video_id", "order_id", "amount_fen")


def ingest_requests(
    chunk: pl.DataFrame, shift_us: int, batch: int
) -> list[event_service_pb2.IngestEventsRequest]:
    rows = chunk.select(
        "event_id",
        "user_id",
        (pl.col("ts").dt.epoch("us") + shift_us).alias("us"),
        "event_type",
        *(pl.col(c).fill_null(0) for c in _OPTIONAL),
    )
    out = []
    for lo in range(0, rows.height, batch):
        request = event_service_pb2.IngestEventsRequest()
        add = request.events.add
        for eid, uid, us, etype, item, cat, camp, video, order, amount in rows.slice(lo, batch).iter_rows():
            event = add(
                event_id=eid,
                user_id=uid,
                event_type=etype,
                item_id=item,
                category_id=cat,
                campaign_id=camp,
                video_id=video,
                order_id=order,
                amount_fen=amount,
            )
            seconds, micros = divmod(us, 1_000_000)
            event.event_time.seconds, event.event_time.nanos = seconds, micros * 1000
        out.append(request)
    return out


def load_sale_hour(
    store: Any, world: dict[str, Any], *, now: datetime, batch: int = 1000
) -> tuple[list[Minute], int]:
    """The sale day's events of ``[T-0 - 5 min, T-0 + 30 min)``, per minute, shifted to end at ``now``.

    Returns the minutes and the shift (microseconds, whole minutes).
    """
    from services.events.dataset import EventDataset

    t0 = _iso(world["sale"]["start"])
    start, end = t0 - BEFORE * MINUTE, t0 + AFTER * MINUTE
    frame = EventDataset(store).scan_events(start=start, end=end).collect().sort("ts", "event_id")
    replay_end = now.replace(second=0, microsecond=0)
    shift_us = _us(replay_end) - _us(end)
    minute_of = ((pl.col("ts").dt.epoch("us") - _us(t0)) // 60_000_000).alias("_minute")
    frame = frame.with_columns(minute_of)
    minutes = []
    for offset in range(-BEFORE, AFTER):
        chunk = frame.filter(pl.col("_minute") == offset)
        clickers = chunk.filter(pl.col("event_type") == 5).get_column("user_id").unique().sort().to_numpy()
        minutes.append(
            Minute(
                offset=offset,
                start_us=_us(t0) + offset * 60_000_000 + shift_us,
                requests=ingest_requests(chunk, shift_us, batch),
                events=chunk.height,
                clickers=clickers[:10_000],
            )
        )
    return minutes, shift_us


# ---------------------------------------------------------------------------------------------------
# Services


class _Stops:
    """``close()`` runs a service definition's stop callbacks (what ``run_service`` does at SIGTERM)."""

    def __init__(self, callbacks) -> None:
        self.callbacks = list(callbacks)

    async def close(self) -> None:
        for callback in self.callbacks:
            await callback()


async def _start_retarget(demo: Any) -> str:
    """The story's retarget server (``services.demo.retarget``), started here if the story has none."""
    if not getattr(demo, "retarget_target", None):
        from services.demo.retarget import start_retarget

        await start_retarget(demo)
    return demo.retarget_target


async def _start_sale_monitor(demo: Any, tenant: str, retarget_target: str) -> str:
    from services.monitor.config import MonitorSettings
    from services.monitor.server import build
    from services.runtime import create_server, load_settings

    settings = load_settings(
        MonitorSettings,
        store_url=demo.store.url,
        retarget_target=retarget_target,
        rules_tenants=tenant.split("/", 1)[1],
        rules_interval_seconds=0.2,
        port=0,
        grace_seconds=0.5,
        log_json=False,
    )
    definition = await build(settings)
    server, port = await create_server(
        settings,
        service_names=definition.names,
        register=definition.register,
        interceptors=definition.interceptors,
    )
    demo._servers.append((server, _Stops(definition.on_stop)))
    target = f"127.0.0.1:{port}"
    render.note(
        f"sale monitor  {target}  (SaleMonitorService on {settings.bus_url}; rules of {tenant} "
        f"every {settings.rules_interval_seconds:g} s -> retarget {retarget_target})"
    )
    return target


# ---------------------------------------------------------------------------------------------------
# The view


COLUMNS = ("time", "views", "clicks", "live", "cart", "orders", "paid", "GMV", "stock", "CTR", "CVR",
           "live pack", "clickers in it")  # fmt: skip


@dataclass
class View:
    """Rows of the live table; a rich Live on a terminal, one printed line per minute otherwise."""

    title: str
    rows: list[tuple[str, ...]] = field(default_factory=list)
    live: Any = None

    def __enter__(self) -> View:
        if render.console.is_terminal:
            from rich.live import Live

            self.live = Live(
                self._table(), console=render.console, refresh_per_second=8, vertical_overflow="visible"
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _table(self):
        from rich.table import Table

        t = Table(title=self.title, title_justify="left", show_edge=False, pad_edge=False)
        for i, col in enumerate(COLUMNS):
            t.add_column(col, justify="left" if i == 0 else "right")
        for row in self.rows:
            t.add_row(*row)
        return t

    def add(self, row: tuple[str, ...], line: str) -> None:
        self.rows.append(row)
        if self.live is not None:
            self.live.update(self._table())
        else:
            render.console.print(line, soft_wrap=True)

    def note(self, text: str) -> None:
        render.console.print(text, soft_wrap=True)


def _clock(world: dict[str, Any], offset: int) -> str:
    t0 = _iso(world["sale"]["start_beijing"])
    when = t0 + offset * MINUTE
    return f"{when:%H:%M} T{offset:+03d}"


def _row(label: str, c: sale_monitor_pb2.SaleCounters, live_size: int, members: int, clickers: int):
    stock = "-" if c.stock_left < 0 else f"{c.stock_left:,}"
    row = (
        label,
        f"{c.views:,}",
        f"{c.clicks:,}",
        f"{c.live_entries:,}",
        f"{c.add_to_cart:,}",
        f"{c.orders:,}",
        f"{c.paid_orders:,}",
        render.yuan(c.paid_gmv_fen),
        stock,
        f"{c.ctr:.2f}",
        f"{c.cvr:.1%}",
        f"{live_size:,}",
        f"{members:,}/{clickers:,}",
    )
    line = (
        f"  {label}  views {row[1]}  clicks {row[2]}  live {row[3]}  cart {row[4]}  orders {row[5]}  "
        f"paid {row[6]}  GMV {row[7]}  stock {stock}  CTR {row[9]}  CVR {row[10]}  | "
        f"live pack {row[11]}  (this minute's clickers in it: {row[12]})"
    )
    return row, line


# ---------------------------------------------------------------------------------------------------
# The step


async def _wait_state(stub, name: str, states: tuple[int, ...], timeout: float) -> campaign_pb2.Campaign:
    deadline = time.monotonic() + timeout
    while True:
        campaign = await stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=name))
        if campaign.state in states or time.monotonic() > deadline:
            return campaign
        await asyncio.sleep(0.05)


def _audit_entries(store: Any, tenant: str, campaign: str) -> list[tuple[str, campaign_pb2.RuleFiring]]:
    prefix = f"rules/firings/{tenant.split('/', 1)[1]}/{campaign}/"
    out = []
    for info in store.list(prefix):
        out.append((info.key, json_format.Parse(store.get_bytes(info.key), campaign_pb2.RuleFiring())))
    return out


async def realtime_step(
    demo: Any, *, tenant: str, title: str = "T-0, live", pace: float = 0.2
) -> dict[str, Any]:
    """Replay the sale hour live (see the module doc); returns a few figures for callers and tests."""
    render.section(title, "the sale hour replayed through IngestEvents; live counters, live pack, rules")
    bus_url = os.environ.get("FLASHCROWD_BUS_URL", "memory://")
    if bus_url.rstrip("/") == "memory:":
        raise RuntimeError(
            "a private in-process bus is not shared: call use_demo_bus() before the services start"
        )
    render.note(
        f"audience  {demo.audience_target}  also serves EventService and LivePackService on {bus_url} "
        "(and runs the compactor)"
    )
    retarget_target = await _start_retarget(demo)
    monitor_target = await _start_sale_monitor(demo, tenant, retarget_target)
    # The stream's last sequence tells when the consumers have caught up (``nats stream info`` on NATS).
    from services.events.bus import open_bus

    bus = open_bus(bus_url)
    try:
        step = _Step(demo, tenant, bus, pace, retarget_target, monitor_target)
        await step.prepare()
        await step.replay()
        step.show_firing()
        await step.show_items()
        return await step.retarget_snapshot()
    finally:
        await bus.close()


class _Step:
    def __init__(self, demo: Any, tenant: str, bus: Any, pace: float, retarget: str, monitor: str) -> None:
        self.demo, self.tenant, self.bus, self.pace = demo, tenant, bus, pace
        self.world = demo.world
        self.sale = self.world["sale"]
        channels = [platform_channel(t, "demo") for t in (demo.audience_target, retarget, monitor)]
        demo._channels.extend(channels)
        self.events = event_service_pb2_grpc.EventServiceStub(channels[0])
        self.live = live_pack_pb2_grpc.LivePackServiceStub(channels[0])
        self.audience = audience_service_pb2_grpc.AudienceServiceStub(channels[0])
        self.retarget = retarget_service_pb2_grpc.RetargetServiceStub(channels[1])
        self.monitor = sale_monitor_pb2_grpc.SaleMonitorServiceStub(channels[2])
        self.live_name = f"{tenant}/livePacks/{LIVE_PACK_ID}"
        hook = sale_monitor_pb2.HookProduct(
            item_id=self.sale["hook_item_id"],
            stock=self.sale["hook_stock"],
            sale_price_fen=self.sale["hook_sale_price_fen"],
            unit_cost_fen=HOOK_UNIT_COST_FEN,
        )
        #: The live room's events; stock and loss of the hook T-shirt.
        self.scope = sale_monitor_pb2.SaleScope(
            campaign_ids=[self.sale["live_campaign_id"]], hook_products=[hook]
        )
        self.fired: dict[str, Any] = {}
        self.sold_out_at: str | None = None
        self.stats: sale_monitor_pb2.SaleStats | None = None
        self.live_size = 0
        self.accepted = self.rejected = self.duplicates = 0
        self.wall = 0.0

    # ---- before T-0 -----------------------------------------------------------------------------

    async def prepare(self) -> None:
        sale, world = self.sale, self.world
        t_load = time.perf_counter()
        self.minutes, shift_us = await asyncio.to_thread(
            load_sale_hour, self.demo.store, world, now=datetime.now(UTC)
        )
        self.t0_us = _us(_iso(sale["start"])) + shift_us
        self.since = _timestamp(self.t0_us - BEFORE * 60_000_000)
        render.note(
            f"{sum(m.events for m in self.minutes):,} events of {sale['day']} {_clock(world, -BEFORE)[:5]}-"
            f"{_clock(world, AFTER)[:5]} (Beijing) read with polars in {time.perf_counter() - t_load:.1f} s; "
            f"replayed as {sum(len(m.requests) for m in self.minutes)} IngestEvents requests of <= 1,000, "
            f"one simulated minute per {self.pace:g} s, event times shifted by {shift_us / 8.64e10:+,.2f} "
            "days so that the replay ends now"
        )
        # Clicked a live-room item in the last 15 min, not paid (anything) in the last 15 min.
        spec = spec_from_data(
            {
                "exclude": {
                    "base": {"shortcut": {"kind": "clickers", "window": {"last": "15m"},
                                          "filter": {"itemIds": sale["live_item_ids"]}}},
                    "subtract": [{"shortcut": {"kind": "purchasers", "window": {"last": "15m"}}}],
                }
            }
        )  # fmt: skip
        await self.live.CreateLivePack(
            live_pack_pb2.CreateLivePackRequest(
                parent=self.tenant,
                live_pack_id=LIVE_PACK_ID,
                live_pack=live_pack_pb2.LivePack(
                    display_name="Clicked a live-room item in the last 15 min, not paid in the last 15 min",
                    spec=spec,
                ),
            )
        )
        render.note(
            f"live pack {self.live_name}: clicked a live-room item in the last 15 min, not paid since"
        )
        await self._launch_push()
        render.note(
            "CTR = clicks / product views (race clickers click repeatedly); CVR = paid orders / clicks"
        )

    async def _launch_push(self) -> None:
        """The sale's coupon push to the teaser viewers, stopped by a rule when the hook T-shirt is gone."""
        sale, retarget = self.sale, self.retarget
        coupon = sale["live_coupon"]
        template = await retarget.CreateCouponTemplate(
            retarget_service_pb2.CreateCouponTemplateRequest(
                parent=self.tenant,
                coupon_template_id="live-room-20-off-199",
                coupon_template=coupon_pb2.CouponTemplate(
                    display_name="live room: 20 off 199",
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=coupon["discount_fen"]),
                    min_spend_fen=coupon["threshold_fen"],
                    applicable_item_ids=sale["live_item_ids"],
                    per_user_limit=1,
                    valid_for=duration_pb2.Duration(seconds=86_400),
                ),
            )
        )
        audience = self.demo.packs["teaser-viewers"]
        stop = campaign_pb2.Rule(
            rule_id="sold-out",
            action=Rule.ACTION_STOP,
            metric="stock_left",
            comparison=Rule.COMPARISON_LESS_OR_EQUAL,
            threshold=0,
            cooldown=duration_pb2.Duration(seconds=600),
            scope=self.scope,
        )
        push = await retarget.CreateCampaign(
            retarget_service_pb2.CreateCampaignRequest(
                parent=self.tenant,
                campaign_id=PUSH_CAMPAIGN,
                campaign=campaign_pb2.Campaign(
                    display_name="T-0 coupon push to teaser viewers",
                    audience_pack=audience.name,
                    offer_item_ids=sale["live_item_ids"],
                    coupon_template=template.name,
                    start_time=self.since,  # the rule counts the stock from here
                    delivery_rate_per_second=100,
                    rules=[stop],
                ),
            )
        )
        await retarget.LaunchCampaign(retarget_service_pb2.LaunchCampaignRequest(name=push.name))
        push = await _wait_state(retarget, push.name, (Campaign.STATE_RUNNING, Campaign.STATE_COMPLETED), 10)
        self.push = push
        hook = self.scope.hook_products[0]
        render.note(
            f"campaign {push.name}: {Campaign.State.Name(push.state)}, coupons to {audience.size:,} teaser "
            f"viewers at 100/s; rule sold-out: STOP when stock_left <= 0 of item {hook.item_id} "
            f"({hook.stock} pieces at {render.yuan(hook.sale_price_fen)})"
        )

    # ---- the replay -----------------------------------------------------------------------------

    async def replay(self) -> None:
        title = (
            f"sale of {self.sale['day']}: counters since T-5 (GetSaleStats), live pack (GetLivePack, "
            "CheckMembership)"
        )
        started = time.perf_counter()
        call = self.events.IngestEvents()
        with View(title) as view:
            for minute in self.minutes:
                tick = time.perf_counter()
                await self._ingest(call, minute)
                await self._show_minute(view, minute)
                await asyncio.sleep(max(0.0, self.pace - (time.perf_counter() - tick)))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # one response per request, all read
        self.wall = time.perf_counter() - started
        minutes = len(self.minutes)
        render.note(
            f"replayed {self.accepted:,} events accepted ({self.duplicates:,} duplicates, {self.rejected:,} "
            f"rejected) in {self.wall:.1f} s: {minutes} simulated minutes, {minutes * 60 / self.wall:,.0f}x "
            "real time"
        )

    async def _ingest(self, call: Any, minute: Minute) -> None:
        for request in minute.requests:
            await call.write(request)
        for _ in minute.requests:
            response = await call.read()
            self.accepted += response.accepted
            self.duplicates += response.duplicates
            self.rejected += len(response.rejected)

    async def _show_minute(self, view: View, minute: Minute) -> None:
        # Wait until the sale monitor and the live pack applied the stream up to its last message.
        target = await self.bus.last_seq()
        request = sale_monitor_pb2.GetSaleStatsRequest(
            parent=self.tenant,
            scope=self.scope,
            start_time=self.since,
            end_time=_timestamp(minute.start_us + 60_000_000),
        )
        while True:
            stats = await self.monitor.GetSaleStats(request)
            pack = await self.live.GetLivePack(live_pack_pb2.GetLivePackRequest(name=self.live_name))
            if stats.stream_sequence >= target and pack.stream_sequence >= target:
                break
            await asyncio.sleep(0.005)
        self.stats, self.live_size = stats, pack.size
        members = 0
        if minute.clickers.size:
            check = await self.audience.CheckMembership(
                audience_service_pb2.CheckMembershipRequest(
                    parent=self.tenant, packs=[self.live_name], user_ids=minute.clickers.tolist()
                )
            )
            members = sum(check.results[0].members)
        label = _clock(self.world, minute.offset)
        row, line = _row(label, stats.total, pack.size, members, int(minute.clickers.size))
        view.add(row, line)
        if stats.total.stock_left == 0 and self.sold_out_at is None:
            self.sold_out_at = label
            await self._await_stop(view, label)

    async def _await_stop(self, view: View, label: str) -> None:
        """Sold out: hold the replay until the rule has paused the push (the rules run every 0.2 s)."""
        name = self.push.name
        deadline = time.monotonic() + 10
        paused = await _wait_state(self.retarget, name, (Campaign.STATE_PAUSED,), 10)
        # The engine writes its audit copy just after the action returned: wait for it too.
        entries = _audit_entries(self.demo.store, self.tenant, PUSH_CAMPAIGN)
        while paused.state == Campaign.STATE_PAUSED and not entries and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            entries = _audit_entries(self.demo.store, self.tenant, PUSH_CAMPAIGN)
        if paused.state != Campaign.STATE_PAUSED or not entries:
            view.note(f"  >> {label}  sold out, but the STOP rule did not pause {name} within 10 s")
            return
        key, firing = entries[-1]
        self.fired = {"campaign": paused, "key": key, "firing": firing, "at": label}
        view.note(
            f"  >> {label}  STOP rule sold-out fired: stock_left={firing.metrics['stock_left']:g} -> {name} "
            f"{Campaign.State.Name(paused.state)} ({firing.outcome})"
        )

    # ---- after ----------------------------------------------------------------------------------

    def show_firing(self) -> None:
        if not self.fired:
            left = self.stats.total.stock_left if self.stats else "?"
            render.note(f"the hook did not sell out in the replay (stock left {left}); no rule fired")
            return
        firing, campaign = self.fired["firing"], self.fired["campaign"]
        metrics = firing.metrics
        render.table(
            f"audit log {self.fired['key']}",
            ["field", "value"],
            [
                ("rule", f"{firing.rule_id} ({Rule.Action.Name(firing.action)})"),
                ("fired at", f"{self.fired['at']} (wall {firing.fire_time.ToDatetime():%H:%M:%S} UTC)"),
                ("stock_left / paid orders", f"{metrics['stock_left']:g} / {metrics['paid_orders']:,.0f}"),
                ("paid GMV", render.yuan(int(metrics["paid_gmv_fen"]))),
                ("projected hook loss", render.yuan(int(metrics["projected_loss_fen"]))),
                ("outcome", firing.outcome),
                (
                    "campaign",
                    f"{campaign.name}: {Campaign.State.Name(campaign.state)}, "
                    f"{campaign.progress.issued:,} coupons issued before the stop",
                ),
            ],
            right=2,
        )

    async def show_items(self) -> None:
        """One WatchSale update (the stream sends one a second), per item."""
        watch = self.monitor.WatchSale(
            sale_monitor_pb2.WatchSaleRequest(
                parent=self.tenant,
                scope=self.scope,
                start_time=self.since,
                group_by=sale_monitor_pb2.SALE_GROUP_BY_ITEM,
            )
        )
        update = await watch.read()
        watch.cancel()
        names = {it["item_id"]: it.get("name", "") for it in self.world["items"]}
        rows = []
        for g in sorted(update.groups, key=lambda g: -g.paid_gmv_fen)[:6]:
            item = f"{g.key} {names.get(int(g.key.split('/')[1]), '')}".strip()
            stock = "-" if g.stock_left < 0 else g.stock_left
            rows.append(
                (item, g.views, g.clicks, g.add_to_cart, g.paid_orders, render.yuan(g.paid_gmv_fen), stock)
            )
        render.table(
            "WatchSale (first update), the live campaign per item",
            ["item", "views", "clicks", "cart", "paid", "GMV", "stock left"],
            rows,
        )

    async def retarget_snapshot(self) -> dict[str, Any]:
        """Snapshot the live pack into an ordinary pack and launch a small recall campaign on it."""
        sale, retarget = self.sale, self.retarget
        snapshot = await self.live.SnapshotLivePack(
            live_pack_pb2.SnapshotLivePackRequest(
                name=self.live_name,
                pack_id=SNAPSHOT_ID,
                display_name="Clicked in the last 15 min of the replay, not paid (snapshot at T+30)",
            )
        )
        render.note(
            f"SnapshotLivePack -> {snapshot.name} v{snapshot.version}: {snapshot.size:,} members "
            f"(live pack at the last minute: {self.live_size:,})"
        )
        # The room is live until T+60: call the warm non-payers back to what is left (the hook is gone).
        rest = [i for i in sale["live_item_ids"] if i != sale["hook_item_id"]]
        coupon = sale["live_coupon"]
        recall = await retarget.CreateCouponTemplate(
            retarget_service_pb2.CreateCouponTemplateRequest(
                parent=self.tenant,
                coupon_template_id="live-room-recall",
                coupon_template=coupon_pb2.CouponTemplate(
                    display_name="back to the live room: 20 off 199 (the T-shirt is sold out)",
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=coupon["discount_fen"]),
                    min_spend_fen=coupon["threshold_fen"],
                    applicable_item_ids=rest,
                    per_user_limit=1,
                    valid_for=duration_pb2.Duration(seconds=3600),
                ),
            )
        )
        campaign = await retarget.CreateCampaign(
            retarget_service_pb2.CreateCampaignRequest(
                parent=self.tenant,
                campaign_id=RETARGET_CAMPAIGN,
                campaign=campaign_pb2.Campaign(
                    display_name="T+30 recall: warm clickers who did not pay, while the room is live",
                    audience_pack=snapshot.name,
                    offer_item_ids=rest,
                    coupon_template=recall.name,
                    holdout_basis_points=1000,
                ),
            )
        )
        await retarget.LaunchCampaign(retarget_service_pb2.LaunchCampaignRequest(name=campaign.name))
        campaign = await _wait_state(retarget, campaign.name, (Campaign.STATE_COMPLETED,), 30)
        p = campaign.progress
        state = Campaign.State.Name(campaign.state)
        render.table(
            f"retarget campaign on the snapshot: {campaign.name}",
            ["audience", "state", "issued", "held out (10%)", "skipped"],
            [(snapshot.name.rsplit("/", 1)[-1], state, p.issued, p.held_out, p.skipped)],
            right=2,
        )
        return {
            "events": self.accepted,
            "sold_out_at": self.sold_out_at,
            "fired": bool(self.fired),
            "snapshot_size": snapshot.size,
            "issued": p.issued,
            "wall_seconds": self.wall,
        }
