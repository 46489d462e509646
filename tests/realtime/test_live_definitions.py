"""Every replica serves every live pack: definitions in the store, synced; creates fleet-safe.

Two engines stand for two audience replicas: one object store (local), one control database
(SQLite, the embedded default) for the create reservation, one in-process bus.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from flashcrowd.audience.v1 import events_pb2, spec_pb2
from google.protobuf import duration_pb2

from services.audience.control_db import ControlDatabase
from services.audience.live import LivePackEngine
from services.audience.operation_store import OperationStore
from services.audience.operations import OperationManager
from services.audience.quotas import Limit
from services.events.bus import MemoryBus
from services.events.ingest import EventIngestor
from services.runtime import AlreadyExists, NotFound, ResourceExhausted
from services.storage import LocalObjectStore

from .events import make_event

CLICK = events_pb2.EVENT_TYPE_CLICK


def clicked(minutes: int = 15) -> spec_pb2.PackSpec:
    window = spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=60 * minutes))
    return spec_pb2.PackSpec(behavior=spec_pb2.BehaviorCondition(event_types=[CLICK], window=window))


@pytest.fixture
async def replicas(tmp_path):
    store, bus = LocalObjectStore(tmp_path / "store"), MemoryBus(4)
    control = ControlDatabase("", str(tmp_path / "control.sqlite"))
    managers = [OperationManager(OperationStore(control), start_threads=False) for _ in range(2)]
    engines = [LivePackEngine(bus, store, reservations=m, sync_seconds=0.05) for m in managers]
    for engine in engines:
        engine.start()
    yield bus, engines
    for engine in engines:
        await engine.stop()
    for manager in managers:
        await manager.close(0.1)
    control.close()


async def _until(predicate, seconds: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not within the sync interval"
        await asyncio.sleep(0.02)


def _has(engine: LivePackEngine, tenant: str, pack_id: str) -> bool:
    return (tenant, pack_id) in engine.packs


async def test_a_pack_created_on_one_replica_is_served_by_the_other_with_its_members(replicas) -> None:
    bus, (a, b) = replicas
    now = datetime.now(UTC)
    await EventIngestor(bus).ingest(
        [make_event(i, i, CLICK, when=now - timedelta(minutes=2), item_id=7) for i in range(1, 41)]
    )
    await _until(lambda: a.seq > 0 and b.seq > 0)
    await a.create("t1", "warm", "", clicked())
    await _until(lambda: _has(b, "t1", "warm"))
    # b backfilled it from the stream: the same members on both.
    await _until(lambda: len(b.live_members("t1", "warm")[1]) == 40)
    assert b.live_members("t1", "warm")[1] == a.live_members("t1", "warm")[1]
    # Deleted through b: a drops it at its next sync.
    await b.delete("t1", "warm")
    await _until(lambda: not _has(a, "t1", "warm"))
    with pytest.raises(NotFound):
        a.get("t1", "warm")
    with pytest.raises(NotFound):
        await a.delete("t1", "warm")


async def test_a_read_before_the_sync_loads_the_pack(replicas) -> None:
    _, (a, b) = replicas
    b.sync_seconds = 3600.0  # b would not sync in time on its own
    await a.create("t1", "fresh", "", clicked())
    state = await b.load_one("t1", "fresh")
    assert state is not None and b.get("t1", "fresh").spec == clicked()
    assert await b.load_one("t1", "absent") is None


async def test_one_id_and_one_quota_across_replicas(replicas) -> None:
    _, (a, b) = replicas
    limit = Limit("live_packs", "FLASHCROWD_TENANT_MAX_LIVE_PACKS", 3, "live packs")
    # The same id at once on both: one create wins, the other is ALREADY_EXISTS.
    results = await asyncio.gather(
        a.create("t1", "twin", "", clicked(), limit=limit),
        b.create("t1", "twin", "", clicked(), limit=limit),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "LivePackState"], results
    # Four more at once, spread over both: the quota of 3 admits exactly 2 of them.
    results = await asyncio.gather(
        *((a if i % 2 else b).create("t1", f"p{i}", "", clicked(), limit=limit) for i in range(4)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 2 and all(isinstance(r, ResourceExhausted) for r in refused), results
    await _until(lambda: len(a.of_tenant("t1")) == len(b.of_tenant("t1")) == 3)
    # Another tenant is not counted against t1, and an id of t1 is free for t2.
    await b.create("t2", "twin", "", clicked(), limit=limit)
    with pytest.raises(AlreadyExists):
        await a.create("t2", "twin", "", clicked(), limit=limit)
