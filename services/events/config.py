"""Settings of the real-time path: event bus, ingest, compactor (``FLASHCROWD_*`` variables).

``FLASHCROWD_BUS_URL`` picks the bus: ``memory://`` (embedded default: in-process, for the demo)
or ``nats://127.0.0.1:4222`` (NATS JetStream).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from services.runtime import BaseServiceSettings
from services.storage import DEFAULT_STORE_URL, check_prefix

__all__ = ["RealtimeSettings"]


class RealtimeSettings(BaseServiceSettings):
    """Fields of the ingest and compactor processes; each reads ``FLASHCROWD_<FIELD>``."""

    #: ``memory://`` (in-process) or ``nats://host:port[?stream=NAME]``.
    bus_url: str = "memory://"
    #: Shards of the event stream (subjects ``flashcrowd.events.<shard>``); a user's events always
    #: land in the shard owning its bucket (``services.events.sharding``).
    bus_shards: int = Field(default=4, ge=1, le=256)
    #: How long (s) ingest waits for the stream to confirm a batch before answering UNAVAILABLE.
    ingest_ack_timeout: float = Field(default=2.0, gt=0, le=60)
    #: Events one request may carry.
    ingest_max_events: int = Field(default=10_000, ge=1, le=100_000)
    #: Events per bus message (per shard).
    ingest_message_events: int = Field(default=1000, ge=1, le=10_000)
    #: Events later than now + this are rejected.
    ingest_max_future_seconds: float = Field(default=300.0, ge=0)
    #: Events older than now - this are rejected (the retention window of the dataset).
    ingest_retention_days: float = Field(default=400.0, gt=0)
    #: Object store holding the event dataset (``open_store`` URL).
    store_url: str = DEFAULT_STORE_URL
    #: Where the event dataset lives in the store.
    dataset_prefix: str = "data/"
    #: Compactor: publish a micro-batch at this many events ...
    compactor_max_events: int = Field(default=500_000, ge=1)
    #: ... or when its oldest event has waited this long (s), whichever comes first.
    compactor_max_age_seconds: float = Field(default=60.0, gt=0, le=3600)
    #: Name of the compactor's durable consumer (in a lake also the application id of its commits:
    #: one per replica).
    compactor_consumer: str = Field(default="compactor", min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    #: Bus shards this compactor replica reads: "" (all), "0-3" or "0,2,5" (a lake only).
    compactor_shards: str = ""
    #: Fault injection for crash tests only (0 in production): seconds the compactor pauses after
    #: uploading parts, before the manifest ...
    compactor_pause_before_manifest_seconds: float = Field(default=0.0, ge=0, le=600)
    #: ... and after the manifest, before acknowledging the stream.
    compactor_pause_before_ack_seconds: float = Field(default=0.0, ge=0, le=600)

    @field_validator("bus_url")
    @classmethod
    def _bus_url(cls, value: str) -> str:
        value = value.strip()
        if not value.lower().startswith(("memory://", "nats://", "tls://")):
            raise ValueError("expected memory:// or nats://host:port")
        return value

    @field_validator("compactor_shards")
    @classmethod
    def _shards(cls, value: str) -> str:
        parse_shard_list(value)
        return value.strip()

    def compactor_shard_list(self) -> list[int] | None:
        shards = parse_shard_list(self.compactor_shards)
        if shards is not None and any(s >= self.bus_shards for s in shards):
            raise ValueError(f"FLASHCROWD_COMPACTOR_SHARDS names shards outside 0..{self.bus_shards - 1}")
        return shards

    @field_validator("dataset_prefix", mode="before")
    @classmethod
    def _prefix(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value and not value.endswith("/"):
                value += "/"
            check_prefix(value)
        return value


def parse_shard_list(text: str) -> list[int] | None:
    """``""`` -> None (every shard); ``"0-3"`` / ``"0,2,5"`` / ``"0-1,4"`` -> sorted shard numbers."""
    text = text.strip()
    if not text:
        return None
    shards: set[int] = set()
    for piece in text.split(","):
        lo, sep, hi = piece.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad shard list {text!r}: expected e.g. 0-3 or 0,2,5")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"bad shard range {piece.strip()!r} in {text!r}: end before start")
        shards.update(range(first, last + 1))
    return sorted(shards)
