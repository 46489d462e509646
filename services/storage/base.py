"""The object-store interface every service codes against.

Two implementations sit behind it: ``LocalObjectStore`` (a directory; the embedded default) and
``MinioObjectStore`` (the ``minio`` client against MinIO or any S3-protocol server). Keys are
``/``-separated and never start with ``/``. Single-object writes are atomic in both: a reader sees
the old object or the new one, never a torn one. Multi-object publishes go through
``services.storage.publish`` (data first, manifest last).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Byte-level access to one bucket (or one local root)."""

    #: Human-readable location, e.g. ``file:///var/flashcrowd`` or ``s3://flashcrowd@127.0.0.1:9000``.
    url: str

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """Raise ``ObjectNotFound`` when the key is absent."""
        ...

    def put_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None: ...

    def get_file(self, key: str, path: str) -> None:
        """Download to a local path. Raise ``ObjectNotFound`` when the key is absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order."""
        ...

    def delete(self, key: str) -> None:
        """Delete one key; deleting a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; return how many were deleted."""
        ...

    def scan_target(self, key: str) -> tuple[str, dict[str, str] | None]:
        """Where polars can read ``key`` directly (``scan_parquet(source, storage_options=...)``).

        Local stores return a filesystem path and ``None``; S3 stores return ``s3://bucket/key`` and
        the storage options (endpoint, credentials, region) so that predicate and projection
        pushdown work with ranged reads instead of whole-object downloads.
        """
        ...
