"""Live packs: per-minute Roaring buckets from the stream, sliding windows, rebuild, snapshot, gRPC."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from flashcrowd.audience.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    live_pack_pb2,
    live_pack_pb2_grpc,
    pack_pb2,
    spec_pb2,
)
from google.protobuf import duration_pb2

from services.audience.config import AudienceSettings
from services.audience.live import LivePackEngine, compile_live_spec
from services.audience.server import create_audience_server
from services.events.bus import MemoryBus
from services.events.ingest import EventIngestor
from services.runtime import InvalidArgument, load_settings
from services.storage import LocalObjectStore
from tests.fixtures.channels import backend_channel

from .conftest import drop_stream, make_jetstream_bus
from .events import make_event

CLICK, PAY, LIVE = events_pb2.EVENT_TYPE_CLICK, events_pb2.EVENT_TYPE_PAY, events_pb2.EVENT_TYPE_LIVE_ENTER


def last(minutes: int) -> spec_pb2.TimeWindow:
    return spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=60 * minutes))


def behavior(event_type: int, minutes: int, **flt) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(
            event_types=[event_type], window=last(minutes), filter=spec_pb2.EventFilter(**flt)
        )
    )


def clicked_not_paid(minutes: int = 15) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(
        exclude=spec_pb2.ExcludeOperands(
            base=behavior(CLICK, minutes, item_ids=[100001]), subtract=[behavior(PAY, minutes)]
        )
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def pump(engine: LivePackEngine, bus: MemoryBus) -> None:
    sub = await bus.subscribe("t", start_seq=engine.seq + 1)
    from services.events.codec import decode_batch

    for d in await sub.fetch(10_000, 0):
        engine.apply(decode_batch(d.payload), d.seq)


def test_specs_that_cannot_be_live_are_refused() -> None:
    absolute = spec_pb2.PackSpec(behavior=spec_pb2.BehaviorCondition(event_types=[CLICK]))
    absolute.behavior.window.absolute.start_time.seconds = 1
    with pytest.raises(InvalidArgument):
        compile_live_spec(absolute)
    with pytest.raises(InvalidArgument):
        compile_live_spec(spec_pb2.PackSpec(profile=spec_pb2.ProfileFilter(regions=["CN-GD"])))
    counted = behavior(CLICK, 5)
    counted.behavior.min_count = 3
    with pytest.raises(InvalidArgument):
        compile_live_spec(counted)
    with pytest.raises(InvalidArgument):
        compile_live_spec(behavior(CLICK, 60 * 25))


async def test_clicked_not_paid_slides_with_the_clock(tmp_path) -> None:
    bus, clock = MemoryBus(4), FakeClock()
    engine = LivePackEngine(bus, LocalObjectStore(tmp_path), clock=clock)
    await engine.create("t1", "warm", "clicked, not paid", clicked_not_paid(15))
    await engine.create("t1", "room", "in the live room", behavior(LIVE, 5))
    ingest = EventIngestor(bus).ingest
    now = datetime.now(UTC)
    await ingest(
        [make_event(i, i, CLICK, when=now - timedelta(minutes=2), item_id=100001) for i in range(1, 11)]
    )
    await ingest(
        [make_event(100 + i, i, PAY, when=now - timedelta(minutes=1), amount_fen=2990) for i in (2, 3)]
    )
    await ingest([make_event(200, 50, CLICK, when=now - timedelta(minutes=1), item_id=5)])  # other item
    await ingest([make_event(300 + i, i, LIVE, when=now - timedelta(seconds=30)) for i in (7, 8)])
    await ingest([make_event(400, 60, CLICK, when=now - timedelta(minutes=40), item_id=100001)])  # too old
    await pump(engine, bus)
    assert sorted(engine.live_members("t1", "warm")[1]) == [1, 4, 5, 6, 7, 8, 9, 10]
    assert sorted(engine.live_members("t1", "room")[1]) == [7, 8]
    seq, _ = engine.live_members("t1", "warm")
    assert seq == await bus.last_seq()

    clock.now += 6 * 60  # 6 minutes later: the live-room window (5 min) has passed
    assert sorted(engine.live_members("t1", "room")[1]) == []
    assert len(engine.live_members("t1", "warm")[1]) == 8
    clock.now += 12 * 60  # 18 minutes after: the clicks left the 15-minute window
    assert len(engine.live_members("t1", "warm")[1]) == 0


async def test_state_is_rebuilt_from_the_stream_on_restart(tmp_path) -> None:
    store, bus = LocalObjectStore(tmp_path), MemoryBus(4)
    first = LivePackEngine(bus, store)
    first.start()
    await first.create("t1", "warm", "", clicked_not_paid(15))
    now = datetime.now(UTC)
    await EventIngestor(bus).ingest(
        [make_event(i, i, CLICK, when=now - timedelta(minutes=3), item_id=100001) for i in range(1, 501)]
    )
    await asyncio.wait_for(_until(lambda: len(first.live_members("t1", "warm")[1]) == 500), 5)
    await first.stop()

    second = LivePackEngine(
        bus, store
    )  # a restarted process: definitions from the store, state from the stream
    assert second.load_definitions() == 1
    second.start()
    await asyncio.wait_for(second.ready.wait(), 5)
    assert second.live_members("t1", "warm")[1] == first.live_members("t1", "warm")[1]
    await second.stop()


async def _until(predicate, interval: float = 0.02) -> None:
    while not predicate():
        await asyncio.sleep(interval)


@pytest.mark.timeout(60)
async def test_grpc_live_pack_membership_and_snapshot(tmp_path, nats_url, monkeypatch) -> None:
    bus = await make_jetstream_bus(nats_url)
    monkeypatch.setenv("FLASHCROWD_BUS_URL", f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}")
    settings = load_settings(
        AudienceSettings, store_url=f"file://{tmp_path}/store", port=0, grace_seconds=0.2, log_json=False
    )
    server, port, app = await create_audience_server(settings)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            live = live_pack_pb2_grpc.LivePackServiceStub(channel)
            events = event_service_pb2_grpc.EventServiceStub(channel)
            audience = audience_service_pb2_grpc.AudienceServiceStub(channel)
            created = await live.CreateLivePack(
                live_pack_pb2.CreateLivePackRequest(
                    parent="tenants/t1",
                    live_pack_id="warm",
                    live_pack=live_pack_pb2.LivePack(
                        display_name="clicked, not paid", spec=clicked_not_paid()
                    ),
                )
            )
            assert created.name == "tenants/t1/livePacks/warm" and created.size == 0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.CreateLivePack(
                    live_pack_pb2.CreateLivePackRequest(
                        parent="tenants/t1",
                        live_pack_id="bad",
                        live_pack=live_pack_pb2.LivePack(
                            spec=spec_pb2.PackSpec(profile=spec_pb2.ProfileFilter(regions=["CN-GD"]))
                        ),
                    )
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            now = datetime.now(UTC)
            clicks = [make_event(i, i, CLICK, when=now, item_id=100001) for i in range(1, 101)]
            pays = [make_event(1000 + i, i, PAY, when=now, amount_fen=2990) for i in range(1, 11)]
            await events.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=clicks + pays))
            started = time.monotonic()
            check = audience_service_pb2.CheckMembershipRequest(
                parent="tenants/t1", packs=["tenants/t1/livePacks/warm"], user_ids=[5, 50, 100, 7777]
            )
            while True:
                reply = await audience.CheckMembership(check)
                if list(reply.results[0].members) == [False, True, True, False]:
                    break
                assert time.monotonic() - started < 5
                await asyncio.sleep(0.02)
            assert reply.results[0].version > 0

            got = await live.GetLivePack(live_pack_pb2.GetLivePackRequest(name="tenants/t1/livePacks/warm"))
            assert got.size == 90 and got.memory_bytes > 0
            snap = await live.SnapshotLivePack(
                live_pack_pb2.SnapshotLivePackRequest(name="tenants/t1/livePacks/warm", pack_id="warm-snap")
            )
            assert snap.name == "tenants/t1/packs/warm-snap" and snap.size == 90 and snap.version == 1
            assert snap.source == pack_pb2.Pack.SOURCE_LIVE_SNAPSHOT
            fetched = await audience.GetPack(audience_service_pb2.GetPackRequest(name=snap.name))
            assert fetched.size == 90
            frozen = await audience.CheckMembership(
                audience_service_pb2.CheckMembershipRequest(
                    parent="tenants/t1", packs=[snap.name], user_ids=[5, 50]
                )
            )
            assert list(frozen.results[0].members) == [False, True]

            listed = await live.ListLivePacks(live_pack_pb2.ListLivePacksRequest(parent="tenants/t1"))
            assert [p.name for p in listed.live_packs] == ["tenants/t1/livePacks/warm"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await live.GetLivePack(live_pack_pb2.GetLivePackRequest(name="tenants/t2/livePacks/warm"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(0.2)
        await app.close()
        await drop_stream(bus)
