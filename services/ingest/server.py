"""The ingest process's composition root: the bus and EventService over it."""

from __future__ import annotations

import logging

from services.events.bus import BusUnavailable, open_bus
from services.events.config import RealtimeSettings
from services.events.ingest import event_service_definition
from services.runtime import ServiceDefinition
from services.runtime.assertion import backend_interceptors

logger = logging.getLogger(__name__)


async def build(settings: RealtimeSettings) -> ServiceDefinition:
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    try:
        await bus.start()
    except BusUnavailable as error:  # serve anyway: ingest answers UNAVAILABLE until the bus is back
        logger.warning("event bus not reachable at start: %s", error)
    names, register = event_service_definition(settings, bus)
    return ServiceDefinition(
        names=names,
        register=register,
        interceptors=backend_interceptors(settings),
        on_stop=[bus.close],
    )


__all__ = ["build"]
