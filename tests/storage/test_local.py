"""LocalObjectStore specifics: layout on disk, temp files, path safety."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.storage import LocalObjectStore
from services.storage.base import TEMP_PREFIX


def test_layout_and_url(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    store.put_bytes("a/b/c.bin", b"x")
    assert (tmp_path / "root" / "a" / "b" / "c.bin").read_bytes() == b"x"
    assert store.url == f"file://{tmp_path / 'root'}"
    assert store.scan_target("a/b/c.bin") == (str(tmp_path / "root" / "a" / "b" / "c.bin"), None)
    assert oct(os.stat(tmp_path / "root" / "a" / "b" / "c.bin").st_mode & 0o777) == oct(0o644)


def test_temp_files_are_invisible_and_cleaned(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("d/k", b"1")
    (tmp_path / "d" / f"{TEMP_PREFIX}crashed").write_bytes(b"partial")  # left by a crash
    assert [i.key for i in store.list()] == ["d/k"]

    with pytest.raises(FileNotFoundError):
        store.put_file("d/k", tmp_path / "missing")
    assert store.get_bytes("d/k") == b"1"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [f"{TEMP_PREFIX}crashed", "k"]


def test_empty_directories_are_pruned(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "s")
    store.put_bytes("x/y/z", b"1")
    store.delete("x/y/z")
    assert list((tmp_path / "s").iterdir()) == []
    store.put_bytes("x/y/z", b"1")  # directories come back on demand
    assert store.delete_prefix("x/") == 1
    assert list((tmp_path / "s").iterdir()) == []


def test_object_and_directory_conflict(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("a", b"file")
    with pytest.raises(ValueError, match="'a/b'"):
        store.put_bytes("a/b", b"x")
    store.put_bytes("c/d", b"x")
    with pytest.raises(ValueError, match="'c'"):
        store.put_bytes("c", b"x")


def test_path_traversal_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    with pytest.raises(ValueError, match="invalid object key"):
        store.get_bytes("a/../../etc/passwd")
