"""``LakeAppender``: a stream consumer's micro-batches into the events table, exactly once.

The consumer's stream position is the Delta application transaction ``txn(appId=consumer,
version=last stream sequence)`` committed in the same commit as the batch's rows
(``TableWriter.append``): after any crash the table says exactly which messages are in it, so the
consumer resumes at ``checkpoint() + 1`` and a replayed batch at or below it is skipped.

Replicas: each compactor replica reads its own shard range through its own durable consumer and
commits under its own ``appId`` (the consumer name), so their transactions never conflict; Delta's
conditional put orders their commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from services.events.lake.descriptor import read_descriptor, write_descriptor
from services.events.lake.physical import physical_schema
from services.events.lake.writer import TableWriter
from services.events.schema import OWNER
from services.events.sharding import NUM_BUCKETS
from services.storage.base import ObjectStore

__all__ = ["LakeAppender"]


class LakeAppender:
    def __init__(self, store: ObjectStore, prefix: str, consumer: str) -> None:
        if not consumer:
            raise ValueError("consumer (the application id of the commits) must not be empty")
        self.store = store
        self.prefix = prefix
        self.consumer = consumer
        self.writer = TableWriter(store, prefix)

    def ensure_lake(self) -> None:
        """An empty prefix becomes an (empty) lake: the descriptor says so to readers."""
        if read_descriptor(self.store, self.prefix) is None:
            fields = {
                "buckets": NUM_BUCKETS,
                "source": {"ingest": True},
                "base_commits": self.writer.commits(),
            }
            write_descriptor(self.store, self.prefix, fields)

    def checkpoint(self) -> int:
        """The last stream sequence whose events are in the table (0: none)."""
        return self.writer.committed("events", self.consumer) or 0

    def event_keys(self, dt: str) -> pl.DataFrame:
        """``(owner, event_id)`` of every event of day ``dt`` in the table."""
        schema = {OWNER: pl.Utf8, "event_id": pl.UInt64}
        table = self.writer.open("events")
        if table is None:
            return pl.DataFrame(schema=schema)
        uris = table.file_uris(file_pruning_predicate=[("dt", "=", dt)])
        if not uris:
            return pl.DataFrame(schema=schema)
        where = self.writer.location("events")
        return (
            pl.scan_parquet(
                uris,
                storage_options=where.scan_options,
                hive_partitioning=False,
                schema=physical_schema("events"),
            )
            .select(OWNER, pl.col("event_id").reinterpret(signed=False))
            .collect()
        )

    def commit(self, events: pl.DataFrame, *, last_seq: int, metadata: Mapping[str, Any]) -> int | None:
        """Commit ``events`` with the position ``last_seq``; ``None`` when already committed."""
        return self.writer.append(
            "events", events, app_id=self.consumer, app_version=last_seq, metadata=metadata
        )
