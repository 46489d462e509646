"""The sale monitor's composition root: event bus, counters, servicer and (optionally) the rules.

``build(settings)`` is what ``python -m services.monitor`` hands to the runtime's ``run_service``; the
demo and tests call it too and serve its definition with ``create_server``.
"""

from __future__ import annotations

from datetime import timedelta

from services.events.bus import open_bus
from services.monitor.config import MonitorSettings
from services.monitor.counters import SaleMonitor
from services.monitor.lease import open_lease
from services.monitor.rules import RuleEngine
from services.monitor.servicer import sale_monitor_definition
from services.runtime import ServiceDefinition
from services.runtime.assertion import backend_interceptors
from services.storage import open_store

__all__ = ["build"]


async def build(settings: MonitorSettings) -> ServiceDefinition:
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    monitor = SaleMonitor(bus, horizon=timedelta(hours=settings.monitor_horizon_hours))
    monitor.start()
    names, register = sale_monitor_definition(monitor)
    stops = [monitor.stop]
    if settings.retarget_target:
        engine = RuleEngine.connect(
            settings.retarget_target,
            settings,
            monitor,
            store=open_store(settings.store_url),
            interval=settings.rules_interval_seconds,
            lease=open_lease(settings.bus_url, settings.rules_lease_seconds, settings.rules_lease_key),
        )
        engine.start()
        stops.insert(0, engine.stop)
    return ServiceDefinition(
        names=names,
        register=register,
        interceptors=backend_interceptors(settings),
        on_stop=[*stops, bus.close],
    )
