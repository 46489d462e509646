"""How our polars schemas are stored in Delta tables (which have no unsigned integer types).

Delta's integer types are signed (byte, short, integer, long), so each unsigned column is stored in
the next wider signed type (UInt8 -> short, UInt32 -> long) and read back with a cast. ``event_id``
(UInt64, any value a client sends) is stored bit for bit as a long (``reinterpret``), which keeps
every id and its equality; its order and statistics are meaningless, and nothing prunes by it.

Partition columns (Delta keeps them in the file path and the log, not in the Parquet files):
``dt`` (UTC day of ``ts``, events only) and ``bucket16 = bucket >> 4`` (16 groups of 16 buckets),
so a shard worker opens only the groups its bucket range touches and prunes the rest of a group by
the per-file ``bucket`` statistics in the Delta log (files are sorted by ``(bucket, user_id, ts)``).
"""

from __future__ import annotations

import polars as pl

from services.events.schema import EVENTS_SCHEMA, IDENTITY_SCHEMA, PROFILES_SCHEMA, SEGMENTS_SCHEMA
from services.events.sharding import bucket_expr

__all__ = [
    "BUCKET_GROUP",
    "BUCKET_GROUP_SHIFT",
    "LAKE_TABLES",
    "LOGICAL_SCHEMAS",
    "PARTITION_COLUMNS",
    "physical_schema",
    "to_logical",
    "to_physical",
]

#: Table name -> schema of the rows producers hand in and readers get back.
LOGICAL_SCHEMAS: dict[str, pl.Schema] = {
    "events": EVENTS_SCHEMA,
    "profiles": PROFILES_SCHEMA,
    "identity": IDENTITY_SCHEMA,
    "truth_segments": SEGMENTS_SCHEMA,
}
LAKE_TABLES = tuple(LOGICAL_SCHEMAS)
BUCKET_GROUP = "bucket16"
BUCKET_GROUP_SHIFT = 4
PARTITION_COLUMNS: dict[str, list[str]] = {
    "events": ["dt", BUCKET_GROUP],
    "profiles": [BUCKET_GROUP],
    "identity": [BUCKET_GROUP],
    "truth_segments": [BUCKET_GROUP],
}
_WIDER: dict[type[pl.DataType], pl.DataType] = {
    pl.UInt8: pl.Int16(),
    pl.UInt16: pl.Int32(),
    pl.UInt32: pl.Int64(),
    pl.UInt64: pl.Int64(),  # bit for bit (reinterpret), see the module doc
}


def _physical_type(dtype: pl.DataType) -> pl.DataType:
    return _WIDER.get(type(dtype), dtype)


def physical_schema(table: str) -> pl.Schema:
    """Schema of the table's Parquet files (no partition columns)."""
    return pl.Schema({name: _physical_type(dtype) for name, dtype in LOGICAL_SCHEMAS[table].items()})


def _bucket_of_rows(table: str) -> pl.Expr:
    return pl.col("bucket") if table == "events" else bucket_expr("user_id")


def to_physical(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` (the table's logical schema) as stored: wider signed ints plus partition columns."""
    logical = LOGICAL_SCHEMAS[table]
    frame = frame.select(list(logical)).cast(logical)
    columns: list[pl.Expr] = []
    for name, dtype in logical.items():
        if isinstance(dtype, pl.UInt64):
            columns.append(pl.col(name).reinterpret(signed=True))
        else:
            columns.append(pl.col(name).cast(_physical_type(dtype)))
    group = (_bucket_of_rows(table).cast(pl.Int16) // (1 << BUCKET_GROUP_SHIFT)).alias(BUCKET_GROUP)
    extra = [group]
    if table == "events":
        extra.insert(0, pl.col("ts").dt.date().cast(pl.Utf8).alias("dt"))
    return frame.select(*columns, *extra)


def to_logical(table: str, frame: pl.LazyFrame) -> pl.LazyFrame:
    """Stored rows (``physical_schema``) back in the table's logical schema."""
    columns: list[pl.Expr] = []
    for name, dtype in LOGICAL_SCHEMAS[table].items():
        if isinstance(dtype, pl.UInt64):
            columns.append(pl.col(name).reinterpret(signed=False))
        elif _physical_type(dtype) != dtype:
            columns.append(pl.col(name).cast(dtype))
        else:
            columns.append(pl.col(name))
    return frame.select(columns)
