"""Where a lake table lives: the ``ObjectStore`` a service already has, as a Delta table URI.

``{prefix}tables/{table}/`` on the same store: a directory for a ``LocalObjectStore``, an
``s3://bucket/...`` URI plus object_store options for a ``MinioObjectStore`` (the options polars
uses too, so both engines reach the store the same way). Delta's commit on S3 is a conditional put
(``If-None-Match: *`` on ``_delta_log/NNN.json``), which MinIO, AWS S3 and moto's server honour, so
no lock service is configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from services.storage.base import ObjectStore, check_prefix

__all__ = ["TableLocation", "table_location"]


@dataclass(frozen=True)
class TableLocation:
    table: str
    #: Store key prefix of the table root (ends with ``/``).
    key_prefix: str
    uri: str
    storage_options: dict[str, str] | None

    def key_of(self, relative_path: str) -> str:
        """Store key of a path from the Delta log (relative to the table root, percent-encoded)."""
        return self.key_prefix + unquote(relative_path)

    @property
    def log_prefix(self) -> str:
        return self.key_prefix + "_delta_log/"


def table_location(store: ObjectStore, prefix: str, table: str) -> TableLocation:
    key_prefix = check_prefix(f"{prefix}tables/{table}/")
    target, options = store.scan_target(key_prefix)
    uri = target.rstrip("/")
    return TableLocation(table, key_prefix, uri, dict(options) if options else None)
