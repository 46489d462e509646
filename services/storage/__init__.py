"""Object storage for packs, events, features and models.

One interface (``ObjectStore``), a local-directory default and MinIO/S3, chosen by ``open_store(url)``;
multi-object publishes go through ``publish`` (data first, manifest last).
"""

from services.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, check_key, check_prefix
from services.storage.factory import DEFAULT_STORE_URL, open_store
from services.storage.local import LocalObjectStore
from services.storage.publish import (
    DEFAULT_GC_GRACE,
    PublishError,
    find_orphans,
    gc_orphans,
    publish,
    read_manifest,
    verify_manifest,
)
from services.storage.s3 import MinioObjectStore

__all__ = [
    "DEFAULT_GC_GRACE",
    "DEFAULT_STORE_URL",
    "LocalObjectStore",
    "MinioObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PublishError",
    "check_key",
    "check_prefix",
    "find_orphans",
    "gc_orphans",
    "open_store",
    "publish",
    "read_manifest",
    "verify_manifest",
]
