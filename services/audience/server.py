"""Assemble the audience server: AudienceService, google.longrunning.Operations, LookalikeService,
LivePackService and EventService, health, reflection. This is the process's composition root.

``create_audience_server(settings)`` is what tests call (port 0) and ``build(settings)``
is what ``python -m services.audience`` hands to the runtime's ``run_service``; both wire the same
``AudienceApp``: one object store, the pack store, the control database (operations and their
shared queue, pack-id reservations; ``operation_store.py``), the operation manager, the membership
cache, the tenant quotas (``quotas.py``) and the servicers. With ``FLASHCROWD_WORKER_PROCESSES`` > 0
the server also starts that many ``audience-worker`` processes (``services/audience/worker``) that run
the pack builds, and runs none itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from services.audience.compute_pool import ComputePool
from services.audience.config import AudienceSettings
from services.audience.control_db import ControlDatabase
from services.audience.live import LiveDeps, LiveParts, live_service, open_live
from services.audience.lookalike.service import LookalikeDeps, lookalike_service
from services.audience.membership import MembershipCache
from services.audience.operation_store import OperationStore
from services.audience.operations import OperationManager, OperationsServicer
from services.audience.packstore import PackStore
from services.audience.privacy import Discloser, PrivacyParameters
from services.audience.privacy_ledger import open_privacy_ledger
from services.audience.quotas import TenantQuotas, default_control_path, open_quotas
from services.audience.runners import portable_runners
from services.audience.servicer import AudienceServicer
from services.audience.tenancy import Tenancy
from services.audience.worker.processes import WorkerProcesses
from services.runtime import ServiceDefinition, create_server, start_callbacks
from services.runtime.assertion import backend_interceptors
from services.storage import ObjectStore, open_store

logger = logging.getLogger(__name__)

AUDIENCE_SERVICE = audience_service_pb2.DESCRIPTOR.services_by_name["AudienceService"].full_name
OPERATIONS_SERVICE = operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name


@dataclass
class AudienceApp:
    """Everything one audience process holds; tests reach into it (store, packs, operations)."""

    settings: AudienceSettings
    store: ObjectStore
    packs: PackStore
    control: ControlDatabase
    operations: OperationManager
    membership: MembershipCache
    tenancy: Tenancy
    discloser: Discloser
    servicer: AudienceServicer
    operations_servicer: OperationsServicer
    #: Per-tenant limits and their shared counters (None only for apps wired by hand in tests).
    quotas: TenantQuotas | None = None
    #: The live-pack engine and its bus (services/audience/live.py); None only in apps wired by hand.
    live: LiveParts | None = None
    #: The LookalikeService, LivePackService and EventService of this process (``build_app``).
    extras: list[ServiceDefinition] = field(default_factory=list)
    #: ``audience-worker`` child processes running the builds (none: builds run on our threads).
    workers: WorkerProcesses | None = None
    _supervisor: asyncio.Task | None = None

    @property
    def service_names(self) -> list[str]:
        return [AUDIENCE_SERVICE, OPERATIONS_SERVICE]

    def register(self, server: grpc.aio.Server) -> None:
        audience_service_pb2_grpc.add_AudienceServiceServicer_to_server(self.servicer, server)
        operations_pb2_grpc.add_OperationsServicer_to_server(self.operations_servicer, server)

    async def start(self) -> None:
        """Start the worker processes (``settings.worker_processes``) and their supervisor."""
        if self.settings.worker_processes and self.workers is None:
            self.workers = WorkerProcesses.start(self.settings.worker_processes)
            self._supervisor = asyncio.create_task(self.workers.supervise(), name="worker-supervisor")

    async def begin_close(self) -> None:
        """At SIGTERM: stop claiming and cancel builds now (portable ones go back to the queue), so
        that they end within the server's grace (one wait); workers get their SIGTERM too."""
        self.operations.begin_close(self.settings.grace_seconds)
        if self.workers is not None:
            self.workers.terminate()

    async def close(self) -> None:
        extras, self.extras = self.extras, []
        for extra in extras:  # live packs, event bus
            for stop in extra.on_stop:
                await stop()
        await self.operations.close(self.settings.grace_seconds)
        if self.workers is not None:
            await self.workers.wait(self.settings.grace_seconds)
            self.workers = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        self.servicer.compute.close()
        self.control.close()
        self.discloser.ledger.close()
        if self.quotas is not None:
            self.quotas.close()
            self.quotas = None


