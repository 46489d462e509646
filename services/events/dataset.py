"""Read an event dataset from any ``ObjectStore``: only what its manifest lists.

Layout under a prefix (default ``data/``)::

    {prefix}manifest.json                          written last (services.storage.publish)
    {prefix}world.json                             catalog and story constants
    {prefix}events/dt=YYYY-MM-DD/part-NNNNN.parquet
    {prefix}profiles/part-NNNNN.parquet
    {prefix}identity/part-NNNNN.parquet
    {prefix}truth/segments/part-NNNNN.parquet      hidden latent segment per user (evaluation only)

The manifest has a ``version`` counter and a flat ``parts`` list; each part records ``table``,
``key`` (full store key), ``dt`` (events only), ``rows``, ``min/max_user_id``, ``min/max_bucket``,
``min/max_ts``, ``added_in_version`` and, for event parts that hold tenants' events, ``owners``
(the sorted owners of its rows; absent = only ``PLATFORM_OWNER``, true of every generated or
imported part and of every part written before events had owners).

Event files written before events had owners have no ``owner`` column: scans read it as
``PLATFORM_OWNER``. ``scan_events(owners=...)`` keeps only those owners' events, skipping parts
that hold none of them and filtering rows only where a part may hold others.

Appending (``services.events.append``) means: write new part files with fresh part numbers, then
publish a manifest with ``version + 1`` and the longer ``parts`` list. Readers pin the manifest
they loaded, so they never see a half-appended state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

import polars as pl

from services.events.lake.descriptor import read_descriptor
from services.events.lake.physical import physical_schema, to_logical
from services.events.schema import (
    EVENTS_SCHEMA,
    IDENTITY_SCHEMA,
    OWNER,
    PLATFORM_OWNER,
    PROFILES_SCHEMA,
    SEGMENTS_SCHEMA,
)
from services.events.sharding import Shard
from services.events.sharding import parse as parse_shard
from services.storage.base import ObjectNotFound, ObjectStore
from services.storage.publish import read_manifest

__all__ = [
    "DEFAULT_PREFIX",
    "DatasetNotFound",
    "EventDataset",
    "may_hold",
    "normalise_prefix",
    "only_wanted",
    "part_owners",
]

DEFAULT_PREFIX = "data/"
DATASET_FORMATS = ("flashcrowd.events.dataset/v1",)
TABLES = ("events", "profiles", "identity", "truth_segments")
_SCHEMAS = {
    "events": EVENTS_SCHEMA,
    "profiles": PROFILES_SCHEMA,
    "identity": IDENTITY_SCHEMA,
    "truth_segments": SEGMENTS_SCHEMA,
}


class DatasetNotFound(LookupError):
    """No (valid) dataset manifest under the prefix."""


def normalise_prefix(prefix: str | None) -> str:
    prefix = (prefix or "").strip()
    if prefix.startswith("/"):
        raise ValueError(f"dataset prefix must not start with '/': {prefix!r}")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def part_owners(part: dict[str, Any]) -> frozenset[str]:
    """Owners of an event part's rows, from its manifest entry (no ``owners``: the platform only)."""
    return frozenset(part.get("owners") or (PLATFORM_OWNER,))


def may_hold(part: dict[str, Any], wanted: frozenset[str]) -> bool:
    """Whether a part may hold events of the ``wanted`` owners.

    Lake parts know only the min/max owner of their rows (``owners_range``, from the Delta log's
    statistics): any owner inside that range may be there.
    """
    span = part.get("owners_range")
    if span is not None:
        return any(span[0] <= owner <= span[-1] for owner in wanted)
    return bool(part_owners(part) & wanted)


def only_wanted(part: dict[str, Any], wanted: frozenset[str]) -> bool:
    """Whether every row of the part is one of the ``wanted`` owners (no row filter needed)."""
    span = part.get("owners_range")
    if span is not None:
        return span[0] == span[-1] and span[0] in wanted
    return part_owners(part) <= wanted


def _as_date(value: date | datetime | str) -> date:
    if isinstance(value, datetime):
        return value.astimezone(UTC).date() if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"not a day: {value!r} (expected YYYY-MM-DD)") from None


def _as_utc(value: datetime | str) -> datetime:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


