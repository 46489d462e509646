"""``maintain``: what keeps the lake small and fast, all from Delta itself (``flashcrowd data maintain``).

Per table, in this order:

1. **retention** (events only): ``DELETE WHERE dt < today - retention_days``; a predicate on the
   partition column, so whole files are dropped from the snapshot without rewriting any.
2. **compaction** (size trigger): when the table has at least ``min_small_files`` files smaller than
   ``target_size``, ``OPTIMIZE`` bin-packs them per partition (day and bucket group) into files of
   about ``target_size``. It commits a remove+add; concurrent appends by the compactor do not
   conflict with it (Delta's conflict checker only fails it on removed files it read).
3. **checkpoint + log cleanup**: a Parquet checkpoint of the current snapshot, then commit files
   older than ``delta.logRetentionDuration`` (1 day) go, so the log a reader replays stays bounded.
4. **vacuum**: files no snapshot within ``vacuum_hours`` references (compacted-away and deleted
   files, and orphans of crashed writers) are deleted from the store.

Every step is a Delta operation; a commit lost to a concurrent writer raises ``CommitConflict``
naming the table and step (the CronJob runs again on its schedule).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from deltalake import WriterProperties
from deltalake.exceptions import CommitFailedError

from services.events.lake.physical import LAKE_TABLES
from services.events.lake.writer import CommitConflict, TableWriter
from services.storage.base import ObjectStore

__all__ = ["DEFAULT_RETENTION_DAYS", "MaintenanceOptions", "TableReport", "maintain"]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 400


@dataclass(frozen=True)
class MaintenanceOptions:
    retention_days: int | None = DEFAULT_RETENTION_DAYS
    compact: bool = True
    target_size: int = 128 * 1024 * 1024
    min_small_files: int = 16
    vacuum: bool = True
    vacuum_hours: int = 168
    checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.retention_days is not None and self.retention_days < 1:
            raise ValueError(
                f"retention_days must be >= 1 (or None to keep everything), got {self.retention_days}"
            )
        if self.target_size < 1024 * 1024:
            raise ValueError(f"target_size must be >= 1 MiB, got {self.target_size}")
        if self.min_small_files < 2:
            raise ValueError(f"min_small_files must be >= 2, got {self.min_small_files}")
        if self.vacuum_hours < 0:
            raise ValueError(f"vacuum_hours must be >= 0, got {self.vacuum_hours}")


@dataclass
class TableReport:
    table: str
    version_before: int
    version_after: int = -1
    files_before: int = 0
    files_after: int = 0
    retention_files_removed: int = 0
    compacted_files_removed: int = 0
    compacted_files_added: int = 0
    vacuumed_files: int = 0
    checkpoint: bool = False
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _files(table: Any) -> pl.DataFrame:
    return pl.DataFrame(table.get_add_actions(flatten=True))


def maintain(
    store: ObjectStore, prefix: str, options: MaintenanceOptions | None = None, *, now: datetime | None = None
) -> list[TableReport]:
    """Run the steps of the module doc on every lake table under ``prefix``; one report per table."""
    options = options or MaintenanceOptions()
    writer = TableWriter(store, prefix)
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    reports: list[TableReport] = []
    for name in LAKE_TABLES:
        table = writer.open(name)
        if table is None:
            continue
        report = TableReport(name, version_before=table.version(), files_before=_files(table).height)
        step = "retention"
        try:
            if name == "events" and options.retention_days is not None:
                cutoff = (today - timedelta(days=options.retention_days)).isoformat()
                metrics = table.delete(f"dt < '{cutoff}'")
                report.retention_files_removed = int(metrics.get("num_removed_files", 0))
            step = "compaction"
            if options.compact:
                sizes = _files(table).get_column("size_bytes")
                small = int((sizes < options.target_size).sum())
                if small >= options.min_small_files:
                    metrics = table.optimize.compact(
                        target_size=options.target_size,
                        writer_properties=WriterProperties(
                            compression="ZSTD", max_row_group_size=writer.row_group_size
                        ),
                    )
                    report.compacted_files_removed = int(metrics.get("numFilesRemoved", 0))
                    report.compacted_files_added = int(metrics.get("numFilesAdded", 0))
                else:
                    report.skipped.append(f"compaction: {small} small files < {options.min_small_files}")
            step = "checkpoint"
            if options.checkpoint:
                table.create_checkpoint()
                table.cleanup_metadata()
                report.checkpoint = True
            step = "vacuum"
            if options.vacuum:
                # full: every file the log does not reference (also orphans of crashed writers, and
                # files whose tombstones already expired from the checkpoints), not only tombstones.
                removed = table.vacuum(
                    retention_hours=options.vacuum_hours,
                    dry_run=False,
                    enforce_retention_duration=False,
                    full=True,
                )
                report.vacuumed_files = len(removed)
        except CommitFailedError as error:
            raise CommitConflict(
                f"{name}: {step} lost to a concurrent commit ({error}); run maintain again"
            ) from error
        table.update_incremental()
        report.version_after = table.version()
        report.files_after = _files(table).height
        log.info("maintain %s: %s", name, report.as_dict())
        reports.append(report)
    return reports
