"""User -> bucket -> shard.

Every user belongs to exactly one of 256 buckets, by Knuth's multiplicative hash of the user id::

    bucket = ((user_id * 0x9E3779B1) & 0xFFFFFFFF) >> 24

A shard ``i/n`` (``0 <= i < n <= 256``) owns the contiguous bucket range
``[ceil(i*256/n), ceil((i+1)*256/n))``; the ranges of ``0/n .. (n-1)/n`` partition ``0..255``, so
shards are disjoint and a merge of per-shard results is a plain union. Event files are sorted by
``(bucket, user_id, ts)`` so that Parquet min/max statistics on ``bucket`` let a shard worker skip
other shards' row groups, and the dataset manifest records each file's bucket range so that whole
files are skipped too.
"""

from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass

import numpy as np
import polars as pl

__all__ = [
    "KNUTH",
    "NUM_BUCKETS",
    "Shard",
    "bucket_expr",
    "bucket_of",
    "buckets_np",
    "parse",
]

NUM_BUCKETS = 256
#: 2**32 / golden ratio, odd: a bijection on uint32 whose top byte spreads consecutive ids evenly.
KNUTH = 0x9E3779B1
_MASK32 = 0xFFFFFFFF
_SHIFT = 24


def bucket_of(user_id: int) -> int:
    """Bucket (0..255) of one user id (0 <= user_id < 2**32)."""
    if not 0 <= user_id <= _MASK32:
        raise ValueError(f"user id {user_id} does not fit uint32")
    return ((user_id * KNUTH) & _MASK32) >> _SHIFT


def buckets_np(user_ids: np.ndarray) -> np.ndarray:
    """Vectorised ``bucket_of``: any integer array of uint32-range ids -> uint8 array."""
    u = np.asarray(user_ids).astype(np.uint64, copy=False)
    return (((u * np.uint64(KNUTH)) & np.uint64(_MASK32)) >> np.uint64(_SHIFT)).astype(np.uint8)


def bucket_expr(user_id: str | pl.Expr = "user_id") -> pl.Expr:
    """Polars expression computing the bucket (UInt8) from a user-id column or expression."""
    col = pl.col(user_id) if isinstance(user_id, str) else user_id
    # uint32 * 32-bit constant < 2**64: no overflow in UInt64. Polars has no shift: divide instead.
    return (((col.cast(pl.UInt64) * KNUTH) & _MASK32) // (1 << _SHIFT)).cast(pl.UInt8)


_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Shard:
    """Shard ``index`` of ``count``; ``Shard(0, 1)`` is everything."""

    index: int
    count: int

    def __post_init__(self) -> None:
        for name in ("index", "count"):  # accept numpy integers too, store plain ints
            value = getattr(self, name)
            if not isinstance(value, bool):
                with contextlib.suppress(TypeError):
                    object.__setattr__(self, name, operator.index(value))
        if not isinstance(self.count, int) or not 1 <= self.count <= NUM_BUCKETS:
            raise ValueError(f"shard count must be an integer in 1..{NUM_BUCKETS}, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(
                f"shard index must be an integer in 0..{self.count - 1} for count {self.count}, "
                f"got {self.index!r}"
            )

    @classmethod
    def parse(cls, spec: str) -> Shard:
        return parse(spec)

    @classmethod
    def whole(cls) -> Shard:
        return cls(0, 1)

    @classmethod
    def all(cls, count: int) -> list[Shard]:
        """``[0/count, 1/count, ...]``: disjoint, covering every bucket."""
        return [cls(i, count) for i in range(count)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def bucket_range(self) -> tuple[int, int]:
        """Half-open ``(lo, hi)``: buckets ``lo <= b < hi`` belong to this shard (never empty)."""
        lo = -(-self.index * NUM_BUCKETS // self.count)
        hi = -(-(self.index + 1) * NUM_BUCKETS // self.count)
        return lo, hi

    def owns_bucket(self, bucket: int) -> bool:
        lo, hi = self.bucket_range()
        return lo <= bucket < hi

    def owns_user(self, user_id: int) -> bool:
        return self.owns_bucket(bucket_of(user_id))

    def overlaps(self, min_bucket: int, max_bucket: int) -> bool:
        """Does the closed bucket interval ``[min_bucket, max_bucket]`` (e.g. a file's) meet this shard?"""
        lo, hi = self.bucket_range()
        return min_bucket < hi and max_bucket >= lo

    def predicate(self, bucket: str | pl.Expr = "bucket") -> pl.Expr:
        """Polars predicate on a bucket column (Parquet statistics can prune with it)."""
        col = pl.col(bucket) if isinstance(bucket, str) else bucket
        lo, hi = self.bucket_range()
        if self.is_whole:
            return pl.lit(True)
        return (col >= lo) & (col < hi)

    def user_predicate(self, user_id: str | pl.Expr = "user_id") -> pl.Expr:
        """Predicate for tables without a bucket column (profiles, identity): hashes the user id."""
        if self.is_whole:
            return pl.lit(True)
        return self.predicate(bucket_expr(user_id))

    def mask_np(self, user_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the user ids this shard owns."""
        lo, hi = self.bucket_range()
        b = buckets_np(user_ids)
        return (b >= lo) & (b < hi)


def parse(spec: str | Shard | None) -> Shard:
    """``"i/n"`` -> ``Shard(i, n)``; ``None`` or ``""`` -> the whole population (``0/1``)."""
    if isinstance(spec, Shard):
        return spec
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return Shard.whole()
    if not isinstance(spec, str):
        raise TypeError(f"shard spec must be a string like '3/8', not {type(spec).__name__}")
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(
            f"invalid shard spec {spec!r}: expected 'INDEX/COUNT' with 0 <= INDEX < COUNT <= {NUM_BUCKETS}, "
            "e.g. '0/1' (everything) or '3/8'"
        )
    index, count = int(m.group(1)), int(m.group(2))
    try:
        return Shard(index, count)
    except ValueError as exc:
        raise ValueError(f"invalid shard spec {spec!r}: {exc}") from None
