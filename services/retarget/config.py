"""Settings of the retarget service (``FLASHCROWD_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field, field_validator

from services.runtime import BaseServiceSettings

DEFAULT_DATABASE_URL = "sqlite:///./var/retarget.db"


class RetargetSettings(BaseServiceSettings):
    """Ledger location, audience service address, pool and launch sizes.

    ``database_url`` is ``postgresql://user@host:port/db`` (psycopg conninfo URL) or
    ``sqlite:///relative/path.db`` / ``sqlite:////absolute/path.db`` (the embedded default).
    """

    database_url: str = DEFAULT_DATABASE_URL
    #: ``host:port`` of the audience service (GetPack / ExportPack at launch and campaign creation).
    audience_target: str = "127.0.0.1:50051"
    #: Seconds for one GetPack call, and for one ExportPack page to arrive.
    audience_timeout_seconds: float = Field(default=30.0, gt=0)
    #: PostgreSQL connections (and the worker threads that use them: one each).
    pool_min_size: int = Field(default=2, ge=1)
    pool_max_size: int = Field(default=16, ge=1, le=200)
    #: Worker threads (each with its own connection) for SQLite; it has one writer anyway.
    sqlite_workers: int = Field(default=4, ge=1, le=64)
    #: Smallest audience pack a tenant may launch a campaign on (a campaign's report would single
    #: out the members of a smaller one). Platform principals are not held to it.
    min_targetable_pack_size: int = Field(default=100, ge=1)
    #: Audience members handled per launch transaction.
    launch_batch_size: int = Field(default=2000, ge=1, le=100_000)
    #: User ids per ExportPack page requested at launch.
    launch_page_size: int = Field(default=20_000, ge=1, le=100_000)
    #: A launcher renews its lease on a RUNNING campaign this often; another process may take over
    #: a launch whose lease expired. Correctness never depends on it (see launcher.py).
    launch_lease_seconds: float = Field(default=20.0, gt=0)
    #: Identity of this process for launch leases; defaults to the host name (a restarted pod or
    #: process on the same host takes its launches back at once).
    instance_id: str = ""
    #: Resume RUNNING launches when the server starts.
    resume_launches: bool = True
    #: StreamOffers: rows per database read, poll period and longest follow of one stream.
    stream_batch_size: int = Field(default=500, ge=1, le=10_000)
    stream_poll_seconds: float = Field(default=0.5, gt=0)
    stream_follow_max_seconds: float = Field(default=300.0, gt=0)
    #: The event stream (``nats://host:port``, or ``memory://NAME`` in one process) whose ``pay`` and
    #: ``refund`` events are attributed to campaigns (services/retarget/order_feed.py); empty: no feed
    #: (reports then count redemptions only).
    bus_url: str = ""
    #: Shards of the event stream (as the ingest service's ``FLASHCROWD_BUS_SHARDS``).
    bus_shards: int = Field(default=4, ge=1, le=256)

    @field_validator("bus_url")
    @classmethod
    def _bus_scheme(cls, value: str) -> str:
        value = value.strip()
        if value and not value.lower().startswith(("memory://", "nats://", "tls://")):
            raise ValueError("expected nats://host:port, memory://NAME or empty (no order feed)")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value
