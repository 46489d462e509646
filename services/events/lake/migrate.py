"""``migrate``: a manifest dataset becomes an event lake in place, once, verified before the switch.

Under the same prefix: every table of the pinned manifest is copied into its Delta table (one
commit per bucket group, so memory stays bounded by a sixteenth of a table), world.json is kept,
then the copy is verified (rows per table, the sorted ``event_id`` digest of the events, and the
digest of one pack, "clicked minus paid over the whole range", computed from both) and only then
``lake.json`` is written: from that put on, ``EventDataset`` reads the lake. A failed or refused
verification deletes the tables again and leaves the manifest dataset as it was.

Writers must be stopped: if the manifest's version moved during the copy (a compactor appended),
the migration is refused instead of dropping that append.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from services.events.lake.descriptor import read_descriptor, write_descriptor
from services.events.lake.physical import BUCKET_GROUP_SHIFT, LAKE_TABLES
from services.events.lake.writer import TableWriter
from services.events.schema import EventType
from services.events.sharding import NUM_BUCKETS, bucket_expr
from services.storage.base import ObjectStore

__all__ = ["MigrationError", "MigrationReport", "migrate"]

_STATIC_FIELDS = (
    "population",
    "days",
    "start",
    "end",
    "world",
    "buckets",
    "bucket_hash",
    "sort_key",
    "generator",
    "identity_keys",
    "stats",
    "source",
)


class MigrationError(RuntimeError):
    """The prefix cannot be migrated (already a lake, no manifest, a writer moved it, a mismatch)."""


@dataclass
class MigrationReport:
    prefix: str
    manifest_version: int
    rows: dict[str, int] = field(default_factory=dict)
    events_digest: str = ""
    pack_size: int = 0
    pack_digest: str = ""
    commits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pack(dataset: Any) -> tuple[int, str]:
    """Users who clicked and never paid, over everything (a stand-in for any pack build)."""
    events = dataset.scan_events(columns=["user_id", "event_type"])
    clicked = events.filter(pl.col("event_type") == int(EventType.CLICK)).select("user_id").unique()
    paid = events.filter(pl.col("event_type") == int(EventType.PAY)).select("user_id").unique()
    ids = np.sort(
        clicked.join(paid, on="user_id", how="anti").collect()["user_id"].to_numpy().astype(np.uint32)
    )
    return len(ids), hashlib.sha256(ids.tobytes()).hexdigest()


def _fingerprint(dataset: Any) -> tuple[dict[str, int], str]:
    scans = {
        "events": dataset.scan_events(),
        "profiles": dataset.scan_profiles(),
        "identity": dataset.scan_identity(),
        "truth_segments": dataset.scan_truth(),
    }
    rows = {t: int(lf.select(pl.len()).collect().item()) for t, lf in scans.items()}
    ids = np.sort(dataset.scan_events(columns=["event_id"]).collect()["event_id"].to_numpy())
    return rows, hashlib.sha256(ids.tobytes()).hexdigest()


def migrate(store: ObjectStore, prefix: str) -> MigrationReport:
    from services.events.dataset import DatasetNotFound, EventDataset

    if read_descriptor(store, prefix) is not None:
        raise MigrationError(f"{store.url} prefix {prefix!r} is already an event lake (lake.json exists)")
    try:
        old = EventDataset(store, prefix)
    except DatasetNotFound as error:
        raise MigrationError(str(error)) from None
    writer = TableWriter(store, prefix)
    if any(writer.open(t) is not None for t in LAKE_TABLES):
        raise MigrationError(
            f"{prefix}tables/ already holds Delta tables but no lake.json (a failed migration?): "
            "delete them first"
        )
    report = MigrationReport(prefix=prefix, manifest_version=old.version)
    groups = NUM_BUCKETS >> BUCKET_GROUP_SHIFT
    scans = {
        "events": lambda: old.scan_events(),
        "profiles": lambda: old.scan_profiles(),
        "identity": lambda: old.scan_identity(),
        "truth_segments": lambda: old.scan_truth(),
    }
    try:
        for table in LAKE_TABLES:
            for g in range(groups):
                lf = scans[table]()
                bucket = pl.col("bucket") if table == "events" else bucket_expr("user_id")
                part = lf.filter(bucket.cast(pl.Int16) // (1 << BUCKET_GROUP_SHIFT) == g).collect()
                if writer.append(table, part) is not None:
                    report.commits += 1
        lake_rows, lake_digest = _fingerprint(EventDataset(store, prefix, lake_descriptor={}))
        old_rows, old_digest = _fingerprint(old)
        if lake_rows != old_rows or lake_digest != old_digest:
            raise MigrationError(f"copy differs: rows {lake_rows} vs {old_rows}, event ids digest differs")
        size, digest = _pack(old)
        if _pack(EventDataset(store, prefix, lake_descriptor={})) != (size, digest):
            raise MigrationError("copy differs: the clicked-minus-paid pack is not the same")
        if EventDataset(store, prefix).version != old.version:
            raise MigrationError(
                "the manifest moved during the migration (a writer is running): stop it and retry"
            )
    except BaseException:
        writer.delete_tables()
        raise
    report.rows, report.events_digest = old_rows, old_digest
    report.pack_size, report.pack_digest = size, digest
    fields = {k: old.manifest[k] for k in _STATIC_FIELDS if k in old.manifest}
    fields["base_commits"] = writer.commits()
    fields["migrated_from"] = {
        "manifest_version": old.version,
        "published_at": old.manifest.get("published_at"),
    }
    write_descriptor(store, prefix, fields)
    return report
