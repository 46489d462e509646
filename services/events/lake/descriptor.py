"""``{prefix}lake.json``: what marks a prefix as an event lake, written once, last, by its creator.

It holds what does not change with appends (world key, population, the generator's config, how the
identity map is keyed, creation stats); what changes (files, days, time range, ingest positions)
is only in the Delta logs, so no document grows or is rewritten per append.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from services.storage.base import ObjectNotFound, ObjectStore

__all__ = ["LAKE_FORMAT", "descriptor_key", "read_descriptor", "write_descriptor"]

LAKE_FORMAT = "flashcrowd.events.lake/v1"


def descriptor_key(prefix: str) -> str:
    return prefix + "lake.json"


def read_descriptor(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """The descriptor under ``prefix``; ``None`` if absent; ``ValueError`` if it is not a lake's."""
    key = descriptor_key(prefix)
    try:
        raw = store.get_bytes(key)
    except ObjectNotFound:
        return None
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"corrupt lake descriptor {key!r}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != LAKE_FORMAT:
        raise ValueError(f"{key!r} is not a lake descriptor (expected format {LAKE_FORMAT!r})")
    return document


def write_descriptor(store: ObjectStore, prefix: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    document = {
        **fields,
        "format": LAKE_FORMAT,
        "prefix": prefix,
        "published_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    payload = json.dumps(document, sort_keys=True, ensure_ascii=False, indent=1, allow_nan=False)
    store.put_bytes(descriptor_key(prefix), payload.encode("utf-8"), "application/json")
    return document
