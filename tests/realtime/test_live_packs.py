"""Live packs: per-minute Roaring buckets from the stream, sliding windows, rebuild, snapshot, gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import numpy as np
import polars as pl
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
from pyroaring import BitMap

from services.audience.config import AudienceSettings
from services.audience.live import Leaf, LivePackEngine, compile_live_spec
from services.audience.server import create_audience_server
from services.events.bus import MemoryBus
from services.events.ingest import EventIngestor
from services.events.schema import EVENTS_SCHEMA
from services.runtime import InvalidArgument, error_details, load_settings
from services.storage import LocalObjectStore
from tests.fixtures.channels import as_tenant, backend_channel

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
            # The tenant itself sees a disclosed size: 90 members is below the reporting minimum.
            shown = await live.GetLivePack(
                live_pack_pb2.GetLivePackRequest(name="tenants/t1/livePacks/warm"), metadata=as_tenant("t1")
            )
            assert shown.size == 0
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


# --- owners, quota, the applier thread, the dispatch --------------------------------------------


def _frame(rows: list[dict], *, owner: bool) -> pl.DataFrame:
    """Events as a decoded bus batch; ``owner`` adds the owner column (``None`` in a row: null)."""
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000) - 1_000_000
    columns: dict[str, list] = {name: [] for name in EVENTS_SCHEMA}
    owners = []
    for i, row in enumerate(rows):
        for name in EVENTS_SCHEMA:
            default = {"event_id": 10_000 + i, "bucket": 0, "ts": now_us, "event_type": CLICK}.get(name)
            columns[name].append(row.get(name, default))
        owners.append(row.get("owner"))
    frame = (
        pl.DataFrame(columns)
        .with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        .cast(dict(EVENTS_SCHEMA))
    )
    return frame.with_columns(pl.Series("owner", owners, dtype=pl.Utf8)) if owner else frame


async def test_live_packs_count_only_their_tenants_and_the_platforms_events() -> None:
    engine = LivePackEngine(MemoryBus(4))
    for tenant in ("t1", "t2"):
        await engine.create(tenant, "clickers", "", behavior(CLICK, 15))
        await engine.create(tenant, "bought", "", behavior(PAY, 15, item_ids=[7]))
    # The stream before owners were stamped: no owner column, every event is the platform's.
    engine.apply(_frame([{"user_id": u} for u in (1, 2)], owner=False), 1)
    assert sorted(engine.live_members("t1", "clickers")[1]) == [1, 2]
    assert sorted(engine.live_members("t2", "clickers")[1]) == [1, 2]
    # With owners: the platform's behaviour, each tenant's own conversions, and a null (the platform's).
    engine.apply(
        _frame(
            [
                {"user_id": 10, "owner": "_platform"},
                {"user_id": 11, "owner": "t1"},
                {"user_id": 12, "owner": "t2"},
                {"user_id": 13, "owner": None},
                {"user_id": 14, "owner": "t1", "event_type": PAY, "item_id": 7, "amount_fen": 2990},
                {"user_id": 15, "owner": "t2", "event_type": PAY, "item_id": 7, "amount_fen": 2990},
            ],
            owner=True,
        ),
        2,
    )
    assert sorted(engine.live_members("t1", "clickers")[1]) == [1, 2, 10, 11, 13]
    assert sorted(engine.live_members("t2", "clickers")[1]) == [1, 2, 10, 12, 13]
    assert list(engine.live_members("t1", "bought")[1]) == [14]
    assert list(engine.live_members("t2", "bought")[1]) == [15]
    # A batch where every event is another tenant's changes nothing for t1.
    before = engine.get("t1", "clickers").version
    engine.apply(_frame([{"user_id": 20, "owner": "t2"}], owner=True), 3)
    assert (
        engine.get("t1", "clickers").version == before and 20 not in engine.live_members("t1", "clickers")[1]
    )
    assert 20 in engine.live_members("t2", "clickers")[1]


def _reference(leaf: Leaf, frame: pl.DataFrame) -> set[int]:
    """The leaf's users by a plain polars filter (the engine's numpy/dispatch path must agree)."""
    expr = pl.col("event_type").is_in(sorted(leaf.types))
    for column, values in (
        ("item_id", leaf.item_ids),
        ("category_id", leaf.category_ids),
        ("campaign_id", leaf.campaign_ids),
        ("video_id", leaf.video_ids),
    ):
        if values:
            expr &= pl.col(column).is_in(sorted(values))
    if leaf.min_fen:
        expr &= pl.col("amount_fen") >= leaf.min_fen
    if leaf.max_fen:
        expr &= pl.col("amount_fen") <= leaf.max_fen
    return set(frame.filter(expr.fill_null(False)).get_column("user_id").to_list())


async def test_dispatch_and_numpy_masks_match_a_plain_filter() -> None:
    rng = np.random.default_rng(11)
    engine = LivePackEngine(MemoryBus(4))
    leaves = []
    for k in range(120):
        flt: dict = {}
        if k % 2:
            flt["item_ids"] = sorted(set(rng.integers(0, 6, 1 + k % 3).tolist()))  # 0 is "n/a": matches none
        if k % 3 == 0:
            flt["category_ids"] = [int(rng.integers(1, 4))]
        if k % 5 == 0:
            flt["campaign_ids"] = [int(rng.integers(1, 3))]
        if k % 7 == 0:
            flt["amount"] = spec_pb2.AmountRange(
                min_fen=int(rng.integers(0, 500)), max_fen=int(rng.integers(500, 900))
            )
        types = sorted(set(rng.choice([CLICK, PAY, LIVE], 1 + k % 2).tolist()))
        spec = spec_pb2.PackSpec(
            behavior=spec_pb2.BehaviorCondition(
                event_types=types, window=last(15), filter=spec_pb2.EventFilter(**flt)
            )
        )
        state = await engine.create("t", f"p{k}", "", spec)
        leaves.append((f"p{k}", next(iter(state.expr.leaves()))))
    frames = []
    for b in range(6):
        n = 400
        rows = [
            {
                "user_id": int(rng.integers(1, 3000)),
                "event_id": b * 1000 + i,
                "event_type": int(rng.choice([CLICK, PAY, LIVE])),
                "item_id": None if rng.random() < 0.2 else int(rng.integers(1, 6)),
                "category_id": None if rng.random() < 0.2 else int(rng.integers(1, 4)),
                "campaign_id": int(rng.integers(1, 3)),
                "amount_fen": None if rng.random() < 0.3 else int(rng.integers(0, 1000)),
            }
            for i in range(n)
        ]
        frames.append(_frame(rows, owner=False))
    for seq, frame in enumerate(frames[:3], 1):
        engine.apply(frame, seq)
    engine.apply(pl.concat(frames[3:]), 4)  # a merged pass, as the applier makes under load
    everything = pl.concat(frames)
    for pack_id, leaf in leaves:
        assert set(engine.live_members("t", pack_id)[1]) == _reference(leaf, everything), pack_id


async def test_batches_are_applied_off_the_event_loop_with_backpressure(tmp_path) -> None:
    bus = MemoryBus(4)
    engine = LivePackEngine(bus, LocalObjectStore(tmp_path), max_pending_batches=2)
    await engine.create("t1", "clickers", "", behavior(CLICK, 15))
    await engine.create("t2", "room", "", behavior(LIVE, 15))
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    gate = threading.Event()
    apply = engine.apply

    def watched(frame, seq, targets=None):
        threads.add(threading.get_ident())
        gate.wait(30)
        apply(frame, seq, targets)

    engine.apply = watched  # type: ignore[method-assign]
    ingest = EventIngestor(bus).ingest
    for i in range(6):  # six requests of one event: six bus messages
        await ingest([make_event(500 + i, 1, CLICK)])
    engine.start()
    try:
        await asyncio.wait_for(_until(lambda: engine._fetched >= 2), 5)
        await asyncio.sleep(0.2)
        # The applier holds the first batch, one more waits in the queue: the follower stopped fetching,
        # and the loop keeps answering reads of packs (the blocked batch holds no pack's lock).
        assert engine._fetched == 2 and not engine.ready.is_set()
        assert engine.live_members("t2", "room") == (0, BitMap())
        gate.set()
        await asyncio.wait_for(engine.ready.wait(), 10)
        assert engine.live_members("t1", "clickers")[1] == BitMap([1])
        assert engine.seq == await bus.last_seq() and threads and loop_thread not in threads
    finally:
        gate.set()
        await engine.stop()


@pytest.mark.timeout(60)
async def test_live_packs_per_tenant_quota(tmp_path) -> None:
    settings = load_settings(
        AudienceSettings,
        store_url=f"file://{tmp_path}/store",
        port=0,
        grace_seconds=0.2,
        log_json=False,
        tenant_max_live_packs=2,
    )
    server, port, app = await create_audience_server(settings)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            live = live_pack_pb2_grpc.LivePackServiceStub(channel)

            def create(tenant: str, pack_id: str, **kwargs):
                return live.CreateLivePack(
                    live_pack_pb2.CreateLivePackRequest(
                        parent=f"tenants/{tenant}",
                        live_pack_id=pack_id,
                        live_pack=live_pack_pb2.LivePack(spec=behavior(CLICK, 15)),
                    ),
                    **kwargs,
                )

            await create("t1", "a", metadata=as_tenant("t1"))
            await create("t1", "b", metadata=as_tenant("t1"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create("t1", "c", metadata=as_tenant("t1"))
            details = error_details(caught.value)
            assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "TENANT_QUOTA"
            [violation] = details.quota_failure.violations
            assert violation.subject == "tenants/t1"
            assert "FLASHCROWD_TENANT_MAX_LIVE_PACKS" in violation.description
            assert details.error_info.metadata["quota"] == "live_packs"
            # Nothing of the refused pack exists: not listed, no definition stored.
            listed = await live.ListLivePacks(live_pack_pb2.ListLivePacksRequest(parent="tenants/t1"))
            assert [p.name for p in listed.live_packs] == ["tenants/t1/livePacks/a", "tenants/t1/livePacks/b"]
            assert sorted(i.key for i in app.store.list("live/t1/")) == ["live/t1/a.json", "live/t1/b.json"]
            # Another tenant has its own quota; deleting one frees a place; platform principals are exempt.
            await create("t2", "a", metadata=as_tenant("t2"))
            await live.DeleteLivePack(
                live_pack_pb2.DeleteLivePackRequest(name="tenants/t1/livePacks/b"), metadata=as_tenant("t1")
            )
            await create("t1", "c", metadata=as_tenant("t1"))
            await create("t1", "by-platform")
            assert app.live.engine.count("t1") == 3
    finally:
        await server.stop(0.2)
        await app.close()