class EventDataset:
    """A snapshot of the dataset at ``prefix``: the manifest is read once, in the constructor.

    ``refresh()`` loads the newest manifest. Scans go through ``store.scan_target`` so the same code
    reads local files and ``s3://`` objects (with ranged reads and statistics pushdown).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = DEFAULT_PREFIX,
        *,
        lake_descriptor: dict[str, Any] | None = None,
    ) -> None:
        """``lake_descriptor``: read the prefix's Delta tables with these fields even before its
        lake.json exists (``lake.migrate`` verifies a copy before the switch)."""
        self.store = store
        self._forced_descriptor = lake_descriptor
        self.prefix = normalise_prefix(prefix)
        self.manifest_key = self.prefix + "manifest.json"
        self._world: dict[str, Any] | None = None
        #: The pinned lake snapshot when the prefix holds a lake (``lake.json``), else None.
        self.lake: Any = None
        self.manifest: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        where = f"{self.store.url} key {self.manifest_key!r}"
        shown_prefix = self.prefix or "''"
        try:
            descriptor = self._forced_descriptor
            if descriptor is None:
                descriptor = read_descriptor(self.store, self.prefix)
        except ValueError as exc:
            raise DatasetNotFound(
                f"unreadable lake descriptor under {self.store.url} {shown_prefix}: {exc}"
            ) from None
        if descriptor is not None:
            return self._load_lake(descriptor)
        self.lake = None
        try:
            manifest = read_manifest(self.store, self.manifest_key)
        except ObjectNotFound:
            raise DatasetNotFound(
                f"no event dataset at {where}; create one with `flashcrowd gen --store URL --prefix "
                f"{shown_prefix}` or point --prefix at an existing one"
            ) from None
        except ValueError as exc:
            raise DatasetNotFound(f"unreadable dataset manifest at {where}: {exc}") from None
        if manifest.get("format") not in DATASET_FORMATS or not isinstance(manifest.get("parts"), list):
            raise DatasetNotFound(
                f"{where} is not an event dataset manifest (format {manifest.get('format')!r}; "
                f"expected one of {DATASET_FORMATS})"
            )
        return manifest

    def _load_lake(self, descriptor: dict[str, Any]) -> dict[str, Any]:
        """A manifest-shaped view of the lake's pinned snapshot (same keys the manifest path has)."""
        from services.events.lake.snapshot import LakeSnapshot

        self.lake = LakeSnapshot(self.store, self.prefix)
        manifest = dict(descriptor)
        # 1 when the lake was published (its creator records the commits it took), then +1 per
        # commit to any table, like the manifest's version per append.
        manifest["version"] = 1 + self.lake.commits - int(descriptor.get("base_commits", 0))
        manifest["table_versions"] = self.lake.versions
        manifest["parts"] = self.lake.parts
        manifest["files"] = [{"key": p["key"], "size": p["size"]} for p in self.lake.parts]
        manifest["days"] = sorted({p["dt"] for p in self.lake.parts if p["table"] == "events" and p["dt"]})
        span = self.lake.time_range()
        if span is not None:
            lo, hi = span
            if manifest.get("start") is None or lo < _as_utc(manifest["start"]):
                manifest["start"] = lo.isoformat()
            if manifest.get("end") is None or hi > _as_utc(manifest["end"]):
                manifest["end"] = hi.isoformat()
        return manifest

    def refresh(self) -> EventDataset:
        self.manifest = self._load()
        self._world = None
        return self

    def __repr__(self) -> str:
        return f"EventDataset({self.store.url!r}, prefix={self.prefix!r}, version={self.version})"

    # ---- metadata ------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 1))

    @property
    def world(self) -> dict[str, Any]:
        """world.json (catalog and story constants), loaded on first use."""
        if self._world is None:
            key = self.manifest.get("world") or self.prefix + "world.json"
            self._world = json.loads(self.store.get_bytes(key).decode("utf-8"))
        return self._world

    def days(self) -> list[date]:
        """Days that have event parts, ascending."""
        listed = self.manifest.get("days")
        if listed is None:
            listed = sorted({p["dt"] for p in self.parts("events")})
        return [date.fromisoformat(d) for d in listed]

    @property
    def start(self) -> datetime:
        return _as_utc(self.manifest["start"])

    @property
    def end(self) -> datetime:
        """Exclusive end of the covered time range."""
        return _as_utc(self.manifest["end"])

    def population_size(self) -> int:
        """Number of users with a profile (the denominator of reach and TGI)."""
        if "population" in self.manifest:
            return int(self.manifest["population"])
        return sum(p["rows"] for p in self.parts("profiles"))

    def parts(
        self,
        table: str,
        *,
        days: Iterable[date | datetime | str] | None = None,
        shard: Shard | str | None = None,
    ) -> list[dict[str, Any]]:
        """Manifest entries of ``table`` (optionally only these days / files that meet ``shard``)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
        wanted = None if days is None else {_as_date(d).isoformat() for d in days}
        sh = parse_shard(shard)
        return [
            p
            for p in self.manifest["parts"]
            if p["table"] == table
            and (wanted is None or p.get("dt") in wanted)
            and (sh.is_whole or p["rows"] == 0 or sh.overlaps(p["min_bucket"], p["max_bucket"]))
        ]

    # ---- scans ---------------------------------------------------------------------------------

    def _scan(self, table: str, parts: list[dict[str, Any]], filters: Iterable[pl.Expr] = ()) -> pl.LazyFrame:
        """The rows of ``parts`` that pass ``filters`` (applied to the stored columns, so that
        statistics pruning sees them: lake files store unsigned ints in wider signed types)."""
        schema = _SCHEMAS[table]
        parts = [p for p in parts if p["rows"] > 0]
        if not parts:
            return pl.LazyFrame(schema=schema)
        targets = [self.store.scan_target(p["key"]) for p in parts]
        options = targets[0][1]
        lf = pl.scan_parquet(
            [t[0] for t in targets],
            storage_options=options,
            hive_partitioning=False,
            schema=physical_schema(table) if self.lake is not None else schema,
            missing_columns="insert",
        )
        if table == "events" and self.lake is None:  # files from before owners: the platform's events
            lf = lf.with_columns(pl.col(OWNER).fill_null(PLATFORM_OWNER))
        for f in filters:
            lf = lf.filter(f)
        return to_logical(table, lf) if self.lake is not None else lf

    def scan_events(
        self,
        days: Iterable[date | datetime | str] | None = None,
        columns: Iterable[str] | None = None,
        *,
        shard: Shard | str | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        owners: Iterable[str] | None = None,
    ) -> pl.LazyFrame:
        """Events of the manifest-listed parts for ``days`` (all days if None).

        ``shard`` keeps only that shard's users (files outside its bucket range are not opened;
        row groups are pruned by statistics). ``start``/``end`` keep ``start <= ts < end`` and open
        only the days they touch. ``owners`` keeps only events of those owners (``None``: every
        owner's; parts holding none of them are not opened). ``columns`` projects (filters apply
        first).
        """
        day_set = None if days is None else {_as_date(d) for d in days}
        lo = _as_utc(start) if start is not None else None
        hi = _as_utc(end) if end is not None else None
        if lo is not None or hi is not None:
            in_window = [
                d
                for d in self.days()
                if (lo is None or d >= lo.date())
                and (hi is None or datetime(d.year, d.month, d.day, tzinfo=UTC) < hi)
            ]
            day_set = set(in_window) if day_set is None else day_set & set(in_window)
        sh = parse_shard(shard)
        parts = self.parts("events", days=day_set, shard=sh)
        wanted_owners = None if owners is None else frozenset(owners)
        filters: list[pl.Expr] = []
        if wanted_owners is not None:
            parts = [p for p in parts if may_hold(p, wanted_owners)]
            if any(not only_wanted(p, wanted_owners) for p in parts):
                filters.append(pl.col(OWNER).is_in(pl.Series(sorted(wanted_owners), dtype=pl.Utf8).implode()))
        if not sh.is_whole:
            filters.append(sh.predicate("bucket"))
        if lo is not None:
            filters.append(pl.col("ts") >= lo)
        if hi is not None:
            filters.append(pl.col("ts") < hi)
        lf = self._scan("events", parts, filters)
        if columns is not None:
            lf = lf.select(list(columns))
        return lf

    def _scan_users(
        self, table: str, columns: Iterable[str] | None, shard: Shard | str | None
    ) -> pl.LazyFrame:
        sh = parse_shard(shard)
        filters = [] if sh.is_whole else [sh.user_predicate("user_id")]
        lf = self._scan(table, self.parts(table, shard=sh), filters)
        if columns is not None:
            lf = lf.select(list(columns))
        return lf

    def scan_profiles(
        self, columns: Iterable[str] | None = None, *, shard: Shard | str | None = None
    ) -> pl.LazyFrame:
        return self._scan_users("profiles", columns, shard)

    def scan_identity(
        self, columns: Iterable[str] | None = None, *, shard: Shard | str | None = None
    ) -> pl.LazyFrame:
        return self._scan_users("identity", columns, shard)

    def scan_truth(
        self, columns: Iterable[str] | None = None, *, shard: Shard | str | None = None
    ) -> pl.LazyFrame:
        """Hidden ground truth (segment, is_bot, n_events): for evaluation and tests only."""
        return self._scan_users("truth_segments", columns, shard)
