"""Compactor into the event lake: exactly once across SIGKILL, for one and for two replicas.

Real processes (``python -m services.compactor``), real NATS JetStream, the lake on a local store.
The stream position is the Delta application transaction committed with the rows, so a kill at any
point (before the commit, after it but before the acknowledgement, or anywhere while events keep
arriving) leaves every acknowledged event in the table exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from services.events.bus import MemoryBus
from services.events.compactor import Compactor
from services.events.dataset import EventDataset
from services.events.ingest import EventIngestor
from services.events.lake import TableWriter
from services.storage import LocalObjectStore, ObjectStore

from .conftest import drop_stream, make_jetstream_bus
from .events import make_events
from .test_compactor import drain, kill, start_compactor, wait_for_line


async def test_micro_batches_commit_with_their_stream_position(any_store: ObjectStore) -> None:
    bus = MemoryBus(4)
    ingestor = EventIngestor(bus)
    now = datetime.now(UTC)
    await ingestor.ingest(make_events(3000, when=now - timedelta(days=1)))
    await ingestor.ingest(make_events(2000, first_id=10_000, when=now - timedelta(seconds=5)))
    compactor = Compactor(any_store, bus, max_events=1500, max_age=3600, table_format="delta")
    await drain(compactor)
    assert compactor.stats.events_written == 5000 and compactor.stats.batches >= 3
    dataset = EventDataset(any_store)
    assert dataset.lake is not None and len(dataset.days()) == 2
    events = dataset.scan_events().collect()
    assert events.height == 5000 and events["event_id"].n_unique() == 5000
    assert TableWriter(any_store, "data/").committed("events", "compactor") == await bus.last_seq()
    # Re-batched retries (other message ids, same event ids) are dropped against the table.
    await ingestor.ingest(make_events(1000, when=now - timedelta(days=1)))
    restarted = Compactor(any_store, bus, max_events=100_000, max_age=3600)
    await drain(restarted)
    assert restarted.stats.duplicates_dropped == 1000
    assert EventDataset(any_store).scan_events().select(pl.len()).collect().item() == 5000


async def test_replicas_need_their_own_consumer_only_on_a_lake(local_store: LocalObjectStore) -> None:
    from services.events.generator import GenConfig, generate

    generate(local_store, GenConfig(users=500, days=1), table_format="manifest")
    compactor = Compactor(local_store, MemoryBus(4), shards=[0, 1])
    with pytest.raises(ValueError, match="shard ranges need a lake"):
        await compactor.step(timeout=0.01)


def _settings(consumer: str, shards: str) -> dict[str, str]:
    return {
        "FLASHCROWD_TABLE_FORMAT": "delta",
        "FLASHCROWD_COMPACTOR_CONSUMER": consumer,
        "FLASHCROWD_COMPACTOR_SHARDS": shards,
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("replicas", [1, 2])
async def test_sigkill_then_restart_is_exactly_once(tmp_path: Path, nats_url: str, replicas: int) -> None:
    bus = await make_jetstream_bus(nats_url)
    store_root = tmp_path / "store"
    store = LocalObjectStore(store_root)
    ingestor = EventIngestor(bus)
    ingested: set[int] = set()
    groups = [("compactor", "")] if replicas == 1 else [("compactor-a", "0-1"), ("compactor-b", "2-3")]

    async def ingest(first_id: int, n: int) -> None:
        events = make_events(n, first_id=first_id, users=200_000)
        result = await ingestor.ingest(events)
        assert result.accepted + result.duplicates == n
        ingested.update(e.event_id for e in events)

    def start(consumer: str, shards: str, **pauses: float):
        return start_compactor(bus, store_root, extra_env=_settings(consumer, shards), **pauses)

    try:
        for k in range(5):
            await ingest(1 + 1000 * k, 1000)
        # 1) killed before the commit: nothing in the table, no position.
        first = [start(c, s, before_manifest=30) for c, s in groups]
        for p in first:
            await asyncio.to_thread(wait_for_line, p, "lake commit not yet made")
            kill(p)
        # 2) killed after the commit, before acknowledging: the position is in the table.
        second = [start(c, s, before_ack=30) for c, s in groups]
        for p in second:
            await asyncio.to_thread(wait_for_line, p, "not yet acknowledged")
            kill(p)
        writer = TableWriter(store, "data/")
        assert all((writer.committed("events", c) or 0) > 0 for c, _ in groups)
        # 3) killed at arbitrary points while events keep arriving (and retries are re-batched).
        third = [start(c, s) for c, s in groups]
        for k in range(5, 15):
            await ingest(1 + 1000 * k, 1000)
            await asyncio.sleep(0.05)
        await ingestor.ingest(make_events(1000, first_id=1 + 1000 * 3, users=200_000)[::3])
        await asyncio.sleep(0.3)
        for p in third:
            kill(p)
        # 4) restart and run until every event is in (each replica's position only covers its shards).
        fourth = [start(c, s) for c, s in groups]
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline:
                dataset = EventDataset(store)
                if dataset.scan_events().select(pl.len()).collect().item() >= len(ingested):
                    break
                await asyncio.sleep(0.3)
            else:
                raise AssertionError("compactors did not catch up")
        finally:
            for p in fourth:
                p.send_signal(signal.SIGTERM)
            assert [p.wait(30) for p in fourth] == [0] * len(fourth)

        stored = EventDataset(store).scan_events(columns=["event_id"]).collect()["event_id"]
        assert stored.len() == len(ingested) == 15_000
        assert stored.n_unique() == stored.len()
        assert set(stored.to_list()) == ingested
    finally:
        await drop_stream(bus)


@pytest.mark.timeout(180)
async def test_object_store_down_during_commits_backs_off_and_loses_nothing(caplog) -> None:
    """The S3 server stops while batches are due: commits fail fast, the compactor backs off and
    re-reads its position; once the server is back every event is in the table exactly once."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    from services.storage import MinioObjectStore
    from tests.fixtures.s3server import S3_ACCESS_KEY, S3_SECRET_KEY, unique_bucket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    store = MinioObjectStore(f"127.0.0.1:{port}", S3_ACCESS_KEY, S3_SECRET_KEY, unique_bucket(), secure=False)
    bus = MemoryBus(4)
    ingestor = EventIngestor(bus)
    compactor = Compactor(store, bus, max_events=500, max_age=0.2, table_format="delta")
    try:
        await ingestor.ingest(make_events(1000))
        await drain(compactor)
        assert compactor.stats.events_written == 1000
        server.stop()  # the store goes away (moto keeps its buckets in this process)
        await ingestor.ingest(make_events(1000, first_id=5000))
        runner = asyncio.create_task(compactor.run())
        with caplog.at_level(logging.WARNING, logger="services.events.compactor"):
            while not any("retrying in" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
            assert compactor.stats.events_written == 1000  # nothing committed while down
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            while compactor.stats.events_written < 2000:
                await asyncio.sleep(0.1)
        compactor.stop()
        await runner
        ids = EventDataset(store).scan_events(columns=["event_id"]).collect()["event_id"]
        assert ids.len() == ids.n_unique() == 2000
        assert TableWriter(store, "data/").committed("events", "compactor") == await bus.last_seq()
    finally:
        server.stop()
