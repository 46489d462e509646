"""Settings of the gateway (``FLASHCROWD_*`` environment variables).

``load_settings(GatewaySettings)`` fails at start with the variable named. Per-method rate limits are
JSON: ``FLASHCROWD_RATE_LIMITS='{"CheckMembership": {"rate": 500, "burst": 1000}}'`` (keys are a
method name, ``Service/Method`` or the full ``/pkg.Service/Method`` path; the most specific wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from services.runtime import BaseServiceSettings
from services.runtime.config import MIB


class RateLimit(BaseModel):
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    model_config = {"frozen": True}

    rate: float = Field(gt=0)
    burst: float = Field(gt=0)


class GatewaySettings(BaseServiceSettings):
    """Fields of the gateway process; each reads ``FLASHCROWD_<FIELD>``."""

    #: Callers send smaller messages than the backends exchange: 4 MiB unless told otherwise.
    max_message_bytes: int = Field(default=4 * MIB, gt=0)

    # --- backends -------------------------------------------------------------------------
    #: ``host:port`` of the audience service (AudienceService, LookalikeService, EventService, LROs).
    audience_target: str = "127.0.0.1:50051"
    #: ``host:port`` of the retarget service (RetargetService, its LROs).
    retarget_target: str = "127.0.0.1:50052"
    #: ``host:port`` of the sale monitor (SaleMonitorService, ``python -m services.monitor``).
    sale_monitor_target: str = "127.0.0.1:50053"
    #: Channels per backend (each its own HTTP/2 connection), used round-robin.
    channel_pool_size: int = Field(default=2, ge=1, le=64)
    #: Longest a connection attempt to a backend may take before calls fail UNAVAILABLE.
    connect_timeout_seconds: float = Field(default=1.0, gt=0)
    #: Cap of the reconnect backoff, so a restarted backend is found again quickly.
    max_reconnect_backoff_seconds: float = Field(default=2.0, gt=0)
    #: How often each backend's health is checked: a proxied service reports NOT_SERVING in the
    #: gateway's own health while the backend behind it does not answer SERVING.
    backend_health_interval_seconds: float = Field(default=5.0, gt=0)

    # --- deadlines and retries ------------------------------------------------------------
    #: Deadline given to backend calls when the caller set none.
    default_deadline_seconds: float = Field(default=30.0, gt=0)
    #: Taken off the caller's remaining time so the gateway can still answer before it expires.
    deadline_margin_seconds: float = Field(default=0.05, ge=0)
    #: Attempts of an idempotent call (1 = no retries).
    retry_max_attempts: int = Field(default=3, ge=1, le=10)
    retry_initial_backoff_seconds: float = Field(default=0.05, gt=0)
    retry_max_backoff_seconds: float = Field(default=1.0, gt=0)
    #: Retries may add at most this share of calls (a token bucket refilled by each call).
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    #: Retries always allowed per second on top of the ratio, so a quiet gateway still retries.
    retry_budget_min_per_second: float = Field(default=5.0, ge=0)

    # --- authentication -------------------------------------------------------------------
    #: SQLite file of tenants and hashed API keys; ``:memory:`` keeps them for the process only.
    keystore_path: str = "./var/gateway-keys.sqlite3"
    #: Shared key store for several replicas (``postgresql://user@host/db``); overrides keystore_path.
    keystore_url: str = ""
    #: An API key (``fc_<id>_<secret>``) with the system admin scope, for creating the first tenants.
    bootstrap_admin_key: SecretStr | None = None
    #: Seconds a verified API key / tenant lookup is reused before the store is read again.
    auth_cache_seconds: float = Field(default=1.0, ge=0)
    #: Shortest pause between two refreshes of the in-memory set of key ids (key_directory.py): an
    #: unknown id waits for at most one refresh, a flood of made-up ids costs a few queries a second.
    key_directory_refresh_seconds: float = Field(default=0.25, ge=0)
    #: HS256 shared secret for JWT bearer tokens (unset: HS256 tokens are refused).
    jwt_hs256_secret: SecretStr | None = None
    #: RS256 public key (PEM text, or a path to a PEM file) for JWT bearer tokens.
    jwt_rs256_public_key: str | None = None
    #: Required ``aud`` of JWTs.
    jwt_audience: str = "flashcrowd"
    #: Required ``iss`` of JWTs (empty: not checked).
    jwt_issuer: str = ""
    #: Clock skew tolerated on exp/nbf/iat.
    jwt_leeway_seconds: float = Field(default=30.0, ge=0)

    # --- limits ---------------------------------------------------------------------------
    #: Bucket every method gets unless ``rate_limits`` names it, per tenant.
    default_rate_limit: RateLimit = RateLimit(rate=200.0, burst=400.0)
    #: Redis shared by the gateway replicas for rate limits and failed-authentication counters
    #: (redis://host:6379/0); empty = this replica's own buckets (one replica).
    redis_url: str = ""
    #: Replicas of the gateway: while Redis is unreachable each replica allows 1/replicas of a limit.
    gateway_replicas: int = Field(default=1, ge=1, le=1000)
    #: A Redis call slower than this counts as Redis down (the replica falls back to its own
    #: buckets for a second): short, because every admitted call waits for it.
    redis_timeout_seconds: float = Field(default=0.05, gt=0, le=5)
    #: Per-method buckets, per tenant (JSON object; see the module doc).
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    #: Failed authentications one client address may make with one credential (key id, or a hash of a
    #: token) before that credential's failures from there are answered RESOURCE_EXHAUSTED.
    auth_failure_limit: RateLimit = RateLimit(rate=5.0, burst=50.0)
    #: Failed authentications one client address may make in all (any credentials), the coarse
    #: ceiling against floods of made-up keys. Neither limit ever refuses a valid credential.
    auth_failure_address_limit: RateLimit = RateLimit(rate=50.0, burst=500.0)
    #: Proxies whose forwarding headers are believed (comma-separated CIDRs or addresses, or a JSON
    #: list); empty: the peer address is the client address (client_address.py).
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    #: The forwarding header the trusted proxies write: ``x-forwarded-for`` or ``forwarded`` (RFC 7239).
    client_address_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    #: Streaming calls one tenant may have open at once.
    max_streams_per_tenant: int = Field(default=8, ge=1)
    #: Largest metadata (all headers of one call) accepted, in bytes.
    max_metadata_bytes: int = Field(default=16 * 1024, ge=1024)

    # --- tenant deletion (purge.py) -------------------------------------------------------
    #: Undelete window of a deleted tenant; after it the tenant's packs, live packs and campaigns are
    #: purged. 0 purges right after DeleteTenant.
    tenant_purge_after_seconds: float = Field(default=7 * 86_400.0, ge=0)
    #: How often each replica looks for deleted tenants due for a purge (and retries failed ones).
    tenant_purge_interval_seconds: float = Field(default=300.0, gt=0)
    #: How long a replica holds a purge before another may take it over (a crashed purger's lease).
    tenant_purge_lease_seconds: float = Field(default=900.0, gt=0)

    # --- audit log (audit.py) -------------------------------------------------------------
    #: Entries waiting to be written; when full, new entries are dropped (counted and logged).
    audit_queue_size: int = Field(default=10_000, ge=1)
    #: Entries written per transaction.
    audit_batch_size: int = Field(default=500, ge=1, le=10_000)
    #: Also log every entry as a JSON line (logger ``flashcrowd.audit``); off leaves only the table
    #: (member-level calls of ad serving can make thousands of entries a second).
    audit_log_lines: bool = True

    # --- HTTP/JSON ------------------------------------------------------------------------
    #: Port of the HTTP/JSON side; 0 picks a free one, -1 disables it.
    http_port: int = Field(default=8080, ge=-1, le=65535)
    #: Largest HTTP request body, in bytes (defaults to max_message_bytes).
    http_max_body_bytes: int | None = Field(default=None, gt=0)

    @field_validator("jwt_rs256_public_key", mode="before")
    @classmethod
    def _pem(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return None if isinstance(value, str) else value
        text = value.strip()
        if "-----BEGIN" not in text:
            path = Path(text)
            if not path.is_file():
                raise ValueError("expected PEM text or the path of a PEM file")
            text = path.read_text()
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            load_pem_public_key(text.encode())
        except (ValueError, TypeError) as error:
            raise ValueError(f"not a PEM public key: {error}") from None
        return text

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                value = json.loads(text)
            else:
                value = [part for part in text.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            from services.gateway.client_address import parse_networks

            return tuple(str(network) for network in parse_networks(str(item) for item in value))
        return value

    @field_validator("rate_limits")
    @classmethod
    def _known_methods(cls, value: dict[str, RateLimit]) -> dict[str, RateLimit]:
        from services.gateway.catalog import METHODS

        names: set[str] = set()
        for info in METHODS.values():
            names.update({info.full, info.full.lstrip("/"), info.key, info.name})
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown methods {unknown}: use Method, Service/Method or /pkg.Service/Method")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> GatewaySettings:
        if self.retry_max_backoff_seconds < self.retry_initial_backoff_seconds:
            raise ValueError("retry_max_backoff_seconds must be >= retry_initial_backoff_seconds")
        return self

    def rate_limit_for(self, full_method: str) -> RateLimit:
        """The bucket of ``/pkg.Service/Method``: full path, then ``Service/Method``, then ``Method``."""
        service, _, method = full_method.lstrip("/").partition("/")
        short_service = service.rsplit(".", 1)[-1]
        for key in (full_method, full_method.lstrip("/"), f"{short_service}/{method}", method):
            if key in self.rate_limits:
                return self.rate_limits[key]
        return self.default_rate_limit

    @property
    def http_body_limit(self) -> int:
        return self.http_max_body_bytes or self.max_message_bytes


__all__ = ["GatewaySettings", "RateLimit"]
