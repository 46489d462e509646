"""The object-store interface every service codes against.

Two implementations sit behind it: ``LocalObjectStore`` (a directory; the embedded default) and
``MinioObjectStore`` (the ``minio`` client against MinIO or any S3-protocol server). ``open_store(url)``
picks one from a single URL setting. Keys are ``/``-separated, never start with ``/`` and have no
empty, ``.`` or ``..`` segments, NUL or backslash (``check_key``); both stores enforce the same rule
so that code which works on one works on the other. Single-object writes are atomic in both: a
reader sees the old object or the new one, never a torn one. Multi-object publishes go through
``services.storage.publish`` (data first, manifest last).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from services.runtime.errors import Unavailable

#: Prefix of the temporary files the local store writes before renaming; keys may not use it.
TEMP_PREFIX = ".flashcrowd-tmp-"

StrPath = str | os.PathLike[str]


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class StoreUnavailable(Unavailable):
    """The object store cannot be reached in time (connection refused, timed out, 5xx): retryable.

    A ``runtime.Unavailable``, so that every RPC touching a store that is down answers UNAVAILABLE
    with RetryInfo rather than INTERNAL.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_seconds=1.0, reason="OBJECT_STORE_UNAVAILABLE")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object (or, in a non-recursive listing, one common prefix: key ends with ``/``, size 0)."""

    key: str
    size: int
    modified: datetime | None = None


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be relative (no leading '/')")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"invalid object key {key!r}: NUL and backslash are not allowed")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' and '..' segments are not allowed")
        if segment.startswith(TEMP_PREFIX):
            raise ValueError(f"invalid object key {key!r}: {TEMP_PREFIX!r} is reserved for temporary files")
    return key


def check_prefix(prefix: str) -> str:
    """Like ``check_key`` but allows ``""`` and a trailing ``/`` (``events/`` or ``events/dt=2024``)."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@runtime_checkable
class ObjectStore(Protocol):
    """Byte-level access to one bucket (or one local root)."""

    #: Location without secrets, accepted by ``open_store`` (credentials then come from the environment),
    #: e.g. ``file:///var/flashcrowd`` or ``s3://127.0.0.1:9000/flashcrowd``.
    url: str

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """Raise ``ObjectNotFound`` when the key is absent."""
        ...

    def put_file(self, key: str, path: StrPath, content_type: str = "application/octet-stream") -> None:
        """Upload a local file (``FileNotFoundError`` if it does not exist)."""
        ...

    def get_file(self, key: str, path: StrPath) -> None:
        """Download to a local path (parents created, replaced atomically).

        Raise ``ObjectNotFound`` when the key is absent.
        """
        ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ObjectInfo:
        """Raise ``ObjectNotFound`` when the key is absent."""
        ...

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), in key order.

        With ``recursive=False`` keys are grouped at the first ``/`` after the prefix, as with an S3
        delimiter: deeper keys appear once as a common prefix (``ObjectInfo(key="a/b/", size=0)``).
        """
        ...

    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; return how many were deleted.

        An empty prefix raises ``ValueError``: wiping a whole store is never what a caller meant.
        """
        ...

    def scan_target(self, key: str) -> tuple[str, dict[str, str] | None]:
        """Where polars can read ``key`` directly (``scan_parquet(source, storage_options=...)``).

        Local stores return a filesystem path and ``None``; S3 stores return ``s3://bucket/key`` and
        the storage options (endpoint, credentials, region) so that predicate and projection
        pushdown work with ranged reads instead of whole-object downloads. ``key`` may also be a
        glob such as ``events/dt=2024-06-18/part-*.parquet``; polars expands it.
        """
        ...
