"""A lookalike seeded by a live-pack snapshot, refreshed when a new snapshot lands (issue 15, items 6-7):
the real audience server on the machine's NATS JetStream, a generated world, the real refresh path."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from flashcrowd.audience.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    live_pack_pb2,
    live_pack_pb2_grpc,
    lookalike_pb2,
    lookalike_pb2_grpc,
    pack_pb2,
    spec_pb2,
)
from google.protobuf import duration_pb2

from services.audience.lookalike.refresh import due_refreshes, run_refreshes
from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore
from tests.audience.service.conftest import start_service, stop_service

from .conftest import drop_stream, make_jetstream_bus
from .events import make_event

CLICK = events_pb2.EVENT_TYPE_CLICK
LIVE_SPEC_ITEM = 424242  # an item of no generated event: only the live clicks below touch it


async def _until(predicate, seconds: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_live_snapshot_seeds_a_lookalike_and_a_new_snapshot_refreshes_it(
    tmp_path, nats_url, monkeypatch
) -> None:
    bus = await make_jetstream_bus(nats_url)
    monkeypatch.setenv("FLASHCROWD_BUS_URL", f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}")
    store = LocalObjectStore(tmp_path / "store")
    generate(store, GenConfig(users=3_000, days=2, seed=9))
    svc = await start_service("local", store, (tmp_path / "store").as_uri())
    try:
        lookalike = lookalike_pb2_grpc.LookalikeServiceStub(svc.channel)
        live = live_pack_pb2_grpc.LivePackServiceStub(svc.channel)
        events = event_service_pb2_grpc.EventServiceStub(svc.channel)
        op = await lookalike.TrainLookalikeModel(lookalike_pb2.TrainLookalikeModelRequest(model_id="m1"))
        assert not (await svc.wait(op.name)).HasField("error")

        spec = spec_pb2.PackSpec(
            behavior=spec_pb2.BehaviorCondition(
                event_types=[CLICK],
                window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=900)),
                filter=spec_pb2.EventFilter(item_ids=[LIVE_SPEC_ITEM]),
            )
        )
        name = "tenants/acme/livePacks/live-clickers"
        await live.CreateLivePack(
            live_pack_pb2.CreateLivePackRequest(
                parent="tenants/acme",
                live_pack_id="live-clickers",
                live_pack=live_pack_pb2.LivePack(spec=spec),
            )
        )

        async def click(users: range, first_id: int) -> None:
            now = datetime.now(UTC)
            batch = [make_event(first_id + u, u, CLICK, when=now, item_id=LIVE_SPEC_ITEM) for u in users]
            await events.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=batch))

        async def live_size(expected: int) -> bool:
            got = await live.GetLivePack(live_pack_pb2.GetLivePackRequest(name=name))
            return got.size == expected

        await click(range(1, 301, 2), 10_000)  # 150 users of the world
        await _until(lambda: live_size(150))
        snapshot = live_pack_pb2.SnapshotLivePackRequest(name=name, pack_id="live-seed")
        seed = await live.SnapshotLivePack(snapshot)
        assert seed.source == pack_pb2.Pack.SOURCE_LIVE_SNAPSHOT and seed.size == 150 and seed.version == 1

        op = await lookalike.ExpandLookalike(
            lookalike_pb2.ExpandLookalikeRequest(
                parent="tenants/acme", seed_pack=seed.name, pack_id="live-lal", reach_fraction=0.05
            )
        )
        done = await svc.wait(op.name)
        assert not done.HasField("error"), done.error
        first = lookalike_pb2.ExpandLookalikeResponse()
        done.response.Unpack(first)
        # (bots are removed from seeds; the world has a few)
        assert 100 <= first.seed_matched <= 150 and first.seed_pack_version == 1 and first.pack.size == 150
        # The live spec's behaviour (clicks on that item) is kept out of the features.
        assert [list(e.item_ids) for e in first.feature_exclusions] == [[LIVE_SPEC_ITEM]]

        packs = svc.app.packs
        assert [d.pack_id for d in due_refreshes(store, "lookalike/", packs, datetime.now(UTC))[0]] == []
        # More live clickers, a new snapshot into the same pack: the lookalike is due and refreshes.
        await click(range(301, 401, 2), 20_000)
        await _until(lambda: live_size(200))
        assert (await live.SnapshotLivePack(snapshot)).version == 2
        due, _ = due_refreshes(store, "lookalike/", packs, datetime.now(UTC))
        assert [(d.pack_id, d.reasons) for d in due] == [("live-lal", (f"seed: {seed.name} v1 -> v2",))]
        outcomes = run_refreshes(store, "lookalike/", packs, lambda: svc.dataset, due, min_seed=100)
        assert [(o.status, o.version) for o in outcomes] == [("refreshed", 2)]
        members, pack = packs.load_bitmap("acme", "live-lal")
        assert [(i.pack, i.version) for i in pack.inputs] == [(seed.name, 2)]
        seed_members, _ = packs.load_bitmap("acme", "live-seed")
        assert len(seed_members) == 200 and len(members) == 150 and not (members & seed_members)
    finally:
        await stop_service(svc)
        await drop_stream(bus)
