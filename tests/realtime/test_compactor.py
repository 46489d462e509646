"""Compactor: micro-batches into the day-partitioned dataset, manifest last, exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from services.events.append import read_dataset_manifest
from services.events.bus import MemoryBus
from services.events.compactor import Compactor
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.events.ingest import EventIngestor
from services.storage import LocalObjectStore, verify_manifest

from .conftest import drop_stream, make_jetstream_bus
from .events import make_events

ROOT = Path(__file__).resolve().parents[2]


async def drain(compactor: Compactor, rounds: int = 5) -> None:
    for _ in range(rounds):
        await compactor.step(timeout=0.05)
    await compactor.flush()


async def test_micro_batches_by_size_land_in_day_partitions(local_store: LocalObjectStore) -> None:
    bus = MemoryBus(4)
    ingestor = EventIngestor(bus)
    now = datetime.now(UTC)
    await ingestor.ingest(make_events(3000, when=now - timedelta(days=1)))
    await ingestor.ingest(make_events(2000, first_id=10_000, when=now - timedelta(seconds=5)))
    compactor = Compactor(local_store, bus, max_events=1500, max_age=3600)
    await drain(compactor)
    assert compactor.stats.events_written == 5000
    assert compactor.stats.batches >= 3  # size bound, not one big batch

    dataset = EventDataset(local_store)
    assert len(dataset.days()) == 2
    events = dataset.scan_events().collect()
    assert events.height == 5000 and events["event_id"].n_unique() == 5000
    manifest = read_dataset_manifest(local_store, "data/")
    assert manifest["ingest"]["compactor"]["seq"] == await bus.last_seq()
    assert manifest["ingest"]["compactor"]["events"] == 5000
    assert verify_manifest(local_store, read_dataset_manifest(local_store, "data/"), check_hashes=True) == []
    # Parts are sorted by (bucket, user_id, ts) like the generator's.
    part = pl.read_parquet(local_store.scan_target(dataset.parts("events")[0]["key"])[0])
    assert part.equals(part.sort(["bucket", "user_id", "ts"]))


async def test_age_bound_publishes_a_small_batch(local_store: LocalObjectStore) -> None:
    bus = MemoryBus(4)
    await EventIngestor(bus).ingest(make_events(10))
    compactor = Compactor(local_store, bus, max_events=1_000_000, max_age=0.3)
    started = time.monotonic()
    while compactor.stats.events_written == 0 and time.monotonic() - started < 5:
        await compactor.step(timeout=0.1)
    assert compactor.stats.events_written == 10
    assert 0.25 < time.monotonic() - started < 2.0


async def test_rebatched_retries_are_dropped_by_event_id(local_store: LocalObjectStore) -> None:
    bus = MemoryBus(4)
    ingestor = EventIngestor(bus)
    events = make_events(1000)
    await ingestor.ingest(events)
    compactor = Compactor(local_store, bus, max_events=100_000, max_age=3600)
    await drain(compactor)
    # The client retries half of them inside a different request: other message ids, same event ids.
    await ingestor.ingest([*events[::2], *make_events(5, first_id=50_000)])
    await drain(compactor)
    # A fresh compactor (restart) re-reads the day's ids from the dataset.
    await ingestor.ingest(events[1::2])
    restarted = Compactor(local_store, bus, max_events=100_000, max_age=3600)
    await drain(restarted)
    stored = EventDataset(local_store).scan_events().collect()
    assert stored.height == 1005 and stored["event_id"].n_unique() == 1005
    assert compactor.stats.duplicates_dropped == 500 and restarted.stats.duplicates_dropped == 500


async def test_appends_to_a_generated_dataset(local_store: LocalObjectStore) -> None:
    generate(local_store, GenConfig(users=2000, days=2, seed=3))
    before = EventDataset(local_store)
    base_rows = before.scan_events().select(pl.len()).collect().item()
    bus = MemoryBus(4)
    await EventIngestor(bus, retention=timedelta(days=10_000)).ingest(
        make_events(700, first_id=1 << 60, when=before.end - timedelta(minutes=1))
    )
    await drain(Compactor(local_store, bus, max_age=3600))
    after = EventDataset(local_store)
    assert after.version == before.version + 1
    assert after.scan_events().select(pl.len()).collect().item() == base_rows + 700
    assert after.population_size() == before.population_size() and after.world == before.world
    assert after.end >= before.end
    assert verify_manifest(local_store, read_dataset_manifest(local_store, "data/"), check_hashes=True) == []


# ---------------------------------------------------------------------------------------------------
# SIGKILL mid-batch, real processes, real NATS


def start_compactor(
    bus,
    store_root: Path,
    before_manifest: float = 0,
    before_ack: float = 0,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    env = {
        **os.environ,
        "FLASHCROWD_BUS_URL": f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}",
        "FLASHCROWD_BUS_SHARDS": str(bus.shard_count),
        "FLASHCROWD_STORE_URL": f"file://{store_root}",
        "FLASHCROWD_COMPACTOR_MAX_EVENTS": "3000",
        "FLASHCROWD_COMPACTOR_MAX_AGE_SECONDS": "0.5",
        "FLASHCROWD_COMPACTOR_PAUSE_BEFORE_MANIFEST_SECONDS": str(before_manifest),
        "FLASHCROWD_COMPACTOR_PAUSE_BEFORE_ACK_SECONDS": str(before_ack),
        "FLASHCROWD_LOG_JSON": "false",
        "FLASHCROWD_GRACE_SECONDS": "1",
        **(extra_env or {}),
    }
    log = store_root.parent / f"compactor-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.compactor"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
    )
    process.log = log  # type: ignore[attr-defined]
    return process


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in process.log.read_text():  # type: ignore[attr-defined]
            return
        if process.poll() is not None:
            raise AssertionError(f"compactor exited ({process.returncode}) before {needle!r}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} within {timeout}s")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


@pytest.mark.timeout(120)
async def test_sigkill_mid_batch_then_restart_is_exactly_once(tmp_path: Path, nats_url: str) -> None:
    bus = await make_jetstream_bus(nats_url)
    store_root = tmp_path / "store"
    store = LocalObjectStore(store_root)
    ingestor = EventIngestor(bus)
    ingested: set[int] = set()

    async def ingest(first_id: int, n: int) -> None:
        events = make_events(n, first_id=first_id, users=200_000)
        result = await ingestor.ingest(events)
        assert result.accepted + result.duplicates == n
        ingested.update(e.event_id for e in events)

    try:
        for k in range(5):
            await ingest(1 + 1000 * k, 1000)
        # 1) killed after uploading parts, before the manifest: orphan parts, no checkpoint move.
        first = start_compactor(bus, store_root, before_manifest=30)
        await asyncio.to_thread(wait_for_line, first, "manifest not yet published")
        kill(first)
        assert read_dataset_manifest(store, "data/") is None
        assert list(store.list("data/events/"))  # the orphan parts

        # 2) killed after the manifest, before acknowledging.
        second = start_compactor(bus, store_root, before_ack=30)
        await asyncio.to_thread(wait_for_line, second, "not yet acknowledged")
        kill(second)
        assert read_dataset_manifest(store, "data/")["ingest"]["compactor"]["seq"] > 0

        # 3) killed at an arbitrary point while events keep arriving (and some retries re-batched).
        third = start_compactor(bus, store_root)
        for k in range(5, 15):
            await ingest(1 + 1000 * k, 1000)
            await asyncio.sleep(0.05)
        retry = make_events(1000, first_id=1 + 1000 * 3, users=200_000)[::3]
        await ingestor.ingest(retry)
        await asyncio.sleep(0.3)
        kill(third)

        # 4) restart and run to completion.
        fourth = start_compactor(bus, store_root)
        last = await bus.last_seq()
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                manifest = read_dataset_manifest(store, "data/")
                if manifest and manifest["ingest"]["compactor"]["seq"] >= last:
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("compactor did not catch up")
        finally:
            fourth.send_signal(signal.SIGTERM)
            assert fourth.wait(20) == 0

        stored = EventDataset(store).scan_events(columns=["event_id"]).collect()["event_id"]
        assert stored.len() == len(ingested) == 15_000
        assert stored.n_unique() == stored.len()
        assert set(stored.to_list()) == ingested
    finally:
        await drop_stream(bus)
