"""Assemble the audience server: AudienceService, google.longrunning.Operations, health, reflection.

``create_audience_server(settings)`` is what tests call (port 0) and ``build_service(settings)``
is what ``python -m services.audience`` hands to the runtime's ``run_service``; both wire the same
``AudienceApp``: one object store, the pack store, the operation manager (recovered at start-up,
its build queue fair across tenants), the membership cache, the tenant quotas (limits and their
shared counters, ``services/audience/quotas.py``) and the servicers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass

import grpc
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from services.audience.config import AudienceSettings
from services.audience.membership import MembershipCache
from services.audience.operations import OperationManager, OperationsServicer
from services.audience.packstore import PackStore
from services.audience.privacy import Discloser, PrivacyParameters
from services.audience.privacy_ledger import open_privacy_ledger
from services.audience.quotas import TenantQuotas, default_control_path, open_quotas
from services.audience.servicer import AudienceServicer
from services.audience.tenancy import Tenancy
from services.runtime import ServiceDefinition, create_server
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
    operations: OperationManager
    membership: MembershipCache
    tenancy: Tenancy
    discloser: Discloser
    servicer: AudienceServicer
    operations_servicer: OperationsServicer
    #: Per-tenant limits and their shared counters (None only for apps wired by hand in tests).
    quotas: TenantQuotas | None = None

    @property
    def service_names(self) -> list[str]:
        return [AUDIENCE_SERVICE, OPERATIONS_SERVICE]

    def register(self, server: grpc.aio.Server) -> None:
        audience_service_pb2_grpc.add_AudienceServiceServicer_to_server(self.servicer, server)
        operations_pb2_grpc.add_OperationsServicer_to_server(self.operations_servicer, server)

    async def begin_close(self) -> None:
        """At SIGTERM: cancel builds now, so they end within the server's grace (one wait)."""
        self.operations.begin_close(self.settings.grace_seconds)

    async def close(self) -> None:
        for stop in getattr(self, "extra_stops", ()):  # live packs, event bus (services.audience.live)
            await stop()
        self.extra_stops = []
        await self.operations.close(self.settings.grace_seconds)
        self.discloser.ledger.close()
        if self.quotas is not None:
            self.quotas.close()
            self.quotas = None


def build_app(settings: AudienceSettings, store: ObjectStore | None = None) -> AudienceApp:
    """Open the store and wire the components; marks operations of a dead predecessor failed."""
    store = store if store is not None else open_store(settings.store_url)
    packs = PackStore(store, settings.packs_prefix)
    quotas = open_quotas(settings)
    operations = OperationManager(
        store,
        settings.operations_prefix,
        max_workers=settings.max_concurrent_builds,
        max_queued=settings.max_queued_builds,
        queued_limit=quotas.limits.queued_builds,
        tenant_max_running=quotas.limits.running_builds,
    )
    failed = operations.recover()
    if failed:
        logger.warning("marked %d operation(s) of a previous process failed", failed)
    membership = MembershipCache(
        packs,
        capacity=settings.membership_cache_packs,
        refresh_ms=settings.membership_refresh_ms,
        dense_max_ids=settings.membership_dense_max_ids,
    )
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
    servicer = AudienceServicer(settings, store, packs, operations, membership, tenancy, discloser, quotas)
    ops_servicer = OperationsServicer(
        operations, tenancy, discloser, max_wait_seconds=settings.max_wait_seconds
    )
    return AudienceApp(
        settings, store, packs, operations, membership, tenancy, discloser, servicer, ops_servicer, quotas
    )


#: Module that, once it exists, provides ``lookalike_service(app: AudienceApp) -> ServiceDefinition``:
#: the LookalikeService is then served by this process too (sharing its store, packs and operations).
LOOKALIKE_MODULE = "services.audience.lookalike.service"


def _lookalike_definition(app: AudienceApp) -> ServiceDefinition | None:
    """The LookalikeService, when its implementation is present (another issue's module)."""
    try:
        module = importlib.import_module(LOOKALIKE_MODULE)
    except ModuleNotFoundError as error:
        if error.name == LOOKALIKE_MODULE:
            return None
        raise  # the module exists but one of its own imports is missing: a real error
    factory = getattr(module, "lookalike_service", None)
    return factory(app) if factory is not None else None


async def build_service(settings: AudienceSettings, store: ObjectStore | None = None) -> ServiceDefinition:
    """The runtime's view of this service (``run_service``'s ``build``)."""
    app = await asyncio.to_thread(build_app, settings, store)
    return _definition(app)


#: Module providing ``live_service(app) -> ServiceDefinition``: live packs (LivePackService) and the
#: EventService on the event bus, served by this process too.
LIVE_MODULE = "services.audience.live"


def _live_definition(app: AudienceApp) -> ServiceDefinition | None:
    return importlib.import_module(LIVE_MODULE).live_service(app)


def _definition(app: AudienceApp) -> ServiceDefinition:
    names = list(app.service_names)
    registers = [app.register]
    stops = []
    for extra in (_lookalike_definition(app), _live_definition(app)):
        if extra is not None:
            names.extend(extra.names)
            registers.append(extra.register)
            stops.extend(extra.on_stop)
    app.extra_stops = stops  # awaited by app.close() as well, for callers of create_audience_server

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
    return server, port, app


__all__ = [
    "AUDIENCE_SERVICE",
    "OPERATIONS_SERVICE",
    "AudienceApp",
    "build_app",
    "build_service",
    "create_audience_server",
]
