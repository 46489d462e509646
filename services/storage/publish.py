"""Atomic multi-object publish for packs, event datasets, feature snapshots and models.

The rule: write every data object first and the manifest last; readers only trust manifests. A
manifest therefore never points at missing data, and a dead build leaves at most unreferenced data
objects, which ``find_orphans``/``gc_orphans`` find and delete once they are older than a grace
period longer than any publish takes.

Manifest layout (JSON, UTF-8, sorted keys)::

    {...caller fields..., "files": [{"key": ..., "size": ..., "sha256": ...}, ...],
     "published_at": "2024-06-18T12:00:00.000Z"}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from services.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, check_key, check_prefix

log = logging.getLogger(__name__)

MANIFEST_CONTENT_TYPE = "application/json"
#: Orphans younger than this are left alone: they may belong to a publish still in progress.
DEFAULT_GC_GRACE = timedelta(hours=24)
_RESERVED_FIELDS = frozenset({"files", "published_at"})
_HASH_CHUNK = 1024 * 1024

DataSource = bytes | bytearray | memoryview | os.PathLike[str]


class PublishError(RuntimeError):
    """A data object did not land as written (e.g. its stored size differs)."""


def _digest(value: DataSource) -> tuple[int, str]:
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value), hashlib.sha256(value).hexdigest()
    sha = hashlib.sha256()
    size = 0
    with open(value, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _upload(store: ObjectStore, key: str, value: DataSource) -> None:
    if isinstance(value, bytes):
        store.put_bytes(key, value)
    elif isinstance(value, bytearray | memoryview):
        store.put_bytes(key, bytes(value))
    else:
        store.put_file(key, value)


def _cleanup(store: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            # gc_orphans collects whatever we cannot delete now; the original error matters more.
            log.warning("publish cleanup could not delete %r from %s", key, store.url, exc_info=True)


def _may_have_landed(store: ObjectStore, key: str, payload: bytes) -> bool:
    """After a failed manifest write: False only when we can show our manifest is not there."""
    try:
        return store.get_bytes(key) == payload
    except ObjectNotFound:
        return False
    except Exception:
        return True  # unknown state: keep the data rather than risk a manifest without it


def publish(
    store: ObjectStore,
    *,
    data: Mapping[str, DataSource],
    manifest_key: str,
    manifest: Mapping[str, Any],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Upload ``data`` (key -> bytes or local file path), then the manifest; return the manifest written.

    Each data object is checked after upload (stored size == local size) before the manifest is
    written with a ``files`` list (key, size, sha256) and ``published_at``. On any failure before the
    manifest lands, the data objects this call created are deleted (best effort) and the error is
    re-raised. Published versions are immutable: if the manifest or any data key already exists,
    ``FileExistsError`` is raised before anything is written unless ``overwrite=True`` (which gives up
    atomicity for readers of the old manifest; prefer a new version key).
    """
    check_key(manifest_key)
    for key, value in data.items():
        check_key(key)
        if not isinstance(value, bytes | bytearray | memoryview | os.PathLike):
            raise TypeError(f"data[{key!r}] must be bytes or a path-like object, not {type(value).__name__}")
    if manifest_key in data:
        raise ValueError(f"manifest key {manifest_key!r} is also a data key")
    reserved = _RESERVED_FIELDS & set(manifest)
    if reserved:
        raise ValueError(f"manifest fields {sorted(reserved)} are filled in by publish")
    # Fail on unserialisable manifests before uploading anything: strict JSON (no NaN/Infinity,
    # which other engines' JSON readers reject).
    try:
        json.dumps(dict(manifest), sort_keys=True, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"manifest {manifest_key!r} is not strict JSON: {error}") from None

    existing = {key for key in (manifest_key, *data) if store.exists(key)}
    if existing and not overwrite:
        shown = ", ".join(sorted(existing)[:5])
        raise FileExistsError(
            f"refusing to publish {manifest_key!r}: {len(existing)} key(s) already exist ({shown}); "
            "publish under a new version key or pass overwrite=True"
        )

    attempted: list[str] = []
    files: list[dict[str, Any]] = []
    try:
        for key, value in data.items():
            size, sha256 = _digest(value)
            attempted.append(key)  # before the upload: a failed upload may still have landed
            _upload(store, key, value)
            stored = store.stat(key).size
            if stored != size:
                raise PublishError(f"{key!r} landed with {stored} bytes, expected {size}")
            files.append({"key": key, "size": size, "sha256": sha256})
    except BaseException:
        _cleanup(store, [key for key in attempted if key not in existing])
        raise

    published_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    document = {**manifest, "files": sorted(files, key=lambda f: f["key"]), "published_at": published_at}
    payload = json.dumps(document, sort_keys=True, ensure_ascii=False, indent=2, allow_nan=False).encode(
        "utf-8"
    )
    try:
        store.put_bytes(manifest_key, payload, MANIFEST_CONTENT_TYPE)
    except BaseException:
        if not _may_have_landed(store, manifest_key, payload):
            _cleanup(store, [key for key in attempted if key not in existing])
        raise
    return document


