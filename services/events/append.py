"""Append events to a day-partitioned event dataset: part files first, the manifest last.

``append_events(store, prefix, events, part_tag=..., checkpoint=...)`` splits the events by UTC day,
writes one sorted zstd Parquet part per day (``events/dt=D/part-<tag>.parquet``), uploads them, and
then replaces ``manifest.json`` with ``version + 1``: the longer ``parts`` and ``files`` lists, the
new days, a later ``end``, and the caller's checkpoint under ``ingest``. Until the manifest lands
readers (``EventDataset``) see the previous version; a crash before it leaves unreferenced part
files only, which the next attempt overwrites (same tag) or ``gc_orphans`` removes.

The dataset has one appender at a time (the compactor); the manifest version read at the start is
checked again right before the manifest is replaced.

Each part's entry lists ``owners`` (the sorted distinct ``owner`` values of its rows) when any of
them is not ``PLATFORM_OWNER``, so that readers skip parts holding none of the owners they want
(``EventDataset.scan_events(owners=...)``); a part without the key holds platform events only.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from services.events.dataset import DATASET_FORMATS, normalise_prefix
from services.events.schema import EVENT_SORT_KEY, EVENTS_SCHEMA, OWNER, PLATFORM_OWNER
from services.events.sharding import NUM_BUCKETS
from services.storage.base import ObjectNotFound, ObjectStore
from services.storage.publish import MANIFEST_CONTENT_TYPE, PublishError, read_manifest

__all__ = [
    "ConcurrentAppend",
    "append_events",
    "ingest_checkpoint",
    "ingest_event_keys",
    "read_dataset_manifest",
]

SOURCE_INGEST = "ingest"


class ConcurrentAppend(RuntimeError):
    """The manifest changed while this append was writing; nothing was published."""


def read_dataset_manifest(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    try:
        return read_manifest(store, normalise_prefix(prefix) + "manifest.json")
    except ObjectNotFound:
        return None


def ingest_checkpoint(manifest: Mapping[str, Any] | None, consumer: str) -> dict[str, Any]:
    """The checkpoint ``consumer`` stored with its last append (``{}`` if none)."""
    if not manifest:
        return {}
    return dict((manifest.get("ingest") or {}).get(consumer) or {})


def _int(value: object) -> int:
    """A non-empty integer column's min/max (polars types them as any scalar)."""
    assert isinstance(value, int), value
    return value


