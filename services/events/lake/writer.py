"""``TableWriter``: the one way rows get into the lake (generator, public-data import, compactor).

Each ``append`` is one Delta commit: Parquet files first (sorted, zstd, 64Ki-row groups, column
statistics), then the commit file ``_delta_log/NNN.json`` by conditional put; a reader sees all of a
commit or none of it, and a crash before the put leaves only unreferenced files (removed by
``vacuum``).

Exactly once for stream consumers: ``append(..., app_id=consumer, app_version=last_seq)`` writes a
Delta *application transaction* (``txn`` action) in the same commit as the rows, so the stream
position and the rows land together or not at all. Before writing, the writer reads the table's
``txn`` for ``app_id`` and skips a batch at or below it (a replay after a crash between the commit
and the acknowledgement). Two writers never overwrite each other's commit: the loser of a
conditional put re-reads the log and, for plain appends, retries (delta-rs does this itself); a
concurrent commit carrying the same ``app_id`` is a conflict the writer reports as
``CommitConflict`` instead of committing the batch twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from services.events.lake.location import TableLocation, table_location
from services.events.lake.physical import LAKE_TABLES, PARTITION_COLUMNS, to_physical
from services.events.schema import EVENT_SORT_KEY
from services.storage.base import ObjectStore, StoreUnavailable

__all__ = ["DEFAULT_ROW_GROUP_SIZE", "TABLE_CONFIGURATION", "CommitConflict", "TableWriter"]

log = logging.getLogger(__name__)

DEFAULT_ROW_GROUP_SIZE = 64 * 1024
#: Table properties set at creation. A checkpoint every 100 commits bounds what a reader replays.
#: Commit files older than a day go at the next checkpoint (no one time-travels further back), and
#: tombstones of removed files leave the checkpoints after an hour: ``maintain`` vacuums in full
#: mode (every unreferenced file older than ``--vacuum-hours``, by modification time), so it needs
#: no tombstones, while tombstones kept for days are what made checkpoints and commits grow
#: (bench/lake_choice.py, services/events/README.md).
TABLE_CONFIGURATION = {
    "delta.checkpointInterval": "100",
    "delta.logRetentionDuration": "interval 1 day",
    "delta.deletedFileRetentionDuration": "interval 1 hour",
}
_SORT_KEYS: dict[str, list[str]] = {
    "events": list(EVENT_SORT_KEY),
    "profiles": ["user_id"],
    "identity": ["user_id", "id_type"],
    "truth_segments": ["user_id"],
}


class CommitConflict(RuntimeError):
    """Another writer committed the same application transaction (or a conflicting change) first."""


def _is_unreachable(error: BaseException) -> bool:
    text = str(error).lower()
    return any(s in text for s in ("connection refused", "error sending request", "timed out", "dns error"))


class TableWriter:
    """Appends to the lake tables under ``prefix`` on ``store``."""

    def __init__(
        self, store: ObjectStore, prefix: str, *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.row_group_size = row_group_size
        #: Open tables, brought up to date incrementally: a long-lived writer (the compactor) reads
        #: only the commits since its last look instead of the checkpoint and log on every batch.
        self._tables: dict[str, DeltaTable] = {}

    def location(self, table: str) -> TableLocation:
        if table not in LAKE_TABLES:
            raise ValueError(f"unknown lake table {table!r}; expected one of {LAKE_TABLES}")
        return table_location(self.store, self.prefix, table)

    def open(self, table: str) -> DeltaTable | None:
        """The table's newest snapshot, ``None`` if it was never created."""
        where = self.location(table)
        try:
            cached = self._tables.get(table)
            if cached is not None:
                cached.update_incremental()
                return cached
            opened = DeltaTable(where.uri, storage_options=where.storage_options)
            self._tables[table] = opened
            return opened
        except TableNotFoundError:
            return None
        except OSError as error:
            if _is_unreachable(error):
                raise StoreUnavailable(f"object store unreachable reading {where.uri}: {error}") from error
            raise

    def commits(self) -> int:
        """Commits over every lake table under the prefix (a table at version v has v + 1)."""
        total = 0
        for table in LAKE_TABLES:
            dt = self.open(table)
            total += 0 if dt is None else dt.version() + 1
        return total

    def committed(self, table: str, app_id: str) -> int | None:
        """The last ``app_version`` committed under ``app_id`` (``None``: never)."""
        dt = self.open(table)
        return None if dt is None else dt.transaction_version(app_id)

    def append(
        self,
        table: str,
        frame: pl.DataFrame,
        *,
        app_id: str | None = None,
        app_version: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> int | None:
        """One commit of ``frame`` (the table's logical schema); returns the table version written.

        With ``app_id``/``app_version`` the commit carries that application transaction, and a batch
        at or below the version already committed is skipped (``None``). An empty ``frame`` without
        a transaction commits nothing (``None``).
        """
        if (app_id is None) != (app_version is None):
            raise ValueError("app_id and app_version go together")
        if app_version is not None and app_version < 0:
            raise ValueError(f"app_version must be >= 0, got {app_version}")
        where = self.location(table)
        current = self.open(table)
        if app_id is not None and app_version is not None:
            done = None if current is None else current.transaction_version(app_id)
            if done is not None and done >= app_version:
                log.info("%s: %s already committed up to %d; skipping %d", table, app_id, done, app_version)
                return None
        elif frame.height == 0:
            return None
        rows = to_physical(table, frame.sort(_SORT_KEYS[table]) if frame.height else frame)
        transactions = (
            [Transaction(app_id=app_id, version=app_version)] if app_id and app_version is not None else None
        )
        custom = {k: str(v) for k, v in (metadata or {}).items()}
        try:
            write_deltalake(
                current if current is not None else where.uri,
                rows.to_arrow(),
                mode="append",
                partition_by=PARTITION_COLUMNS[table],
                storage_options=where.storage_options,
                configuration=TABLE_CONFIGURATION,
                writer_properties=WriterProperties(
                    compression="ZSTD", max_row_group_size=self.row_group_size, statistics_truncate_length=64
                ),
                commit_properties=CommitProperties(
                    app_transactions=transactions, custom_metadata=custom or None, max_commit_retries=50
                ),
            )
        except CommitFailedError as error:
            raise CommitConflict(f"commit to {where.uri} lost to a concurrent writer: {error}") from error
        except (DeltaError, OSError) as error:
            if _is_unreachable(error):
                raise StoreUnavailable(f"object store unreachable writing {where.uri}: {error}") from error
            raise
        if current is None:
            current = self.open(table)
            return None if current is None else current.version()
        return current.version()  # write_deltalake moved the handle to the version it committed

    def delete_tables(self) -> int:
        """Remove every lake table under the prefix (``--overwrite``); returns objects deleted."""
        self._tables.clear()
        return sum(self.store.delete_prefix(self.location(t).key_prefix) for t in LAKE_TABLES)
