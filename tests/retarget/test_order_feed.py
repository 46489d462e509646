"""The order feed over real NATS JetStream: two retarget replicas on one PostgreSQL ledger follow
the stream at once, and every payment is attributed exactly once; a replica restarted from the
ledger's checkpoint repeats nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from flashcrowd.retarget.v1 import retarget_service_pb2

from services.events.bus import OutgoingBatch
from services.events.codec import batch_message_id, encode_batch
from services.events.schema import PLATFORM_OWNER, EventType
from services.retarget import repository as repo
from services.retarget.attribution import checkpoint
from tests.realtime.conftest import drop_stream, make_jetstream_bus, nats_url  # noqa: F401

from .conftest import Audience, start_rt, stop_rt
from .test_attribution import _events, _members, _order_ids
from .test_flows import two_arm_campaign

api = retarget_service_pb2


async def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_two_replicas_attribute_each_payment_once(
    pg_url: str,
    audience: Audience,
    nats_url: str,  # noqa: F811
) -> None:
    bus = await make_jetstream_bus(nats_url)
    url = f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}"
    replicas = [
        await start_rt("postgresql", pg_url, audience, bus_url=url, instance_id=f"r{i}") for i in range(2)
    ]
    try:
        rt = replicas[0]
        tenant = rt.tenant()
        campaign, _, _ = await two_arm_campaign(
            rt, tenant, audience.users[3000:3600], holdout_basis_points=2000
        )
        await rt.launch(campaign.name)
        members = await _members(rt, tenant, campaign.name)
        ids = _order_ids()
        rng = np.random.default_rng(5)
        buyers = [m for m in members if rng.random() < 0.3]
        rows = [
            (PLATFORM_OWNER, int(EventType.PAY), m["user_id"], next(ids), 1000, m["process_us"] + 10)
            for m in buyers
        ]
        frames = [_events(rows[i : i + 25]) for i in range(0, len(rows), 25)]
        batches = [
            OutgoingBatch(
                0, encode_batch(f), batch_message_id(0, f["event_id"].to_numpy() + i * 1000), f.height
            )
            for i, f in enumerate(frames)
        ]
        await bus.publish(batches[: len(batches) // 2], timeout=5)
        last = await bus.last_seq()

        async def both_caught_up() -> bool:
            return all(r.app.order_feed is not None and r.app.order_feed.seq >= last for r in replicas)

        await _wait_for(both_caught_up)
        # The second half while one replica restarts: the other goes on, the restarted one resumes.
        await stop_rt(replicas[1])
        await bus.publish(batches[len(batches) // 2 :], timeout=5)
        replicas[1] = await start_rt("postgresql", pg_url, audience, bus_url=url, instance_id="r1")
        last = await bus.last_seq()
        await _wait_for(both_caught_up)
        await bus.publish(batches[:3], timeout=5)  # the same messages again: the bus drops them

        report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
        assert sum(a.orders for a in report.arms) == len(buyers)
        assert sum(a.converters for a in report.arms) == len(buyers)
        assert sum(a.revenue_fen for a in report.arms) == 1000 * len(buyers)
        seq, through = await rt.sql(checkpoint, repo.ORDER_FEED, write=False)
        assert seq == last and through > 0
        assert report.attributed_through.ToMicroseconds() == through
    finally:
        for replica in replicas:
            await stop_rt(replica)
        await drop_stream(bus)


@pytest.mark.parametrize("bad", ["kafka://x", "http://nats:4222"])
def test_a_bad_bus_url_names_the_variable(bad: str) -> None:
    from services.retarget.config import RetargetSettings
    from services.runtime import ConfigError, load_settings

    with pytest.raises(ConfigError, match="FLASHCROWD_BUS_URL"):
        load_settings(RetargetSettings, bus_url=bad)
