"""The ObjectStore contract, run against both implementations (local directory and S3 over HTTP)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import polars as pl
import pytest

from services.storage import ObjectInfo, ObjectNotFound, ObjectStore


def test_implements_protocol(any_store: ObjectStore) -> None:
    assert isinstance(any_store, ObjectStore)
    assert "://" in any_store.url


def test_bytes_round_trip(any_store: ObjectStore) -> None:
    any_store.put_bytes("packs/t1/p1/v1/users.roaring", b"\x00\x01binary\xff")
    any_store.put_bytes("empty", b"")
    any_store.put_bytes("unicode/日本語 key.txt", "héllo".encode())

    assert any_store.get_bytes("packs/t1/p1/v1/users.roaring") == b"\x00\x01binary\xff"
    assert any_store.get_bytes("empty") == b""
    assert any_store.get_bytes("unicode/日本語 key.txt") == "héllo".encode()
    info = any_store.stat("packs/t1/p1/v1/users.roaring")
    assert (info.key, info.size) == ("packs/t1/p1/v1/users.roaring", 9)
    assert info.modified is not None and info.modified.tzinfo is not None
    assert any_store.exists("empty")


def test_file_round_trip(any_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 4096  # 1 MiB
    src.write_bytes(payload)
    any_store.put_file("models/m1/model.bin", src)

    dest = tmp_path / "out" / "nested" / "model.bin"  # parents are created
    any_store.get_file("models/m1/model.bin", dest)
    assert dest.read_bytes() == payload
    assert any_store.stat("models/m1/model.bin").size == len(payload)


def test_missing_key(any_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        any_store.get_bytes("nope/missing")
    with pytest.raises(ObjectNotFound):
        any_store.stat("nope/missing")
    with pytest.raises(ObjectNotFound):
        any_store.get_file("nope/missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not any_store.exists("nope/missing")
    any_store.delete("nope/missing")  # not an error

    # A "directory" is not an object.
    any_store.put_bytes("dir/child", b"x")
    assert not any_store.exists("dir")
    with pytest.raises(ObjectNotFound):
        any_store.get_bytes("dir")


def test_put_file_missing_source(any_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        any_store.put_file("k", tmp_path / "does-not-exist")
    assert [*any_store.list()] == []


KEYS = ["a-c", "a/b", "a/c/d", "a/c/e", "ab", "b", "events/dt=2024-06-18/part-0.parquet"]


def _fill(store: ObjectStore) -> None:
    for key in reversed(KEYS):  # insertion order must not matter
        store.put_bytes(key, key.encode())


def test_list_order_and_prefixes(any_store: ObjectStore) -> None:
    _fill(any_store)
    listed = [*any_store.list()]
    assert [i.key for i in listed] == KEYS  # byte order: "-" < "/" < "b"
    assert all(i.size == len(i.key) for i in listed)

    assert [i.key for i in any_store.list("a/")] == ["a/b", "a/c/d", "a/c/e"]
    assert [i.key for i in any_store.list("a")] == ["a-c", "a/b", "a/c/d", "a/c/e", "ab"]
    assert [i.key for i in any_store.list("a/c")] == ["a/c/d", "a/c/e"]
    assert [i.key for i in any_store.list("events/dt=2024-06-18/part-")] == [KEYS[-1]]
    assert [*any_store.list("zzz/")] == []


def test_list_non_recursive(any_store: ObjectStore) -> None:
    _fill(any_store)
    top = [*any_store.list(recursive=False)]
    assert [i.key for i in top] == ["a-c", "a/", "ab", "b", "events/"]
    assert ObjectInfo("a/", 0) in top
    assert [i.key for i in any_store.list("a/", recursive=False)] == ["a/b", "a/c/"]


def test_delete_and_delete_prefix(any_store: ObjectStore) -> None:
    _fill(any_store)
    any_store.delete("b")
    assert not any_store.exists("b")

    assert any_store.delete_prefix("a/") == 3
    assert [i.key for i in any_store.list()] == ["a-c", "ab", "events/dt=2024-06-18/part-0.parquet"]
    assert any_store.delete_prefix("a/") == 0
    assert [i.key for i in any_store.list(recursive=False)] == ["a-c", "ab", "events/"]
    with pytest.raises(ValueError, match="delete_prefix"):
        any_store.delete_prefix("")


def test_delete_prefix_many(any_store: ObjectStore) -> None:
    for i in range(30):
        any_store.put_bytes(f"tmp/{i:03d}", b"x")
    assert any_store.delete_prefix("tmp/") == 30
    assert [*any_store.list("tmp/")] == []


@pytest.mark.parametrize(
    "key", ["", "/abs", "../escape", "a/../../b", "a//b", "a/", "./a", "a/./b", "a\\b", ".flashcrowd-tmp-x"]
)
def test_invalid_keys_refused(any_store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        any_store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid object key"):
        any_store.get_bytes(key)


def test_invalid_prefix_refused(any_store: ObjectStore) -> None:
    with pytest.raises(ValueError, match=r"\.\./x"):
        [*any_store.list("../x")]


def test_overwrite_is_atomic(any_store: ObjectStore) -> None:
    old, new = b"O" * 300_000, b"N" * 200_000
    any_store.put_bytes("hot/key", old)
    seen: set[bytes] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.add(any_store.get_bytes("hot/key"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            any_store.put_bytes("hot/key", new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert seen <= {old, new}  # never torn, never missing
    assert any_store.get_bytes("hot/key") == old


def _parquet(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, row_group_size=100)
    return buf.getvalue()


def test_polars_scan_with_filter(any_store: ObjectStore) -> None:
    day = pl.DataFrame({"user_id": range(1000), "event": ["view", "click"] * 500})
    any_store.put_bytes("events/dt=2024-06-18/part-0.parquet", _parquet(day))
    any_store.put_bytes(
        "events/dt=2024-06-18/part-1.parquet", _parquet(day.with_columns(pl.col("user_id") + 1000))
    )

    source, options = any_store.scan_target("events/dt=2024-06-18/part-0.parquet")
    lazy = pl.scan_parquet(source, storage_options=options).filter(pl.col("user_id") >= 990)
    # The predicate is pushed into the Parquet scan (row-group statistics), not applied afterwards.
    assert "SELECTION" in lazy.explain()
    out = lazy.select("user_id").collect()
    assert out["user_id"].to_list() == list(range(990, 1000))

    glob, options = any_store.scan_target("events/dt=2024-06-18/*.parquet")
    counts = (
        pl.scan_parquet(glob, storage_options=options)
        .filter(pl.col("event") == "click", pl.col("user_id") < 1010)
        .select(pl.len())
        .collect()
        .item()
    )
    assert counts == 505


def test_polars_hive_partitioned_prefix(any_store: ObjectStore) -> None:
    for day in ("2024-06-17", "2024-06-18"):
        df = pl.DataFrame({"user_id": [1, 2, 3], "event": ["view", "click", "order"]})
        any_store.put_bytes(f"events/dt={day}/part-0.parquet", _parquet(df))
    source, options = any_store.scan_target("events/")
    out = (
        pl.scan_parquet(source, storage_options=options, hive_partitioning=True)
        .filter(pl.col("dt").cast(pl.String) == "2024-06-18", pl.col("event") != "view")
        .collect()
    )
    assert sorted(out["user_id"].to_list()) == [2, 3]


def test_large_file_upload(any_store: ObjectStore, tmp_path: Path) -> None:
    # Above the 5 MiB part size, so the S3 store goes through a multipart upload.
    src = tmp_path / "big.bin"
    payload = bytes(range(256)) * (11 * 4096)  # 11 MiB
    src.write_bytes(payload)
    any_store.put_file("models/big.bin", src)
    assert any_store.stat("models/big.bin").size == len(payload)
    assert any_store.get_bytes("models/big.bin") == payload
    client = getattr(any_store, "client", None)
    if client is not None:
        etag = client.stat_object(any_store.bucket, "models/big.bin").etag  # type: ignore[attr-defined]
        assert "-" in etag  # multipart ETags end in -<parts>