def open_control(settings: AudienceSettings) -> ControlDatabase:
    """The shared control database (PostgreSQL in deployments, SQLite beside a local store)."""
    return ControlDatabase(settings.control_database_url, default_control_path(settings.store_url))


def build_app(settings: AudienceSettings, store: ObjectStore | None = None) -> AudienceApp:
    """Open the store and the control database and wire the components (blocking)."""
    store = store if store is not None else open_store(settings.store_url)
    packs = PackStore(store, settings.packs_prefix)
    quotas = open_quotas(settings)
    membership = MembershipCache(
        packs,
        capacity=settings.membership_cache_packs,
        refresh_ms=settings.membership_refresh_ms,
        dense_max_ids=settings.membership_dense_max_ids,
    )
    control = open_control(settings)
    operations = OperationManager(
        OperationStore(control),
        max_workers=settings.max_concurrent_builds,
        max_queued=settings.max_queued_builds,
        queued_limit=quotas.limits.queued_builds,
        tenant_max_running=quotas.limits.running_builds,
        runners=portable_runners(settings, store, packs, invalidate=membership.invalidate),
        run_portable=settings.worker_processes == 0,
        lease_seconds=settings.operation_lease_seconds,
    )
    failed = operations.recover()
    if failed:
        logger.warning("marked %d operation(s) of stopped processes failed", failed)
    tenancy = Tenancy()
    discloser = Discloser(
        settings.pepper().key,
        open_privacy_ledger(settings.control_database_url, default_control_path(settings.store_url)),
        PrivacyParameters(
            min_reported_size=settings.privacy_min_reported_size,
            persona_min_size=settings.persona_min_size,
            epsilon_size=settings.privacy_epsilon_size,
            epsilon_persona=settings.privacy_epsilon_persona,
            daily_budget=settings.privacy_daily_budget,
        ),
    )
    live = open_live(store, operations)
    compute = ComputePool(store, settings.dataset_prefix, settings.compute_processes)
    servicer = AudienceServicer(
        settings, store, packs, operations, membership, tenancy, discloser, quotas, live.engine, compute
    )
    ops_servicer = OperationsServicer(
        operations, tenancy, discloser, max_wait_seconds=settings.max_wait_seconds
    )
    extras = [  # the other services of this process, each over its narrow dependencies
        lookalike_service(
            LookalikeDeps(store, packs, operations, tenancy, servicer, servicer.dataset, quotas)
        ),
        live_service(live, LiveDeps(tenancy, discloser, packs, membership, servicer, quotas), store),
    ]
    return AudienceApp(
        settings, store, packs, control, operations, membership, tenancy, discloser, servicer,
        ops_servicer, quotas, live, extras,
    )  # fmt: skip


async def build(settings: AudienceSettings, store: ObjectStore | None = None) -> ServiceDefinition:
    """The runtime's view of this service (``run_service``'s ``build``)."""
    app = await asyncio.to_thread(build_app, settings, store)
    return _definition(app)


def _definition(app: AudienceApp) -> ServiceDefinition:
    names = [*app.service_names, *(name for extra in app.extras for name in extra.names)]
    registers = [app.register, *(extra.register for extra in app.extras)]

    def register(server: grpc.aio.Server) -> None:
        for fn in registers:
            fn(server)

    async def store_reachable() -> bool:
        # Any answer (present or not) means the store is reachable; StoreUnavailable means not.
        await asyncio.to_thread(app.store.exists, "_health/probe")
        return True

    return ServiceDefinition(
        names=names,
        register=register,
        interceptors=backend_interceptors(app.settings),
        on_start=[app.start, *(start for extra in app.extras for start in extra.on_start)],
        on_stop=[app.close],
        on_stopping=[app.begin_close],
        readiness=store_reachable,
    )


async def create_audience_server(
    settings: AudienceSettings, store: ObjectStore | None = None
) -> tuple[grpc.aio.Server, int, AudienceApp]:
    """Build and start a server (``settings.port`` 0 picks a free port); return it, its port and the app.

    Stop it with ``await server.stop(grace)`` then ``await app.close()``.
    """
    app = await asyncio.to_thread(build_app, settings, store)
    definition = _definition(app)
    server, port = await create_server(
        settings,
        service_names=definition.names,
        register=definition.register,
        interceptors=definition.interceptors,
    )
    await start_callbacks(definition.on_start)
    return server, port, app


__all__ = [
    "AUDIENCE_SERVICE",
    "OPERATIONS_SERVICE",
    "AudienceApp",
    "build",
    "build_app",
    "create_audience_server",
]
