"""``LakeSnapshot``: one pinned version of every lake table under a prefix, as a file list.

The Delta log of each table gives its live files (``add`` actions) with row counts, partition values
and per-column min/max statistics. ``parts`` turns them into the entries ``EventDataset`` prunes by
(day, bucket range, time range), so the same reader code serves the manifest dataset and the lake;
scans then open only the listed files (pinned: a commit landing mid-build is not seen).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import polars as pl
from deltalake import DeltaTable

from services.events.lake.location import TableLocation, table_location
from services.events.lake.physical import BUCKET_GROUP, BUCKET_GROUP_SHIFT, LAKE_TABLES
from services.events.lake.writer import TableWriter
from services.storage.base import ObjectStore

__all__ = ["LakeSnapshot"]


def _iso(value: datetime) -> str:
    return value.isoformat()


class LakeSnapshot:
    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        writer = TableWriter(store, prefix)
        self.locations: dict[str, TableLocation] = {t: table_location(store, prefix, t) for t in LAKE_TABLES}
        self.tables: dict[str, DeltaTable | None] = {t: writer.open(t) for t in LAKE_TABLES}
        self.parts: list[dict[str, Any]] = []
        for table in LAKE_TABLES:
            self.parts.extend(self._parts(table))

    @property
    def versions(self) -> dict[str, int]:
        """Table -> Delta version (-1: not created)."""
        return {t: (-1 if dt is None else dt.version()) for t, dt in self.tables.items()}

    @property
    def commits(self) -> int:
        """Commits over every table: grows by one with every commit to any of them."""
        return sum(v + 1 for v in self.versions.values())

    def _parts(self, table: str) -> list[dict[str, Any]]:
        dt = self.tables[table]
        if dt is None:
            return []
        actions = pl.DataFrame(dt.get_add_actions(flatten=True))
        if actions.height == 0:
            return []
        where = self.locations[table]
        group = actions.get_column(f"partition.{BUCKET_GROUP}").cast(pl.Int64)
        width = 1 << BUCKET_GROUP_SHIFT
        out: list[dict[str, Any]] = []
        columns = set(actions.columns)
        for i, row in enumerate(actions.iter_rows(named=True)):
            g = int(group[i])
            lo_bucket, hi_bucket = g * width, g * width + width - 1
            if row.get("min.bucket") is not None:
                lo_bucket, hi_bucket = int(row["min.bucket"]), int(row["max.bucket"])
            entry: dict[str, Any] = {
                "table": table,
                "key": where.key_of(row["path"]),
                "size": int(row["size_bytes"]),
                "dt": row.get("partition.dt"),
                "rows": int(row["num_records"]),
                "min_user_id": int(row["min.user_id"]) if row.get("min.user_id") is not None else 0,
                "max_user_id": int(row["max.user_id"]) if row.get("max.user_id") is not None else 0,
                "min_bucket": lo_bucket,
                "max_bucket": hi_bucket,
            }
            if "min.ts" in columns and row.get("min.ts") is not None:
                entry["min_ts"] = _iso(row["min.ts"])
                entry["max_ts"] = _iso(row["max.ts"])
            if "min.owner" in columns and row.get("min.owner") is not None:
                # Owners are a range here (the log keeps min/max only): a file whose range is just
                # the platform holds platform events only; others are filtered row by row.
                owners = sorted({row["min.owner"], row["max.owner"]})
                if owners != ["_platform"]:
                    entry["owners_range"] = owners
            out.append(entry)
        return out

    def time_range(self) -> tuple[datetime, datetime] | None:
        """``[min ts, max ts + 1us)`` over the events' files (``None``: no events)."""
        ts = [(p["min_ts"], p["max_ts"]) for p in self.parts if p["table"] == "events" and "min_ts" in p]
        if not ts:
            return None
        lo = min(datetime.fromisoformat(a) for a, _ in ts)
        hi = max(datetime.fromisoformat(b) for _, b in ts) + timedelta(microseconds=1)
        return lo, hi
