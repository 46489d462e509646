"""Where producers write a whole dataset: the one sink of ``flashcrowd gen`` and ``data import``.

A producer hands each table's rows chunk by chunk (``sink.write(table, rel, frame, ...)``, then
``end_chunk()``) and finally ``publish(fields, world)``. Two formats sit behind it:

``delta`` (``LakeSink``)
    every chunk's rows become one commit per table through ``lake.TableWriter`` (day + bucket-group
    partitions, statistics in the Delta log); world.json, then ``lake.json`` last: the dataset is
    visible to ``EventDataset`` only once the descriptor lands.
``manifest`` (``ManifestSink``, the format before the lake)
    sorted zstd part files in a local temporary directory, uploaded by ``services.storage.publish``
    with ``manifest.json`` last.

``FLASHCROWD_TABLE_FORMAT`` (``delta`` or ``manifest``) chooses the default; ``--format`` on the
CLI overrides it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from services.events.lake.descriptor import descriptor_key, write_descriptor
from services.events.lake.writer import TableWriter
from services.storage.base import ObjectStore
from services.storage.publish import publish

__all__ = [
    "DATASET_FORMAT",
    "DEFAULT_ROW_GROUP_SIZE",
    "TABLE_FORMATS",
    "TABLE_FORMAT_ENV",
    "DatasetExistsError",
    "DatasetSink",
    "LakeSink",
    "ManifestSink",
    "clear_dataset",
    "default_table_format",
    "open_sink",
]

DATASET_FORMAT = "flashcrowd.events.dataset/v1"
DEFAULT_ROW_GROUP_SIZE = 65_536
TABLE_FORMATS = ("manifest", "delta")
TABLE_FORMAT_ENV = "FLASHCROWD_TABLE_FORMAT"


class DatasetExistsError(FileExistsError):
    """There is already a dataset (or other objects) under the prefix."""


def default_table_format(env: Mapping[str, str] | None = None) -> str:
    """``$FLASHCROWD_TABLE_FORMAT``, else manifest (``ValueError`` naming the variable for a bad value)."""
    value = (os.environ if env is None else env).get(TABLE_FORMAT_ENV, "").strip().lower() or "manifest"
    if value not in TABLE_FORMATS:
        raise ValueError(f"{TABLE_FORMAT_ENV}={value!r} is not one of {TABLE_FORMATS}")
    return value


def _iso_us(us: int) -> str:
    return (
        (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us)))
        .isoformat()
        .replace("+00:00", "Z")
    )


class DatasetSink(Protocol):
    format: str

    def write(
        self,
        table: str,
        rel: str,
        df: pl.DataFrame,
        *,
        dt: str | None,
        uids: np.ndarray,
        buckets: np.ndarray,
        ts: np.ndarray | None = None,
    ) -> None: ...

    def end_chunk(self) -> None: ...

    def publish(self, fields: Mapping[str, Any], world: bytes) -> dict[str, Any]: ...


@dataclass
class _Part:
    table: str
    key: str
    path: Path
    dt: str | None
    rows: int
    min_user_id: int
    max_user_id: int
    min_bucket: int
    max_bucket: int
    min_ts: str | None = None
    max_ts: str | None = None

    def entry(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "dt": self.dt,
            "rows": self.rows,
            "min_user_id": self.min_user_id,
            "max_user_id": self.max_user_id,
            "min_bucket": self.min_bucket,
            "max_bucket": self.max_bucket,
            "min_ts": self.min_ts,
            "max_ts": self.max_ts,
            "added_in_version": 1,
        }


class ManifestSink:
    """Part files under ``tmp``, published with manifest.json last (the pre-lake format)."""

    format = "manifest"

    def __init__(self, store: ObjectStore, prefix: str, tmp: Path, row_group_size: int) -> None:
        self.store = store
        self.prefix = prefix
        self.tmp = tmp
        self.row_group_size = row_group_size
        self.parts: list[_Part] = []

    def write(
        self,
        table: str,
        rel: str,
        df: pl.DataFrame,
        *,
        dt: str | None,
        uids: np.ndarray,
        buckets: np.ndarray,
        ts: np.ndarray | None = None,
    ) -> None:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(path, compression="zstd", statistics=True, row_group_size=self.row_group_size)
        empty = len(uids) == 0
        self.parts.append(
            _Part(
                table=table,
                key=self.prefix + rel,
                path=path,
                dt=dt,
                rows=df.height,
                min_user_id=0 if empty else int(uids.min()),
                max_user_id=0 if empty else int(uids.max()),
                min_bucket=0 if empty else int(buckets.min()),
                max_bucket=0 if empty else int(buckets.max()),
                min_ts=None if ts is None or empty else _iso_us(int(ts.min())),
                max_ts=None if ts is None or empty else _iso_us(int(ts.max())),
            )
        )

    def end_chunk(self) -> None:
        pass

    def publish(self, fields: Mapping[str, Any], world: bytes) -> dict[str, Any]:
        data: dict[str, Any] = {p.key: p.path for p in self.parts}
        data[self.prefix + "world.json"] = world
        manifest = {
            **fields,
            "format": DATASET_FORMAT,
            "version": 1,
            "parts": [p.entry() for p in self.parts],
        }
        return publish(self.store, data=data, manifest_key=self.prefix + "manifest.json", manifest=manifest)


class LakeSink:
    """One Delta commit per table and chunk (``TableWriter``); lake.json last."""

    format = "delta"

    def __init__(self, store: ObjectStore, prefix: str, row_group_size: int) -> None:
        self.store = store
        self.prefix = prefix
        self.writer = TableWriter(store, prefix, row_group_size=row_group_size)
        self._pending: dict[str, list[pl.DataFrame]] = {}
        self.commits = 0

    def write(
        self,
        table: str,
        rel: str,
        df: pl.DataFrame,
        *,
        dt: str | None,
        uids: np.ndarray,
        buckets: np.ndarray,
        ts: np.ndarray | None = None,
    ) -> None:
        if df.height:
            self._pending.setdefault(table, []).append(df)

    def end_chunk(self) -> None:
        for table, frames in self._pending.items():
            if self.writer.append(table, pl.concat(frames)) is not None:
                self.commits += 1
        self._pending = {}

    def publish(self, fields: Mapping[str, Any], world: bytes) -> dict[str, Any]:
        from services.events.dataset import EventDataset

        self.end_chunk()
        self.store.put_bytes(self.prefix + "world.json", world, "application/json")
        fields = {**fields, "world": self.prefix + "world.json", "base_commits": self.writer.commits()}
        write_descriptor(self.store, self.prefix, fields)
        return EventDataset(self.store, self.prefix).manifest


def open_sink(
    table_format: str,
    store: ObjectStore,
    prefix: str,
    tmp: Path,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> DatasetSink:
    if table_format == "delta":
        return LakeSink(store, prefix, row_group_size)
    if table_format == "manifest":
        return ManifestSink(store, prefix, tmp, row_group_size)
    raise ValueError(f"table format {table_format!r} is not one of {TABLE_FORMATS}")


def clear_dataset(store: ObjectStore, prefix: str, overwrite: bool) -> None:
    """Refuse (``DatasetExistsError``) or, with ``overwrite``, remove whatever dataset is under ``prefix``.

    The markers go first (lake.json, manifest.json), so readers stop trusting the old files before
    they disappear.
    """
    from services.storage.publish import read_manifest

    manifest_key = prefix + "manifest.json"
    subprefixes = [prefix + p for p in ("events/", "profiles/", "identity/", "truth/", "tables/")]
    found = any(store.exists(k) for k in (manifest_key, descriptor_key(prefix), prefix + "world.json"))
    found = found or any(next(iter(store.list(p)), None) is not None for p in subprefixes)
    if not found:
        return
    if not overwrite:
        raise DatasetExistsError(
            f"{store.url} already has a dataset under prefix {prefix!r}; replace it with --overwrite "
            "(overwrite=True from Python) or choose another --prefix"
        )
    old_files: list[str] = []
    with contextlib.suppress(KeyError, ValueError):  # ObjectNotFound is a KeyError
        old_files = [f["key"] for f in read_manifest(store, manifest_key)["files"]]
    store.delete(descriptor_key(prefix))
    store.delete(manifest_key)
    for key in old_files:
        store.delete(key)
    store.delete(prefix + "world.json")
    for p in subprefixes:
        store.delete_prefix(p)
