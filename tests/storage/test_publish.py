"""Atomic publish (data first, manifest last), manifest checks and orphan GC on both stores."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.storage import (
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    find_orphans,
    gc_orphans,
    publish,
    read_manifest,
    verify_manifest,
)
from services.storage.base import StrPath


class Recording:
    """Delegates to a real store, recording writes and optionally failing one of them."""

    def __init__(self, inner: ObjectStore, fail_on: str | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.writes: list[str] = []
        self.fail_on = fail_on

    def _record(self, key: str) -> None:
        if key == self.fail_on:
            raise ConnectionError(f"injected failure writing {key}")
        self.writes.append(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._record(key)
        self.inner.put_bytes(key, data, content_type)

    def put_file(self, key: str, path: StrPath, content_type: str = "application/octet-stream") -> None:
        self._record(key)
        self.inner.put_file(key, path, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, recursive)


def _data(tmp_path: Path) -> dict[str, bytes | Path]:
    big = tmp_path / "users.roaring"
    big.write_bytes(b"R" * 70_000)
    return {"packs/t1/p1/v1/shard-0.roaring": big, "packs/t1/p1/v1/stats.json": b'{"n": 3}'}


def test_publish_writes_manifest_last(any_store: ObjectStore, tmp_path: Path) -> None:
    store = Recording(any_store)
    written = publish(
        store,
        data=_data(tmp_path),
        manifest_key="packs/t1/p1/v1/manifest.json",
        manifest={"pack": "tenants/t1/packs/p1", "version": 1, "shards": 1, "name": "双十一"},
    )
    assert store.writes[-1] == "packs/t1/p1/v1/manifest.json"
    assert sorted(store.writes[:-1]) == ["packs/t1/p1/v1/shard-0.roaring", "packs/t1/p1/v1/stats.json"]

    manifest = read_manifest(any_store, "packs/t1/p1/v1/manifest.json")
    assert manifest == written
    assert manifest["pack"] == "tenants/t1/packs/p1" and manifest["name"] == "双十一"
    assert manifest["files"] == [
        {
            "key": "packs/t1/p1/v1/shard-0.roaring",
            "size": 70_000,
            "sha256": hashlib.sha256(b"R" * 70_000).hexdigest(),
        },
        {"key": "packs/t1/p1/v1/stats.json", "size": 8, "sha256": hashlib.sha256(b'{"n": 3}').hexdigest()},
    ]
    assert datetime.fromisoformat(manifest["published_at"]).tzinfo is not None
    raw = any_store.get_bytes("packs/t1/p1/v1/manifest.json")
    assert raw.decode("utf-8") == json.dumps(manifest, sort_keys=True, ensure_ascii=False, indent=2)
    assert verify_manifest(any_store, manifest, check_hashes=True) == []


def test_failing_data_write_leaves_nothing(any_store: ObjectStore, tmp_path: Path) -> None:
    data: dict[str, bytes | Path] = {
        "ds/v1/part-0": b"first",
        "ds/v1/part-1": tmp_path / "vanished.parquet",  # fails midway, after part-0 landed
        "ds/v1/part-2": b"never written",
    }
    store = Recording(any_store)
    with pytest.raises(FileNotFoundError):
        publish(store, data=data, manifest_key="ds/v1/manifest.json", manifest={})
    assert store.writes == ["ds/v1/part-0"]  # part-0 really was written, then cleaned up
    assert [*any_store.list("ds/")] == []


def test_failing_upload_and_failing_manifest_clean_up(any_store: ObjectStore) -> None:
    data = {"m/v1/a": b"a", "m/v1/b": b"b"}
    with pytest.raises(ConnectionError):
        publish(
            Recording(any_store, fail_on="m/v1/b"), data=data, manifest_key="m/v1/manifest.json", manifest={}
        )
    assert [*any_store.list("m/")] == []

    with pytest.raises(ConnectionError):
        publish(
            Recording(any_store, fail_on="m/v1/manifest.json"),
            data=data,
            manifest_key="m/v1/manifest.json",
            manifest={},
        )
    assert [*any_store.list("m/")] == []


def test_published_versions_are_immutable(any_store: ObjectStore) -> None:
    publish(any_store, data={"v/1/d": b"one"}, manifest_key="v/1/manifest.json", manifest={})
    with pytest.raises(FileExistsError, match="new version key"):
        publish(any_store, data={"v/1/d": b"two"}, manifest_key="v/1/manifest.json", manifest={})
    assert any_store.get_bytes("v/1/d") == b"one"

    # A retry over a dead build's leftovers, and a failure during it, keeps pre-existing objects.
    any_store.put_bytes("v/2/d", b"leftover")
    with pytest.raises(FileNotFoundError):
        publish(
            any_store,
            data={"v/2/d": b"new", "v/2/e": Path("/nonexistent/x")},
            manifest_key="v/2/manifest.json",
            manifest={},
            overwrite=True,
        )
    assert [i.key for i in any_store.list("v/2/")] == ["v/2/d"]
    publish(any_store, data={"v/2/d": b"new"}, manifest_key="v/2/manifest.json", manifest={}, overwrite=True)
    assert verify_manifest(any_store, read_manifest(any_store, "v/2/manifest.json")) == []


def test_publish_argument_errors(any_store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="filled in by publish"):
        publish(any_store, data={}, manifest_key="x/manifest.json", manifest={"files": []})
    with pytest.raises(ValueError, match="also a data key"):
        publish(any_store, data={"x/m": b""}, manifest_key="x/m", manifest={})
    with pytest.raises(TypeError, match="path-like"):
        publish(any_store, data={"x/d": "text is ambiguous"}, manifest_key="x/m", manifest={})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        publish(any_store, data={"x/d": b""}, manifest_key="x/m", manifest={"when": object()})
    for bad in (float("inf"), float("nan")):  # strict JSON only: other engines reject these
        with pytest.raises(ValueError, match="'x/m' is not strict JSON"):
            publish(any_store, data={"x/d": b""}, manifest_key="x/m", manifest={"stats": {"rate": bad}})
    assert [*any_store.list("x/")] == []


def test_verify_manifest_detects_missing_and_resized(any_store: ObjectStore) -> None:
    manifest = publish(
        any_store,
        data={"f/a": b"aaa", "f/b": b"bbb", "f/c": b"ccc"},
        manifest_key="f/manifest.json",
        manifest={},
    )
    any_store.delete("f/a")
    any_store.put_bytes("f/b", b"bbbb")
    any_store.put_bytes("f/c", b"CCC")  # same size: only the hash check sees it
    assert verify_manifest(any_store, manifest) == ["f/a", "f/b"]
    assert verify_manifest(any_store, manifest, check_hashes=True) == ["f/a", "f/b", "f/c"]


def test_read_manifest_errors(any_store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        read_manifest(any_store, "none/manifest.json")
    any_store.put_bytes("bad/manifest.json", b'{"files": [')
    with pytest.raises(ValueError, match=r"corrupt manifest 'bad/manifest\.json'"):
        read_manifest(any_store, "bad/manifest.json")
    any_store.put_bytes("bad2/manifest.json", b'{"files": [{"key": 1}]}')
    with pytest.raises(ValueError, match="bad files entry"):
        read_manifest(any_store, "bad2/manifest.json")
    any_store.put_bytes("bad3/manifest.json", b"\xff\xfe")
    with pytest.raises(ValueError, match="corrupt"):
        read_manifest(any_store, "bad3/manifest.json")


def test_find_and_gc_orphans(any_store: ObjectStore) -> None:
    publish(any_store, data={"packs/p/v1/d": b"live"}, manifest_key="packs/p/v1/manifest.json", manifest={})
    any_store.put_bytes("packs/p/v2/d", b"dead build")  # data written, manifest never was
    any_store.put_bytes("packs/q/v1/d", b"next to a corrupt manifest")
    any_store.put_bytes("packs/q/v1/manifest.json", b"not json")
    later = datetime.now(UTC) + timedelta(hours=2)

    # Fresh objects may belong to a publish in progress.
    assert find_orphans(any_store, "packs/") == []
    assert [i.key for i in find_orphans(any_store, "packs/", grace=timedelta(hours=1), now=later)] == [
        "packs/p/v2/d"
    ]
    assert gc_orphans(any_store, "packs/", grace=timedelta(hours=1), now=later, dry_run=True) == [
        "packs/p/v2/d"
    ]
    assert any_store.exists("packs/p/v2/d")
    assert gc_orphans(any_store, "packs/", grace=timedelta(hours=1), now=later) == ["packs/p/v2/d"]
    assert [i.key for i in any_store.list("packs/")] == [
        "packs/p/v1/d",
        "packs/p/v1/manifest.json",
        "packs/q/v1/d",
        "packs/q/v1/manifest.json",
    ]
