"""Campaign rules with several sale-monitor replicas: one leader (a NATS KV lease) evaluates every
tenant's campaigns (no tenant list), a rule fires and is audited once, and a survivor takes over
when the leader dies without releasing the lease."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from flashcrowd.retarget.v1 import campaign_pb2, retarget_service_pb2, sale_monitor_pb2
from google.protobuf import duration_pb2

from services.events.bus import open_bus
from services.monitor.counters import SaleMonitor
from services.monitor.lease import NatsLease
from services.monitor.rules import RuleEngine
from tests.realtime.natsserver import port_open

from .conftest import Audience, Rt, start_rt, stop_rt

STOP_NOW = campaign_pb2.Rule(
    rule_id="stop-now",
    action=campaign_pb2.Rule.ACTION_STOP,
    metric="clicks",
    comparison=campaign_pb2.Rule.COMPARISON_GREATER_OR_EQUAL,
    threshold=0,  # holds at once: the first evaluation fires
    cooldown=duration_pb2.Duration(seconds=600),
    scope=sale_monitor_pb2.SaleScope(item_ids=[1]),
)


async def _running_campaign(rt: Rt, tenant: str, users: list[int]) -> campaign_pb2.Campaign:
    pack = await rt.audience.upload(tenant, users)
    template = await rt.template(tenant)
    campaign = await rt.campaign(
        tenant, pack.name, template.name, rules=[STOP_NOW], delivery_rate_per_second=1
    )
    await rt.launch(campaign.name, wait=False)
    await rt.wait_state(
        campaign.name, (campaign_pb2.Campaign.STATE_RUNNING, campaign_pb2.Campaign.STATE_PAUSED)
    )
    return campaign


async def _firings(rt: Rt, name: str) -> int:
    report = await rt.stub.GetCampaignReport(retarget_service_pb2.GetCampaignReportRequest(campaign=name))
    return len(report.rule_firings)


@pytest.mark.timeout(120)
async def test_one_leader_fires_once_and_a_survivor_takes_over(audience: Audience, tmp_path) -> None:
    if not port_open(4222):
        pytest.skip("NATS JetStream is not running on 127.0.0.1:4222 (scripts/services.sh starts it)")
    rt = await start_rt("sqlite", f"sqlite:///{tmp_path / 'ledger.db'}", audience)
    bus = open_bus("memory://")
    monitor = SaleMonitor(bus)
    monitor.start()
    key = f"test-{uuid.uuid4().hex[:12]}"
    leases = [NatsLease("nats://127.0.0.1:4222", ttl_seconds=2.0, key=key) for _ in range(2)]
    engines = [RuleEngine(rt.stub, monitor, [], interval=0.1, lease=lease) for lease in leases]
    try:
        for engine in engines:
            engine.start()
        # Two tenants nobody configured: the rules of both run.
        users = audience.users
        first = await _running_campaign(rt, rt.tenant(), users[:20])
        other = await _running_campaign(rt, rt.tenant(), users[20:40])
        for name in (first.name, other.name):
            paused = await rt.wait_state(name, (campaign_pb2.Campaign.STATE_PAUSED,), timeout=20)
            assert paused.state == campaign_pb2.Campaign.STATE_PAUSED
        await asyncio.sleep(1.0)  # several more evaluations by both replicas
        assert await _firings(rt, first.name) == 1 and await _firings(rt, other.name) == 1
        holders = [lease for lease in leases if lease._revision is not None]
        assert len(holders) == 1, "exactly one replica holds the lease"
        leader = engines[leases.index(holders[0])]
        survivor = engines[1 - leases.index(holders[0])]
        # The leader dies (like SIGKILL: no release); the survivor takes over once the lease expires.
        assert leader._task is not None
        leader._task.cancel()
        third = await _running_campaign(rt, rt.tenant(), users[40:60])
        paused = await rt.wait_state(third.name, (campaign_pb2.Campaign.STATE_PAUSED,), timeout=15)
        assert paused.state == campaign_pb2.Campaign.STATE_PAUSED
        assert await _firings(rt, third.name) == 1
        assert survivor.lease is not None and survivor.lease._revision is not None  # type: ignore[attr-defined]
    finally:
        for engine in engines:
            await engine.stop()
        await monitor.stop()
        await bus.close()
        await stop_rt(rt)
