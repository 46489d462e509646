from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from services.events.sharding import NUM_BUCKETS, Shard, bucket_expr, bucket_of, buckets_np, parse


def test_bucket_formula_known_values() -> None:
    assert bucket_of(0) == 0
    assert bucket_of(1) == (0x9E3779B1 >> 24) == 158
    assert bucket_of(0xFFFFFFFF) == ((0xFFFFFFFF * 0x9E3779B1) & 0xFFFFFFFF) >> 24
    with pytest.raises(ValueError):
        bucket_of(2**32)


def test_numpy_polars_and_scalar_agree() -> None:
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.arange(0, 5000), rng.integers(0, 2**32, 20_000), [2**32 - 1]]).astype(np.uint32)
    np_b = buckets_np(ids)
    pl_b = pl.DataFrame({"user_id": ids}).select(bucket_expr("user_id")).to_series().to_numpy()
    assert np_b.dtype == np.uint8
    assert np.array_equal(np_b, pl_b)
    assert [bucket_of(int(u)) for u in ids[:300]] == np_b[:300].tolist()


def test_consecutive_ids_spread_evenly() -> None:
    counts = np.bincount(buckets_np(np.arange(1, 256_001)), minlength=NUM_BUCKETS)
    assert counts.min() >= 990 and counts.max() <= 1010


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 10, 16, 100, 255, 256])
def test_shard_ranges_partition_buckets(n: int) -> None:
    covered: list[int] = []
    prev_hi = 0
    for shard in Shard.all(n):
        lo, hi = shard.bucket_range()
        assert lo == prev_hi and hi > lo  # contiguous, non-empty, in order
        covered.extend(range(lo, hi))
        prev_hi = hi
    assert covered == list(range(NUM_BUCKETS))


def test_shard_masks_and_predicates_are_disjoint_and_complete() -> None:
    ids = np.arange(1, 50_001, dtype=np.uint32)
    df = pl.DataFrame({"user_id": ids}).with_columns(bucket=bucket_expr())
    owners = np.zeros(len(ids), dtype=np.int64)
    for shard in Shard.all(7):
        mask = shard.mask_np(ids)
        owners += mask
        by_bucket = df.filter(shard.predicate()).get_column("user_id").to_numpy()
        by_user = df.filter(shard.user_predicate()).get_column("user_id").to_numpy()
        assert np.array_equal(by_bucket, ids[mask]) and np.array_equal(by_user, ids[mask])
        assert all(shard.owns_user(int(u)) for u in ids[mask][:50])
    assert (owners == 1).all()


def test_parse() -> None:
    assert parse("3/8") == Shard(3, 8)
    assert parse(" 0 / 1 ") == Shard.whole()
    assert parse(None).is_whole and parse("").is_whole
    assert str(Shard(2, 5)) == "2/5" and Shard.parse("2/5") == Shard(2, 5)
    for bad, needle in [
        ("8/8", "index"),
        ("1/0", "count"),
        ("0/257", "count"),
        ("a/b", "INDEX/COUNT"),
        ("3", "INDEX/COUNT"),
        ("-1/4", "INDEX/COUNT"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse(bad)


def test_overlaps() -> None:
    s = Shard(1, 4)  # buckets 64..127
    assert s.bucket_range() == (64, 128)
    assert s.overlaps(0, 64) and s.overlaps(127, 200) and s.overlaps(70, 80)
    assert not s.overlaps(0, 63) and not s.overlaps(128, 255)
