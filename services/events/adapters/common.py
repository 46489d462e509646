"""What every adapter returns (``AdaptedData``) and how it becomes a normal event dataset.

``write_dataset`` lays the frames out exactly as ``flashcrowd gen`` does, through the same sink
(``services.events.parts``: a Delta lake or the manifest format): events partitioned by UTC day and
by bucket-range chunk, each file sorted by ``(bucket, user_id, ts)``; profiles (and an empty identity
map) per chunk; a world.json with the adapter's category names; the marker (lake.json or
manifest.json) last. ``EventDataset`` and everything built on it (packs, persona, lookalike)
therefore read an imported dataset and a
generated one the same way.

The public data sets carry no phone numbers or device ids, so the identity map is empty (and needs
no pepper). An adapter for a source that has identifiers must write only keyed hashes: rows built
with ``services.events.identity.key_normalised(load_pepper(), normalise(id_type, raw))`` and the
pepper's id in ``pepper_id`` (``IDENTITY_SCHEMA``), exactly as the generator does; the raw values
and their plain digests never reach a file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from services.events.parts import clear_dataset, default_table_format, open_sink
from services.events.schema import (
    AGE_BAND_NAMES,
    EVENT_TYPE_NAMES,
    EVENTS_SCHEMA,
    GENDER_NAMES,
    ID_TYPE_NAMES,
    IDENTITY_SCHEMA,
    INTEREST_TAGS,
    OWNER,
    PLATFORM_OWNER,
    PROFILES_SCHEMA,
    REGIONS,
    EventType,
)
from services.events.sharding import NUM_BUCKETS, Shard, buckets_np
from services.storage import ObjectStore

__all__ = [
    "SHARED_DATA_ENV",
    "AdaptedData",
    "ImportResult",
    "shared_data_dir",
    "unknown_profiles",
    "write_dataset",
]

DEFAULT_CHUNK_USERS = 100_000
#: Overrides where the public data sets are (default: ``../shared/data`` next to the repository).
SHARED_DATA_ENV = "FLASHCROWD_SHARED_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[3]


def shared_data_dir() -> Path:
    """``$FLASHCROWD_SHARED_DATA``, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env).expanduser().resolve() if env else (_REPO_ROOT.parent / "shared" / "data").resolve()


@dataclass
class AdaptedData:
    """Frames in our schemas plus what the adapter did (``report``) and category names."""

    events: pl.DataFrame
    profiles: pl.DataFrame
    report: dict[str, Any]
    categories: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportResult:
    manifest: dict[str, Any]
    report: dict[str, Any]
    files: int


def unknown_profiles(user_ids: pl.Series) -> pl.DataFrame:
    """One "unknown" profile row per user id (data sets without demographics)."""
    ids = user_ids.cast(pl.UInt32).unique().sort()
    n = ids.len()
    return pl.DataFrame(
        {
            "user_id": ids,
            "age_band": pl.Series([0] * n, dtype=pl.UInt8),
            "gender": pl.Series([0] * n, dtype=pl.UInt8),
            "region": pl.Series([None] * n, dtype=pl.Utf8),
            "interests": pl.Series([[]] * n, dtype=pl.List(pl.Utf8)),
            "signup_date": pl.Series([None] * n, dtype=pl.Date),
        },
        schema=PROFILES_SCHEMA,
    )


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _world(data: AdaptedData, *, population: int, start: datetime, end: datetime, days: list[str]) -> dict:
    return {
        "format": "flashcrowd.world/v1",
        "source": data.meta,
        "population": population,
        "currency": "CNY",
        "time_zone": "UTC",
        "start": _iso(start),
        "end": _iso(end),
        "dates": days,
        "event_types": {name: code for code, name in EVENT_TYPE_NAMES.items()},
        "age_bands": {str(k): v for k, v in AGE_BAND_NAMES.items()},
        "genders": {str(k): v for k, v in GENDER_NAMES.items()},
        "id_types": {str(k): v for k, v in ID_TYPE_NAMES.items()},
        "interest_tags": list(INTEREST_TAGS),
        "regions": list(REGIONS),
        "segments": [],
        "categories": data.categories,
        "items": [],
        "videos": [],
        "campaigns": [],
        "conventions": {"import": data.report},
    }


