"""Sale monitor counters and the quick stop / boost / copy rules against a real retarget service."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from flashcrowd.audience.v1 import events_pb2, live_pack_pb2, live_pack_pb2_grpc
from flashcrowd.retarget.v1 import (
    campaign_pb2,
    coupon_pb2,
    retarget_service_pb2,
    retarget_service_pb2_grpc,
    sale_monitor_pb2,
    sale_monitor_pb2_grpc,
)
from google.protobuf import duration_pb2

from services.audience.config import AudienceSettings
from services.audience.server import create_audience_server
from services.events.bus import MemoryBus
from services.events.ingest import EventIngestor
from services.monitor.counters import SaleMonitor, SaleScope
from services.monitor.rules import RuleEngine
from services.monitor.servicer import sale_monitor_definition
from services.retarget.config import RetargetSettings
from services.retarget.server import create_retarget_server
from services.runtime import BaseServiceSettings, create_server, load_settings
from services.storage import LocalObjectStore
from tests.fixtures.channels import backend_channel

from .conftest import drop_stream, make_jetstream_bus
from .events import make_event
from .test_live_packs import clicked_not_paid

E = events_pb2
HOOK = sale_monitor_pb2.HookProduct(item_id=100001, stock=5, sale_price_fen=2990, unit_cost_fen=5000)


async def feed(monitor: SaleMonitor, bus: MemoryBus) -> None:
    from services.events.codec import decode_batch

    sub = await bus.subscribe("t", start_seq=monitor.seq + 1)
    for d in await sub.fetch(10_000, 0):
        monitor.apply(decode_batch(d.payload), d.seq)


async def test_counters_ratios_stock_and_loss() -> None:
    bus = MemoryBus(4)
    monitor = SaleMonitor(bus)
    ingest = EventIngestor(bus).ingest
    now = datetime.now(UTC) - timedelta(minutes=1)
    live = dict(campaign_id=900002)
    events = [
        make_event(i, i, E.EVENT_TYPE_PRODUCT_VIEW, when=now, item_id=100001, **live) for i in range(1, 101)
    ]
    events += [
        make_event(200 + i, i, E.EVENT_TYPE_CLICK, when=now, item_id=100001, **live) for i in range(1, 41)
    ]
    events += [make_event(300 + i, i, E.EVENT_TYPE_LIVE_ENTER, when=now, **live) for i in range(1, 31)]
    events += [
        make_event(400 + i, i, E.EVENT_TYPE_PAY, when=now, item_id=100001, amount_fen=2990, **live)
        for i in range(1, 5)
    ]
    events += [make_event(500, 1, E.EVENT_TYPE_REFUND, when=now, item_id=100001, amount_fen=2990, **live)]
    events += [make_event(600, 9, E.EVENT_TYPE_PAY, when=now, item_id=100002, amount_fen=39900, **live)]
    events += [
        make_event(700, 9, E.EVENT_TYPE_COUPON_REDEEM, when=now, item_id=100002, amount_fen=2000, **live)
    ]
    await ingest(events)
    await ingest(events[:50])  # re-batched retry: counted once
    await feed(monitor, bus)
    scope = SaleScope.from_pb(sale_monitor_pb2.SaleScope(campaign_ids=[900002], hook_products=[HOOK]))
    end = monitor.now_us() + 1
    # Platform events of the live room the scope names (campaign 900002): every one counts.
    stats = monitor.stats(scope, end - 3_600_000_000, end, sale_monitor_pb2.SALE_GROUP_BY_ITEM, tenant="t1")
    t = stats.total
    assert (t.views, t.clicks, t.live_entries, t.paid_orders, t.refunds) == (100, 40, 30, 5, 1)
    assert t.paid_gmv_fen == 4 * 2990 + 39900 and t.refunded_fen == 2990 and t.coupon_cost_fen == 2000
    assert t.stock_left == 5 - 3  # 4 paid, 1 refunded
    assert t.ctr == pytest.approx(0.4) and t.cvr == pytest.approx(5 / 40)
    hook_loss = 3 * (5000 - 2990)
    assert t.projected_loss_fen == 5 * (5000 - 2990) + 2000
    assert t.roi == pytest.approx((4 * 2990 + 39900 - 2990 - 2000 - hook_loss) / (2000 + hook_loss))
    assert [g.key for g in stats.groups] == ["item/0", "item/100001", "item/100002"]
    # Nothing outside the range.
    assert monitor.stats(scope, end - 3_600_000_000, end - 3_000_000_000, tenant="t1").total.views == 0


async def test_watch_sale_streams_updates_over_grpc() -> None:
    bus = MemoryBus(4)
    monitor = SaleMonitor(bus)
    monitor.start()
    settings = load_settings(BaseServiceSettings, port=0, grace_seconds=0.1)
    names, register = sale_monitor_definition(monitor)
    server, port = await create_server(settings, service_names=names, register=register)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = sale_monitor_pb2_grpc.SaleMonitorServiceStub(channel)
            call = stub.WatchSale(sale_monitor_pb2.WatchSaleRequest(parent="tenants/t1"))
            first = await call.read()
            assert first.total.clicks == 0
            # t1's own conversion events: counted under the empty scope ("all of my events").
            clicks = [make_event(i, i, E.EVENT_TYPE_CLICK) for i in range(1, 11)]
            await EventIngestor(bus).ingest(clicks, owner="t1")
            for _ in range(5):
                update = await call.read()
                if update.total.clicks == 10:
                    break
            assert update.total.clicks == 10
            call.cancel()
            stats = await stub.GetSaleStats(sale_monitor_pb2.GetSaleStatsRequest(parent="tenants/t1"))
            assert stats.total.clicks == 10
    finally:
        await server.stop(None)
        await monitor.stop()


@pytest.mark.timeout(90)
async def test_stop_boost_and_copy_rules_fire_through_retarget(tmp_path, nats_url, monkeypatch) -> None:
    bus = await make_jetstream_bus(nats_url)
    monkeypatch.setenv("FLASHCROWD_BUS_URL", f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}")
    audience_settings = load_settings(
        AudienceSettings, store_url=f"file://{tmp_path}/store", port=0, grace_seconds=0.2, log_json=False
    )
    a_server, a_port, a_app = await create_audience_server(audience_settings)
    r_settings = load_settings(
        RetargetSettings,
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        audience_target=f"127.0.0.1:{a_port}",
        port=0,
        grace_seconds=0.2,
        log_json=False,
    )
    r_server, r_port, r_app = await create_retarget_server(r_settings)
    monitor = SaleMonitor(bus)
    monitor.start()
    channel = backend_channel(f"127.0.0.1:{r_port}")
    a_channel = backend_channel(f"127.0.0.1:{a_port}")
    try:
        # The story: a live "clicked, not paid" pack, snapshotted, targeted by a coupon campaign.
        live = live_pack_pb2_grpc.LivePackServiceStub(a_channel)
        await live.CreateLivePack(
            live_pack_pb2.CreateLivePackRequest(
                parent="tenants/t1",
                live_pack_id="warm",
                live_pack=live_pack_pb2.LivePack(spec=clicked_not_paid()),
            )
        )
        ingest = EventIngestor(bus).ingest
        now = datetime.now(UTC)
        await ingest(
            [
                make_event(i, i, E.EVENT_TYPE_CLICK, when=now, item_id=100001, campaign_id=900002)
                for i in range(1, 61)
            ]
        )
        name = "tenants/t1/livePacks/warm"
        while (await live.GetLivePack(live_pack_pb2.GetLivePackRequest(name=name))).size < 60:
            await asyncio.sleep(0.05)
        await live.SnapshotLivePack(live_pack_pb2.SnapshotLivePackRequest(name=name, pack_id="warm-snap"))

        stub = retarget_service_pb2_grpc.RetargetServiceStub(channel)
        template = await stub.CreateCouponTemplate(
            retarget_service_pb2.CreateCouponTemplateRequest(
                parent="tenants/t1",
                coupon_template_id="jacket",
                coupon_template=coupon_pb2.CouponTemplate(
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=2000)
                ),
            )
        )
        scope = sale_monitor_pb2.SaleScope(campaign_ids=[900002], hook_products=[HOOK])
        minute = duration_pb2.Duration(seconds=60)
        rules = [
            campaign_pb2.Rule(
                rule_id="sold-out",
                action=campaign_pb2.Rule.ACTION_STOP,
                metric="stock_left",
                comparison=campaign_pb2.Rule.COMPARISON_LESS_OR_EQUAL,
                threshold=0,
                cooldown=minute,
                scope=scope,
            ),
            campaign_pb2.Rule(
                rule_id="clone",
                action=campaign_pb2.Rule.ACTION_COPY,
                metric="clicks",
                comparison=campaign_pb2.Rule.COMPARISON_GREATER_OR_EQUAL,
                threshold=50,
                cooldown=minute,
                copy_to_pack="tenants/t1/packs/warm-snap",
                scope=scope,
            ),
            campaign_pb2.Rule(
                rule_id="push",
                action=campaign_pb2.Rule.ACTION_BOOST,
                metric="clicks",
                comparison=campaign_pb2.Rule.COMPARISON_GREATER_OR_EQUAL,
                threshold=50,
                cooldown=duration_pb2.Duration(seconds=2),
                boost_rate_ceiling=3,
                scope=scope,
            ),
        ]
        campaign = await stub.CreateCampaign(
            retarget_service_pb2.CreateCampaignRequest(
                parent="tenants/t1",
                campaign_id="retarget",
                campaign=campaign_pb2.Campaign(
                    audience_pack="tenants/t1/packs/warm-snap",
                    coupon_template=template.name,
                    delivery_rate_per_second=1,
                    rules=rules,
                ),
            )
        )
        await stub.LaunchCampaign(retarget_service_pb2.LaunchCampaignRequest(name=campaign.name))
        for _ in range(100):
            got = await stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=campaign.name))
            if got.state == campaign_pb2.Campaign.STATE_RUNNING:
                break
            await asyncio.sleep(0.05)
        assert got.state == campaign_pb2.Campaign.STATE_RUNNING

        store = LocalObjectStore(tmp_path / "audit")
        clock = [1000.0]
        engine = RuleEngine(stub, monitor, ["t1"], store=store, interval=0.1, clock=lambda: clock[0])

        async def rate() -> int:
            got = await stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=campaign.name))
            return got.delivery_rate_per_second

        fired = await engine.evaluate()
        assert [f.rule_id for f in fired] == ["clone", "push"]  # stock not gone yet
        assert fired[1].outcome == "boosted: delivery rate 1 -> 2/s (ceiling 3)" and await rate() == 2
        clock[0] += 1  # inside the boost's 2 s cooldown: nothing fires
        assert await engine.evaluate() == [] and await rate() == 2
        clock[0] += 2  # x2 would be 4: capped at the ceiling
        assert [f.rule_id for f in await engine.evaluate()] == ["push"] and await rate() == 3
        clock[0] += 3  # at the ceiling: no change, no firing
        assert await engine.evaluate() == [] and await rate() == 3
        # Another tenant forges the 5 hook payments in t1's live room (its own events): t1's rules see
        # only t1's events and the platform's, so nothing stops.
        forged = [
            make_event(
                1000 + i,
                100 + i,
                E.EVENT_TYPE_PAY,
                when=now,
                item_id=100001,
                amount_fen=2990,
                campaign_id=900002,
            )
            for i in range(5)
        ]
        assert (await ingest(forged, owner="t2")).accepted == 5
        while monitor.seq < await bus.last_seq():
            await asyncio.sleep(0.02)
        assert await engine.evaluate() == []
        got = await stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=campaign.name))
        assert got.state == campaign_pb2.Campaign.STATE_RUNNING
        pays = [
            make_event(
                1000 + i,
                100 + i,
                E.EVENT_TYPE_PAY,
                when=now,
                item_id=100001,
                amount_fen=2990,
                campaign_id=900002,
            )
            for i in range(5)
        ]
        await ingest(pays)
        while monitor.seq < await bus.last_seq():
            await asyncio.sleep(0.02)
        fired = await engine.evaluate()
        assert [f.rule_id for f in fired] == ["sold-out"]
        assert fired[0].metrics["stock_left"] == 0 and fired[0].action == campaign_pb2.Rule.ACTION_STOP
        paused = await stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=campaign.name))
        assert paused.state == campaign_pb2.Campaign.STATE_PAUSED
        copy = await stub.GetCampaign(
            retarget_service_pb2.GetCampaignRequest(name="tenants/t1/campaigns/retarget-clone")
        )
        assert copy.audience_pack == "tenants/t1/packs/warm-snap"

        # Idempotent, with a cooldown that survives a restart of the engine.
        await stub.ResumeCampaign(retarget_service_pb2.ResumeCampaignRequest(name=campaign.name))
        again = RuleEngine(stub, monitor, ["t1"], store=store)
        assert await again.evaluate() == []
        log = again.audit_log(campaign.name)
        assert [f.rule_id for f in log] == ["sold-out", "push", "push", "clone"]
        assert log[0].outcome.startswith("paused") and log[3].metrics["clicks"] == 60

        # The report lists the same firings from retarget's own audit log, with what it did.
        report = await stub.GetCampaignReport(
            retarget_service_pb2.GetCampaignReportRequest(campaign=campaign.name)
        )
        firings = list(report.rule_firings)
        assert [f.rule_id for f in firings] == ["sold-out", "push", "push", "clone"]
        assert [f.fire_time for f in firings] == [f.fire_time for f in log]
        assert firings[0].metrics["stock_left"] == 0 and firings[0].outcome.startswith("paused")
        assert firings[1].outcome == "updated: delivery_rate 2 -> 3"
        assert firings[2].outcome == "updated: delivery_rate 1 -> 2" and firings[2].metrics["clicks"] == 60
        assert (
            firings[3].outcome
            == "copied to tenants/t1/campaigns/retarget-clone on tenants/t1/packs/warm-snap"
        )
    finally:
        await channel.close()
        await a_channel.close()
        await monitor.stop()
        await r_server.stop(0.2)
        await r_app.close()
        await a_server.stop(0.2)
        await a_app.close()
        await drop_stream(bus)


def test_boost_doubles_the_rate_within_the_ceiling() -> None:
    from services.monitor.rules import boost_target

    def target(rate: int, ceiling: int) -> int | None:
        campaign = campaign_pb2.Campaign(delivery_rate_per_second=rate)
        return boost_target(campaign, campaign_pb2.Rule(boost_rate_ceiling=ceiling))

    assert target(100, 1000) == 200
    assert target(600, 1000) == 1000  # never above the ceiling
    assert target(1000, 1000) is None  # at the ceiling: nothing to do
    assert target(2000, 1000) is None  # set above it by hand: a boost never lowers it
    assert target(0, 1000) is None  # unlimited already