def _datetime(value: object) -> datetime:
    assert isinstance(value, datetime), value
    return value


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _skeleton(prefix: str) -> dict[str, Any]:
    return {
        "format": DATASET_FORMATS[0],
        "version": 0,
        "prefix": prefix,
        "days": [],
        "buckets": NUM_BUCKETS,
        "bucket_hash": "((user_id * 0x9E3779B1) & 0xFFFFFFFF) >> 24",
        "sort_key": list(EVENT_SORT_KEY),
        "parts": [],
        "files": [],
    }


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def append_events(
    store: ObjectStore,
    prefix: str,
    events: pl.DataFrame,
    *,
    part_tag: str,
    consumer: str,
    checkpoint: Mapping[str, Any],
    before_manifest: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Publish ``events`` (``EVENTS_SCHEMA``) as new parts and ``checkpoint`` as ``ingest[consumer]``.

    Returns the manifest written. ``events`` may be empty (then only the checkpoint moves).
    ``before_manifest`` runs between the part uploads and the manifest write (fault injection).
    """
    prefix = normalise_prefix(prefix)
    manifest_key = prefix + "manifest.json"
    base = read_dataset_manifest(store, prefix)
    document = dict(base) if base is not None else _skeleton(prefix)
    if document.get("format") not in DATASET_FORMATS:
        raise ValueError(f"{manifest_key} is not an event dataset manifest")
    version = int(document.get("version", 1)) + 1
    known_keys = {p["key"] for p in document.get("parts", [])}

    events = events.select(list(EVENTS_SCHEMA)).cast(EVENTS_SCHEMA)
    new_parts: list[dict[str, Any]] = []
    new_files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flashcrowd-append-") as tmp:
        if events.height:
            days = events.with_columns(pl.col("ts").dt.date().alias("_dt"))
            for (day,), frame in days.partition_by("_dt", as_dict=True, maintain_order=True).items():
                frame = frame.drop("_dt").sort(list(EVENT_SORT_KEY))
                dt = day.isoformat()
                key = f"{prefix}events/dt={dt}/part-{part_tag}.parquet"
                if key in known_keys:
                    raise ValueError(f"part {key} is already in the manifest: tag {part_tag!r} reused")
                path = Path(tmp) / f"{dt}.parquet"
                frame.write_parquet(path, compression="zstd", statistics=True)
                size, sha256 = _digest(path)
                store.put_file(key, path)  # an orphan of a crashed attempt is overwritten
                if store.stat(key).size != size:
                    raise PublishError(f"{key!r} landed with {store.stat(key).size} bytes, expected {size}")
                new_files.append({"key": key, "size": size, "sha256": sha256})
                uids = frame.get_column("user_id")
                buckets = frame.get_column("bucket")
                ts = frame.get_column("ts")
                owners = sorted(frame.get_column(OWNER).unique().to_list())
                new_parts.append(
                    {
                        "table": "events",
                        "key": key,
                        "dt": dt,
                        "rows": frame.height,
                        "min_user_id": _int(uids.min()),
                        "max_user_id": _int(uids.max()),
                        "min_bucket": _int(buckets.min()),
                        "max_bucket": _int(buckets.max()),
                        "min_ts": _iso(_datetime(ts.min())),
                        "max_ts": _iso(_datetime(ts.max())),
                        "added_in_version": version,
                        "source": SOURCE_INGEST,
                        **({"owners": owners} if owners != [PLATFORM_OWNER] else {}),
                    }
                )

    document["version"] = version
    document["parts"] = [*document.get("parts", []), *new_parts]
    files = {f["key"]: f for f in document.get("files", [])}
    files.update({f["key"]: f for f in new_files})
    document["files"] = sorted(files.values(), key=lambda f: f["key"])
    if new_parts:
        document["days"] = sorted({*document.get("days", []), *(p["dt"] for p in new_parts)})
        lo = min(datetime.fromisoformat(p["min_ts"]) for p in new_parts)
        hi = max(datetime.fromisoformat(p["max_ts"]) for p in new_parts) + timedelta(microseconds=1)
        if document.get("start") is None or lo < datetime.fromisoformat(document["start"]):
            document["start"] = _iso(lo)
        if document.get("end") is None or hi > datetime.fromisoformat(document["end"]):
            document["end"] = _iso(hi)
    ingest = dict(document.get("ingest") or {})
    previous = ingest.get(consumer) or {}
    ingest[consumer] = {
        **checkpoint,
        "events": int(previous.get("events", 0)) + events.height,
        "updated_at": _iso(datetime.now(UTC)),
    }
    document["ingest"] = ingest
    document["published_at"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    if before_manifest is not None:
        before_manifest()
    current = read_dataset_manifest(store, prefix)
    if (current or {}).get("version") != (base or {}).get("version"):
        raise ConcurrentAppend(f"{manifest_key} changed during the append (another writer?)")
    payload = json.dumps(document, sort_keys=True, ensure_ascii=False, indent=2).encode("utf-8")
    store.put_bytes(manifest_key, payload, MANIFEST_CONTENT_TYPE)
    return document


def ingest_event_keys(store: ObjectStore, manifest: Mapping[str, Any], dt: str) -> pl.DataFrame:
    """``(owner, event_id)`` of every ingested (appended) part of day ``dt``.

    Parts written before events had owners have no ``owner`` column: their events are the platform's.
    """
    keys = [
        p["key"]
        for p in manifest.get("parts", [])
        if p.get("source") == SOURCE_INGEST and p.get("dt") == dt and p["rows"] > 0
    ]
    schema = {OWNER: pl.Utf8, "event_id": pl.UInt64}
    if not keys:
        return pl.DataFrame(schema=schema)
    targets = [store.scan_target(k) for k in keys]
    return (
        pl.scan_parquet(
            [t[0] for t in targets],
            storage_options=targets[0][1],
            hive_partitioning=False,
            schema=EVENTS_SCHEMA,
            missing_columns="insert",
        )
        .select(pl.col(OWNER).fill_null(PLATFORM_OWNER), "event_id")
        .collect()
    )
