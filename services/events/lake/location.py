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


#: delta-rs on S3 fails fast like ``MinioObjectStore`` (its default is 10 retries over up to 180 s per
#: request): a store that is down surfaces as ``StoreUnavailable`` within seconds, and the caller
#: (the compactor's loop) backs off and retries the whole batch.
DELTA_CLIENT_OPTIONS = {"connect_timeout": "2s", "timeout": "30s", "max_retries": "2", "retry_timeout": "10s"}


@dataclass(frozen=True)
class TableLocation:
    table: str
    #: Store key prefix of the table root (ends with ``/``).
    key_prefix: str
    uri: str
    #: What polars needs to read the table's files (``ObjectStore.scan_target``'s options).
    scan_options: dict[str, str] | None

    @property
    def storage_options(self) -> dict[str, str] | None:
        """What delta-rs needs: the scan options plus the fail-fast client settings."""
        return None if self.scan_options is None else {**self.scan_options, **DELTA_CLIENT_OPTIONS}

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
