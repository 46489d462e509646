"""The worker process's composition root: store, packs, control database, build runner, manager."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.audience.config import AudienceSettings
from services.audience.control_db import ControlDatabase
from services.audience.operation_store import OperationStore
from services.audience.operations import OperationManager
from services.audience.packstore import PackStore
from services.audience.quotas import default_control_path
from services.audience.runners import portable_runners
from services.runtime import ServiceDefinition
from services.storage import ObjectStore, open_store


@dataclass
class WorkerApp:
    settings: AudienceSettings
    store: ObjectStore
    control: ControlDatabase
    operations: OperationManager

    async def begin_close(self) -> None:
        self.operations.begin_close(self.settings.grace_seconds)

    async def close(self) -> None:
        await self.operations.close(self.settings.grace_seconds)
        self.control.close()


def build_worker(settings: AudienceSettings, store: ObjectStore | None = None) -> WorkerApp:
    """Wire a worker (blocking); its threads start claiming at once."""
    store = store if store is not None else open_store(settings.store_url)
    packs = PackStore(store, settings.packs_prefix)
    control = ControlDatabase(settings.control_database_url, default_control_path(settings.store_url))
    operations = OperationManager(
        OperationStore(control),
        max_workers=settings.max_concurrent_builds,
        max_queued=settings.max_queued_builds,
        tenant_max_running=settings.tenant_max_running_builds,
        runners=portable_runners(settings, store, packs),
        run_portable=True,
        lease_seconds=settings.operation_lease_seconds,
    )
    operations.recover()
    return WorkerApp(settings, store, control, operations)


async def build(settings: AudienceSettings) -> ServiceDefinition:
    """The runtime's view of a worker: no API, health only (NOT_SERVING while the store is away)."""
    app = await asyncio.to_thread(build_worker, settings)

    async def store_reachable() -> bool:
        await asyncio.to_thread(app.store.exists, "_health/probe")
        return True

    return ServiceDefinition(
        names=[],
        register=lambda server: None,
        on_stopping=[app.begin_close],
        on_stop=[app.close],
        readiness=store_reachable,
    )


__all__ = ["WorkerApp", "build", "build_worker"]
