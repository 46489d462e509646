"""Settings of the sale monitor process (``FLASHCROWD_*``)."""

from __future__ import annotations

from pydantic import Field

from services.events.config import RealtimeSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(RealtimeSettings):
    #: Hours of stream the counters cover (replayed on start).
    monitor_horizon_hours: float = 6.0
    #: Retarget service (host:port) whose campaigns' rules are evaluated; empty = no rules.
    retarget_target: str = ""
    #: Seconds between two rule evaluations.
    rules_interval_seconds: float = 1.0
    #: Comma-separated tenant ids to evaluate rules for; empty (the default) = every tenant.
    rules_tenants: str = ""
    #: Seconds the rules lease lives without renewal (lease.py): the takeover time after SIGKILL.
    rules_lease_seconds: float = Field(default=5.0, gt=0.5, le=300)
    #: Key of the lease in the NATS KV bucket flashcrowd_leases (one per fleet of monitors).
    rules_lease_key: str = Field(default="rules-leader", pattern=r"^[A-Za-z0-9_=.-]{1,64}$")