def _check_manifest(document: Any, key: str) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("files"), list):
        raise ValueError(f"corrupt manifest {key!r}: expected an object with a 'files' list")
    for entry in document["files"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("key"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"corrupt manifest {key!r}: bad files entry {entry!r}")
    return document


def read_manifest(store: ObjectStore, key: str) -> dict[str, Any]:
    """The manifest at ``key``; ``ObjectNotFound`` if absent, ``ValueError`` if it is not a valid manifest."""
    raw = store.get_bytes(key)
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt manifest {key!r}: {exc}") from exc
    return _check_manifest(document, key)


def verify_manifest(
    store: ObjectStore, manifest: Mapping[str, Any], *, check_hashes: bool = False
) -> list[str]:
    """Keys the manifest lists that are missing or of the wrong size (or hash, if ``check_hashes``).

    ``check_hashes`` downloads every object into memory; the default only stats them.
    """
    bad: list[str] = []
    for entry in manifest["files"]:
        key = entry["key"]
        try:
            info = store.stat(key)
        except ObjectNotFound:
            bad.append(key)
            continue
        if info.size != entry["size"] or (
            check_hashes and hashlib.sha256(store.get_bytes(key)).hexdigest() != entry["sha256"]
        ):
            bad.append(key)
    return bad


def find_orphans(
    store: ObjectStore,
    prefix: str,
    manifest_suffix: str = "manifest.json",
    *,
    grace: timedelta = DEFAULT_GC_GRACE,
    now: datetime | None = None,
) -> list[ObjectInfo]:
    """Objects under ``prefix`` that no manifest under ``prefix`` references and older than ``grace``.

    Manifests are the keys ending in ``manifest_suffix``; they are never orphans. Data referenced
    only by manifests outside ``prefix`` would look orphaned, so pass a prefix that holds both (e.g.
    ``packs/``). Next to a corrupt manifest nothing is reported, since what it referenced is unknown.
    """
    check_prefix(prefix)
    objects = [*store.list(prefix)]  # listed before manifests are read: see grace above
    referenced: set[str] = set()
    protected: list[str] = []
    for info in objects:
        if not info.key.endswith(manifest_suffix):
            continue
        try:
            referenced.update(entry["key"] for entry in read_manifest(store, info.key)["files"])
        except ObjectNotFound:
            continue  # deleted since the listing
        except ValueError:
            log.warning("corrupt manifest %r in %s: keeping its neighbours", info.key, store.url)
            protected.append(info.key.rsplit("/", 1)[0] + "/" if "/" in info.key else "")
    cutoff = (now or datetime.now(UTC)) - grace
    return [
        info
        for info in objects
        if not info.key.endswith(manifest_suffix)
        and info.key not in referenced
        and not any(info.key.startswith(p) for p in protected)
        and info.modified is not None
        and info.modified < cutoff
    ]


def gc_orphans(
    store: ObjectStore,
    prefix: str,
    manifest_suffix: str = "manifest.json",
    *,
    grace: timedelta = DEFAULT_GC_GRACE,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete what ``find_orphans`` reports (unless ``dry_run``); return the keys."""
    keys = [info.key for info in find_orphans(store, prefix, manifest_suffix, grace=grace, now=now)]
    if not dry_run:
        for key in keys:
            with contextlib.suppress(ObjectNotFound):
                store.delete(key)
        if keys:
            log.info("gc_orphans deleted %d object(s) under %r in %s", len(keys), prefix, store.url)
    return keys
