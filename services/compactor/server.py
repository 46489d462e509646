"""The compactor process's composition root: object store, bus, compactor task (health only)."""

from __future__ import annotations

import asyncio
import contextlib

from services.events.bus import open_bus
from services.events.compactor import compactor_from_settings
from services.events.config import RealtimeSettings
from services.runtime import ServiceDefinition
from services.storage import open_store


async def build(settings: RealtimeSettings) -> ServiceDefinition:
    store = open_store(settings.store_url)
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    compactor = compactor_from_settings(settings, store, bus)
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        tasks.append(asyncio.create_task(compactor.run(), name="compactor"))

    async def stop() -> None:
        compactor.stop()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=max(settings.grace_seconds, 30.0))
        await bus.close()

    return ServiceDefinition(names=[], register=lambda server: None, on_start=[start], on_stop=[stop])


__all__ = ["build"]
