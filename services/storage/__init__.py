"""Object storage for packs, events, features and models: one interface, a local-directory default and MinIO/S3."""

from services.storage.base import ObjectInfo, ObjectNotFound, ObjectStore

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore"]
