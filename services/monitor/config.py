"""Settings of the sale monitor process (``FLASHCROWD_*``)."""

from __future__ import annotations

from services.events.config import RealtimeSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(RealtimeSettings):
    #: Hours of stream the counters cover (replayed on start).
    monitor_horizon_hours: float = 6.0
    #: Retarget service (host:port) whose campaigns' rules are evaluated; empty = no rules.
    retarget_target: str = ""
    #: Seconds between two rule evaluations.
    rules_interval_seconds: float = 1.0
    #: Comma-separated tenant ids whose RUNNING campaigns' rules are evaluated.
    rules_tenants: str = ""
