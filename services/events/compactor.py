"""The compactor: ingested events from the bus into the day-partitioned Parquet dataset, exactly once.

Loop: fetch messages from a durable consumer -> buffer -> when the buffer holds
``FLASHCROWD_COMPACTOR_MAX_EVENTS`` events or its first message has waited
``FLASHCROWD_COMPACTOR_MAX_AGE_SECONDS`` (default 60 s), publish a micro-batch with
``services.events.append.append_events`` (parts first, manifest last) -> acknowledge its messages.

Exactly once, across crashes:

* The manifest stores the compactor's checkpoint (``ingest.<consumer>.seq``: the last stream
  sequence whose events are in the dataset) in the same write that adds the parts. On start the
  compactor reads it and (re)creates its consumer at ``seq + 1``; messages at or below it are skipped.
  A crash before the manifest lands loses nothing (the messages were not acknowledged and are read
  again); a crash after it duplicates nothing (the checkpoint already moved).
* Event ids, per owner: an event is ``(owner, event_id)``. A micro-batch keeps the first of each
  ``(owner, event_id)`` and drops those already appended on the same day (the day's ingested parts,
  loaded once per day into one Roaring64 bitmap per owner), so client retries that re-batched the
  same events (different message ids, or after the stream's de-duplication window) are stored once
  as well, while another owner's events with the same ids are kept: one tenant cannot squat the ids
  of another's events. Rows are written with their ``owner``.

``python -m services.compactor`` (``services/compactor``) runs it as its own process with health
checks and graceful shutdown (SIGTERM: stop fetching, publish the buffer, acknowledge, exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from pyroaring import BitMap64

from services.events.append import append_events, ingest_checkpoint, ingest_event_keys, read_dataset_manifest
from services.events.bus import BusUnavailable, Delivery, EventBus, Subscription
from services.events.codec import decode_batch
from services.events.config import RealtimeSettings
from services.events.lake.descriptor import read_descriptor
from services.events.lake.stream import LakeAppender
from services.events.parts import default_table_format
from services.events.schema import OWNER
from services.storage import ObjectStore

__all__ = ["Compactor", "CompactorStats", "compactor_from_settings"]

logger = logging.getLogger(__name__)


@dataclass
class CompactorStats:
    batches: int = 0
    events_written: int = 0
    duplicates_dropped: int = 0
    messages: int = 0
    checkpoint: int = 0


class Compactor:
    def __init__(
        self,
        store: ObjectStore,
        bus: EventBus,
        *,
        prefix: str = "data/",
        consumer: str = "compactor",
        max_events: int = 500_000,
        max_age: float = 60.0,
        fetch_messages: int = 256,
        seen_days: int = 8,
        pause_before_manifest: float = 0.0,
        pause_before_ack: float = 0.0,
        shards: Sequence[int] | None = None,
        table_format: str | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.prefix = prefix
        self.consumer = consumer
        self.max_events = max_events
        self.max_age = max_age
        self.fetch_messages = fetch_messages
        self.seen_days = seen_days
        #: Bus shards this replica reads (None: all). Replicas over disjoint shard ranges each need
        #: their own ``consumer`` (the lake's application id); only a lake takes several replicas.
        self.shards = None if shards is None else sorted(set(shards))
        #: For an empty prefix: which dataset to start (None: $FLASHCROWD_TABLE_FORMAT, else manifest).
        self.table_format = table_format
        self._lake: LakeAppender | None = None
        #: Fault injection (tests SIGKILL the process inside these pauses).
        self.pause_before_manifest = pause_before_manifest
        self.pause_before_ack = pause_before_ack
        self.stats = CompactorStats()
        self._buffer: list[Delivery] = []
        self._buffered_events = 0
        self._first_at: float | None = None
        self._avg_count = 1000.0
        #: day -> owner -> event ids appended that day (the ``seen_days`` most recently used days)
        self._seen: OrderedDict[str, dict[str, BitMap64]] = OrderedDict()
        self._manifest: dict[str, Any] | None = None
        self._sub: Subscription | None = None
        self._stopping = asyncio.Event()

    # ---- state ----------------------------------------------------------------------------------

    def _open_target(self) -> int:
        """Which dataset the batches go to (a lake or a manifest dataset) and its checkpoint."""
        self._manifest = read_dataset_manifest(self.store, self.prefix)
        lake = read_descriptor(self.store, self.prefix) is not None
        if not lake and self._manifest is None:
            lake = (self.table_format or default_table_format()) == "delta"
        if lake:
            self._lake = LakeAppender(self.store, self.prefix, self.consumer)
            self._lake.ensure_lake()
            return self._lake.checkpoint()
        if self.shards is not None:
            raise ValueError(
                "a manifest dataset takes one compactor over every shard; shard ranges need a lake"
            )
        self._lake = None
        return int(ingest_checkpoint(self._manifest, self.consumer).get("seq", 0))

    async def _open(self) -> None:
        self.stats.checkpoint = await asyncio.to_thread(self._open_target)
        self._sub = await self.bus.subscribe(
            self.consumer,
            start_seq=self.stats.checkpoint + 1,
            durable=True,
            shards=self.shards,
            ack_wait=max(self.max_age * 2 + 60.0, 120.0),
        )
        logger.info("compactor: resuming after stream sequence %d", self.stats.checkpoint)

    def _seen_ids(self, dt: str) -> dict[str, BitMap64]:
        """owner -> ids appended on day ``dt`` (loaded from the day's ingested parts on first use)."""
        ids = self._seen.get(dt)
        if ids is None:
            if self._lake is not None:
                existing = self._lake.event_keys(dt)
            else:
                existing = ingest_event_keys(self.store, self._manifest or {}, dt)
            ids = {
                str(owner): BitMap64(part.get_column("event_id").to_numpy())
                for (owner,), part in existing.partition_by(OWNER, as_dict=True).items()
            }
            self._seen[dt] = ids
            while len(self._seen) > self.seen_days:
                self._seen.popitem(last=False)
        self._seen.move_to_end(dt)
        return ids

    # ---- micro-batches --------------------------------------------------------------------------

    def _deduplicate(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The first of each ``(owner, event_id)`` not appended yet on its day, in stream order."""
        frame = frame.unique(subset=[OWNER, "event_id"], keep="first", maintain_order=True)
        frame = frame.with_columns(pl.col("ts").dt.date().cast(pl.Utf8).alias("_dt"))
        keep: list[pl.DataFrame] = []
        for (dt, owner), part in frame.partition_by("_dt", OWNER, as_dict=True, maintain_order=True).items():
            seen = self._seen_ids(str(dt)).get(str(owner))
            if seen:
                again = BitMap64(part.get_column("event_id").to_numpy()) & seen
                if again:
                    part = part.filter(~pl.col("event_id").is_in(list(again)))
            keep.append(part)
        return pl.concat(keep).drop("_dt") if keep else frame.drop("_dt")

    def _publish(self, deliveries: list[Delivery]) -> tuple[int, int]:
        """Write the events of ``deliveries`` (blocking; runs in a thread). Returns (written, dropped)."""
        first, last = deliveries[0].seq, deliveries[-1].seq
        frames = [decode_batch(d.payload) for d in deliveries]
        frame = pl.concat(frames) if frames else pl.DataFrame()
        total = frame.height
        fresh = self._deduplicate(frame) if total else frame
        checkpoint = {"seq": last, "stream": getattr(self.bus, "stream", self.bus.url)}
        if self._lake is not None:
            if self.pause_before_manifest:
                logger.warning("compactor: batch decoded, lake commit not yet made (crash window)")
                time.sleep(self.pause_before_manifest)
            self._lake.commit(fresh, last_seq=last, metadata={**checkpoint, "first_seq": first})
        else:
            self._manifest = append_events(
                self.store,
                self.prefix,
                fresh,
                part_tag=f"ingest-{first:012d}-{last:012d}",
                consumer=self.consumer,
                checkpoint=checkpoint,
                before_manifest=self._pause if self.pause_before_manifest else None,
            )
        for (dt, owner), part in (
            fresh.with_columns(pl.col("ts").dt.date().cast(pl.Utf8).alias("_dt"))
            .partition_by("_dt", OWNER, as_dict=True)
            .items()
        ):
            seen = self._seen_ids(str(dt))
            seen.setdefault(str(owner), BitMap64()).update(part.get_column("event_id").to_numpy())
        return fresh.height, total - fresh.height

    def _pause(self) -> None:
        logger.warning("compactor: parts uploaded, manifest not yet published (crash window)")
        time.sleep(self.pause_before_manifest)

    async def flush(self) -> int:
        """Publish the buffer (if any), then acknowledge its messages. Returns events written."""
        if not self._buffer:
            return 0
        deliveries = [d for d in self._buffer if d.seq > self.stats.checkpoint]
        skipped = [d for d in self._buffer if d.seq <= self.stats.checkpoint]
        written = dropped = 0
        if deliveries:
            written, dropped = await asyncio.to_thread(self._publish, deliveries)
            self.stats.checkpoint = max(self.stats.checkpoint, deliveries[-1].seq)
            if written:
                logger.info(
                    "compactor: published %d events (%d duplicates dropped) up to sequence %d",
                    written,
                    dropped,
                    self.stats.checkpoint,
                )
                if self.pause_before_ack:
                    logger.warning("compactor: batch committed, not yet acknowledged (crash window)")
                    await asyncio.sleep(self.pause_before_ack)
        for d in [*skipped, *deliveries]:
            with contextlib.suppress(Exception):  # an unacknowledged message is skipped by seq later
                await d.ack()
        self.stats.batches += 1 if written else 0
        self.stats.events_written += written
        self.stats.duplicates_dropped += dropped
        self.stats.messages += len(self._buffer)
        self._buffer = []
        self._buffered_events = 0
        self._first_at = None
        return written

    def _due(self) -> bool:
        if not self._buffer:
            return False
        if self._buffered_events >= self.max_events:
            return True
        return self._first_at is not None and time.monotonic() - self._first_at >= self.max_age

    async def step(self, timeout: float = 1.0) -> None:
        """One fetch (bounded by the buffer's remaining age) and a flush when due."""
        if self._sub is None:
            await self._open()
        assert self._sub is not None
        if self._first_at is not None:
            timeout = max(0.0, min(timeout, self._first_at + self.max_age - time.monotonic()))
        # Messages carry up to 1,000 events: ask for about as many as the size bound has room for.
        remaining = self.max_events - self._buffered_events
        room = max(1, min(self.fetch_messages, -(-remaining // max(1, int(self._avg_count)))))
        deliveries = await self._sub.fetch(room, timeout)
        if deliveries and self.shards is not None:
            # The bus filters by shard on NATS >= 2.10 (several filter subjects); older servers
            # deliver every shard, so a replica also drops other shards' messages itself. They
            # are acknowledged on this replica's own consumer only: their owner has its own.
            others = [d for d in deliveries if d.shard not in self.shards]
            if others:
                wanted = set(self.shards)
                deliveries = [d for d in deliveries if d.shard in wanted]
                for d in others:
                    with contextlib.suppress(Exception):
                        await d.ack()
        if deliveries:
            self._avg_count = 0.8 * self._avg_count + 0.2 * (
                sum(d.count for d in deliveries) / len(deliveries)
            )
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._buffer.extend(deliveries)
            self._buffered_events += sum(d.count for d in deliveries)
        if self._due():
            await self.flush()

    async def run(self) -> None:
        """Until ``stop()``: fetch and publish; on stop, publish what is buffered."""
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                await self.step()
                backoff = 0.5
            except BusUnavailable as error:
                logger.warning("compactor: bus unavailable (%s); retrying in %.1fs", error, backoff)
                self._sub = None
                self._drop_buffer()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                logger.exception("compactor: publish failed; retrying in %.1fs", backoff)
                self._sub = None  # re-read the manifest and start over from its checkpoint
                self._drop_buffer()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
        with contextlib.suppress(Exception):
            await self.flush()
        if self._sub is not None:
            await self._sub.close()

    def _drop_buffer(self) -> None:
        # Unacknowledged: the consumer is re-created from the manifest's checkpoint.
        self._buffer, self._buffered_events, self._first_at = [], 0, None

    def stop(self) -> None:
        self._stopping.set()


def compactor_from_settings(settings: RealtimeSettings, store: ObjectStore, bus: EventBus) -> Compactor:
    return Compactor(
        store,
        bus,
        prefix=settings.dataset_prefix,
        consumer=settings.compactor_consumer,
        max_events=settings.compactor_max_events,
        max_age=settings.compactor_max_age_seconds,
        pause_before_manifest=settings.compactor_pause_before_manifest_seconds,
        pause_before_ack=settings.compactor_pause_before_ack_seconds,
        shards=settings.compactor_shard_list(),
    )
