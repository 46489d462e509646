"""Settings of the audience service (``FLASHCROWD_*`` environment variables).

``load_settings(AudienceSettings)`` fails at start with the variable named, e.g.
``FLASHCROWD_MAX_CONCURRENT_BUILDS: Input should be greater than or equal to 1 (got '0')``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from services.events.pepper import Pepper, load_pepper, parse_pepper
from services.runtime import BaseServiceSettings
from services.storage import DEFAULT_STORE_URL, check_prefix

_STORE_SCHEMES = ("file://", "s3://")


def _prefix(value: Any, *, name: str) -> Any:
    if not isinstance(value, str):
        return value
    if value and not value.endswith("/"):
        value += "/"
    try:
        check_prefix(value)
    except ValueError as error:
        raise ValueError(f"invalid {name}: {error}") from None
    return value


class AudienceSettings(BaseServiceSettings):
    """Fields of the audience process; each reads ``FLASHCROWD_<FIELD>``."""

    #: Object store holding the event dataset, packs and operations (``open_store`` URL).
    store_url: str = DEFAULT_STORE_URL
    #: Where the event dataset (events, profiles, identity map, manifest) lives in the store.
    dataset_prefix: str = "data/"
    #: Where packs (bitmaps + manifests) live.
    packs_prefix: str = "packs/"
    #: Builds running at once in this process (threads; polars releases the GIL for most of a build).
    max_concurrent_builds: int = Field(default=2, ge=1, le=64)
    #: ``audience-worker`` processes this server starts beside itself (``python -m
    #: services.audience.worker``): they run the pack builds of the shared queue, so that builds never
    #: compete with CheckMembership for this process's GIL. 0: builds run on this process's threads.
    worker_processes: int = Field(default=0, ge=0, le=64)
    #: Child processes computing personas (compute_pool.py), off the serving process's GIL.
    #: 0: personas are computed on this process's threads.
    compute_processes: int = Field(default=0, ge=0, le=64)
    #: An operation's owner renews its lease every second; a replica or worker that stopped renewing
    #: for this long is presumed dead and its builds are taken over (queued again) by another.
    operation_lease_seconds: float = Field(default=15.0, ge=1.0, le=3600.0)
    #: Global safety cap of builds waiting for a worker, all tenants together (one more is refused
    #: with RESOURCE_EXHAUSTED and retry info). Far above the per-tenant limit below: tenants are
    #: refused by their own limit long before the server's queue fills.
    max_queued_builds: int = Field(default=1000, ge=0, le=100_000)
    #: Smallest pack a persona is computed for (privacy minimum).
    persona_min_size: int = Field(default=1000, ge=1)
    #: Tenants' view of counts (services/audience/privacy.py, PRIVACY.md): sizes below this read
    #: "fewer than" (0, BELOW_MINIMUM); Laplace noise at these epsilons; a budget per tenant per UTC day.
    privacy_min_reported_size: int = Field(default=100, ge=1)
    privacy_epsilon_size: float = Field(default=0.5, gt=0, le=10)
    privacy_epsilon_persona: float = Field(default=3.0, gt=0, le=50)
    privacy_daily_budget: float = Field(default=60.0, gt=0)
    #: Rows one upload may carry; more refuses the whole upload.
    upload_max_rows: int = Field(default=5_000_000, ge=1)
    #: Pack bitmaps kept in memory for CheckMembership (LRU).
    membership_cache_packs: int = Field(default=64, ge=1)
    #: Cached packs whose ids are all below this also keep a plain bitset (max id / 8 bytes) that
    #: answers CheckMembership ~10x faster; 0 disables it.
    membership_dense_max_ids: int = Field(default=1 << 28, ge=0, le=1 << 32)
    #: How often (ms) CheckMembership re-reads a cached pack's latest-version pointer.
    membership_refresh_ms: int = Field(default=2000, ge=0)
    #: Longest a WaitOperation call blocks when the request sets no (or a longer) timeout.
    max_wait_seconds: float = Field(default=60.0, gt=0)
    # --- per-tenant quotas (services/audience/quotas.py); platform principals are exempt ------------
    #: Live packs one tenant may have (CreateLivePack past it: RESOURCE_EXHAUSTED, TENANT_QUOTA).
    tenant_max_live_packs: int = Field(default=50, ge=1, le=100_000)
    #: Builds (CreatePack, RefreshPack, ExpandLookalike) one tenant may have waiting for a worker.
    tenant_max_queued_builds: int = Field(default=20, ge=1, le=10_000)
    #: Builds of one tenant running at once (a scheduling cap, never a refusal: more wait their turn,
    #: and the build queue serves tenants round-robin).
    tenant_max_running_builds: int = Field(default=1, ge=1, le=64)
    #: Uploads (UploadPack calls that publish a pack) per tenant per UTC day, counted across replicas.
    tenant_max_uploads_per_day: int = Field(default=200, ge=1, le=10_000_000)
    #: Rows of those uploads per tenant per UTC day.
    tenant_max_upload_rows_per_day: int = Field(default=50_000_000, ge=1, le=10**12)
    #: Accepted lookalike expansions per tenant per UTC day.
    tenant_max_expansions_per_day: int = Field(default=100, ge=1, le=10_000_000)
    #: Accepted lookalike model trainings per operation owner per UTC day. Only platform principals
    #: may train, so this is the one quota platform principals are subject to.
    max_trainings_per_day: int = Field(default=48, ge=1, le=100_000)
    #: Shared control-plane database (operations and their queue, pack-id reservations, quota
    #: counters, privacy ledger): ``postgresql://...`` when several replicas serve (they then share
    #: them), ``sqlite:///path``; unset: a SQLite file beside a local store's directory
    #: (``<store>.control.sqlite3``), else ``./var/audience-control-<hash of the store URL>.sqlite3``.
    control_database_url: str = ""
    #: HMAC key of the identity map (hex or base64 of >= 32 bytes; a Kubernetes Secret). Unset: the
    #: embedded default file ``./var/identity-pepper`` (``services.events.pepper``).
    identity_pepper: SecretStr | None = Field(default=None, repr=False)

    def pepper(self) -> Pepper:
        """The identity pepper: this setting, else the embedded default (created on first use)."""
        value = self.identity_pepper
        return load_pepper(value.get_secret_value() if value is not None else None, environ={})

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" in value and not value.lower().startswith(_STORE_SCHEMES):
            raise ValueError("expected file:///path, file://./relative, s3://host/bucket or a plain path")
        if value.lower().startswith("s3://"):
            parts = urlsplit(value)
            if not parts.hostname or not parts.path.strip("/") or "/" in parts.path.strip("/"):
                raise ValueError(
                    "an S3 store URL names a host and exactly one bucket: s3://host[:port]/bucket"
                )
        return value

    @field_validator("dataset_prefix", "packs_prefix", mode="before")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        return _prefix(value, name="prefix")

    @field_validator("control_database_url")
    @classmethod
    def _control_database_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("expected postgresql://user@host:port/database or sqlite:///path")
        return value

    @field_validator("identity_pepper")
    @classmethod
    def _pepper(cls, value: SecretStr | None) -> SecretStr | None:
        # parse_pepper raises ConfigError (not a ValueError) so that pydantic does not echo the value.
        if value is not None:
            parse_pepper(value.get_secret_value())
        return value


__all__ = ["AudienceSettings"]