def write_dataset(
    store: ObjectStore,
    data: AdaptedData,
    *,
    prefix: str = "data/",
    overwrite: bool = False,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    table_format: str | None = None,
) -> ImportResult:
    """Publish ``data`` as an event dataset under ``prefix`` (its marker last); see the module doc.

    Raises ``DatasetExistsError`` if a dataset is already there, unless ``overwrite`` (then the old
    marker goes first, so readers never see a mix). ``table_format``: ``delta`` or ``manifest``
    (default ``$FLASHCROWD_TABLE_FORMAT``, else manifest).
    """
    table_format = table_format or default_table_format()
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    events = (
        data.events.with_columns(pl.lit(PLATFORM_OWNER, dtype=pl.Utf8).alias(OWNER))  # imports: platform data
        .select(list(EVENTS_SCHEMA))
        .cast(EVENTS_SCHEMA)
        .sort(["bucket", "user_id", "ts"])
    )
    profiles = data.profiles.select(list(PROFILES_SCHEMA)).cast(PROFILES_SCHEMA).sort("user_id")
    if events.height == 0:
        raise ValueError("nothing to import: the adapter produced no events")
    missing = events.select("user_id").unique().join(profiles.select("user_id"), on="user_id", how="anti")
    if missing.height:
        profiles = pl.concat([profiles, unknown_profiles(missing["user_id"])]).sort("user_id")

    clear_dataset(store, prefix, overwrite)
    population = profiles.height
    n_chunks = max(1, min(NUM_BUCKETS, math.ceil(population / chunk_users)))
    first = events["ts"].min()
    last = events["ts"].max()
    assert isinstance(first, datetime) and isinstance(last, datetime)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    day_list = [(start + timedelta(days=i)).date().isoformat() for i in range((end - start).days)]
    profiles = profiles.with_columns(_bucket=pl.Series(buckets_np(profiles["user_id"].to_numpy())))
    events = events.with_columns(_dt=pl.col("ts").dt.date().cast(pl.Utf8))

    tmp = Path(tempfile.mkdtemp(prefix="flashcrowd-import-"))
    try:
        writer = open_sink(table_format, store, prefix, tmp)
        empty_identity = pl.DataFrame(schema=IDENTITY_SCHEMA)
        for k in range(n_chunks):
            lo, hi = Shard(k, n_chunks).bucket_range()
            chunk = events.filter((pl.col("bucket") >= lo) & (pl.col("bucket") < hi))
            for (dt,), part in chunk.group_by("_dt", maintain_order=True):
                part = part.drop("_dt")
                writer.write(
                    "events",
                    f"events/dt={dt}/part-{k:05d}.parquet",
                    part,
                    dt=str(dt),
                    uids=part["user_id"].to_numpy(),
                    buckets=part["bucket"].to_numpy(),
                    ts=part["ts"].dt.epoch("us").to_numpy(),
                )
            prof = profiles.filter((pl.col("_bucket") >= lo) & (pl.col("_bucket") < hi))
            writer.write(
                "profiles",
                f"profiles/part-{k:05d}.parquet",
                prof.drop("_bucket"),
                dt=None,
                uids=prof["user_id"].to_numpy(),
                buckets=prof["_bucket"].to_numpy(),
            )
            writer.write(
                "identity",
                f"identity/part-{k:05d}.parquet",
                empty_identity,
                dt=None,
                uids=np.zeros(0, np.uint32),
                buckets=np.zeros(0, np.uint8),
            )
            writer.end_chunk()
        world = _world(data, population=population, start=start, end=end, days=day_list)
        by_type = events.group_by("event_type").len().sort("event_type")
        world_bytes = json.dumps(world, sort_keys=True, indent=1, ensure_ascii=False).encode()
        manifest = {
            "prefix": prefix,
            "population": population,
            "days": day_list,
            "start": _iso(start),
            "end": _iso(end),
            "world": prefix + "world.json",
            "buckets": NUM_BUCKETS,
            "bucket_hash": "((user_id * 0x9E3779B1) & 0xFFFFFFFF) >> 24",
            "sort_key": ["bucket", "user_id", "ts"],
            "source": {**data.meta, "import": data.report},
            "stats": {
                "events": events.height,
                "events_by_type": {EventType(int(c)).label: int(n) for c, n in by_type.iter_rows()},
                "users": population,
                "active_users": events["user_id"].n_unique(),
                "bots": 0,
            },
        }
        document = writer.publish(manifest, world_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(manifest=document, report=data.report, files=len(document["files"]))
