"""Retarget server factory: the ledger, the audience client, the launcher and the servicers.

``create_retarget_server(settings)`` starts a full server on ``settings.port`` (0 in tests) and
returns ``(server, port, app)``; ``build`` is the same wiring for ``run_service`` (``__main__``).
At start the schema is migrated and every RUNNING launch is resumed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc.aio
from flashcrowd.retarget.v1 import retarget_service_pb2_grpc
from google.longrunning import operations_pb2_grpc

from services.events.bus import open_bus
from services.retarget import domain as d
from services.retarget.audience import AudienceClient
from services.retarget.config import RetargetSettings
from services.retarget.db import Database
from services.retarget.launcher import Launcher
from services.retarget.migrations import migrate
from services.retarget.order_feed import OrderFeed
from services.retarget.servicer import LaunchOperationsServicer, RetargetServicer
from services.runtime import ServiceDefinition, attributes, create_server, current_telemetry
from services.runtime.assertion import backend_interceptors

logger = logging.getLogger(__name__)

SERVICE_NAME = "flashcrowd.retarget.v1.RetargetService"
OPERATIONS_SERVICE_NAME = "google.longrunning.Operations"
SERVICE_NAMES = (SERVICE_NAME, OPERATIONS_SERVICE_NAME)


class RetargetApp:
    """Everything one retarget process owns; ``await close()`` releases it."""

    def __init__(
        self,
        settings: RetargetSettings,
        database: Database,
        audience: AudienceClient,
        clock: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.db = database
        self.audience = audience
        self.clock = clock
        #: Set (and replaced) whenever this process wrote offers; StreamOffers followers wait on it.
        self.delivered_signal = asyncio.Event()
        self.launcher = Launcher(database, audience, settings, clock=self._now, on_delivered=self._delivered)
        self.servicer = RetargetServicer(self)
        self.operations = LaunchOperationsServicer(self)
        self.order_feed = (
            OrderFeed(
                open_bus(settings.bus_url, shard_count=settings.bus_shards),
                database,
                self._now,
                name=f"retarget-orders-{settings.instance_id or 'local'}",
            )
            if settings.bus_url
            else None
        )
        telemetry = current_telemetry()
        self._redeemed = (
            telemetry.meter(__name__).create_counter(attributes.METRIC_COUPONS_REDEEMED, unit="{coupon}")
            if telemetry
            else None
        )
        self._closed = False

    def _now(self) -> int:
        return self.clock()

    @classmethod
    async def open(cls, settings: RetargetSettings, *, clock: Callable[[], int] | None = None) -> RetargetApp:
        loop = asyncio.get_running_loop()
        database = await loop.run_in_executor(
            None,
            functools.partial(
                Database.open,
                settings.database_url,
                pool_min=settings.pool_min_size,
                pool_max=settings.pool_max_size,
                sqlite_workers=settings.sqlite_workers,
            ),
        )
        try:
            applied = await loop.run_in_executor(None, migrate, database)
        except BaseException:
            await database.aclose()
            raise
        if applied:
            logger.info("schema migrated", extra={"versions": applied})
        audience = AudienceClient(
            settings.audience_target, settings, timeout_seconds=settings.audience_timeout_seconds
        )
        return cls(settings, database, audience, clock or d.now_us)

    def register(self, server: grpc.aio.Server) -> None:
        retarget_service_pb2_grpc.add_RetargetServiceServicer_to_server(self.servicer, server)
        operations_pb2_grpc.add_OperationsServicer_to_server(self.operations, server)

    async def start(self) -> None:
        if self.settings.resume_launches:
            await self.launcher.resume_all()
        if self.order_feed is not None:
            self.order_feed.start()

    def _delivered(self) -> None:
        signal, self.delivered_signal = self.delivered_signal, asyncio.Event()
        signal.set()

    def count_redeemed(self) -> None:
        if self._redeemed is not None:
            self._redeemed.add(1)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.order_feed is not None:
            await self.order_feed.stop()
        await self.launcher.close()
        await self.audience.close()
        await self.db.aclose()

    def definition(self) -> ServiceDefinition:
        return ServiceDefinition(
            names=SERVICE_NAMES,
            register=self.register,
            interceptors=backend_interceptors(self.settings),
            on_stop=[self.close],
        )


async def create_retarget_server(
    settings: RetargetSettings, *, clock: Callable[[], int] | None = None
) -> tuple[grpc.aio.Server, int, RetargetApp]:
    """Start a retarget server; the caller stops it (``server.stop``) and then ``app.close()``."""
    app = await RetargetApp.open(settings, clock=clock)
    try:
        server, port = await create_server(
            settings,
            service_names=SERVICE_NAMES,
            register=app.register,
            interceptors=backend_interceptors(settings),
        )
    except BaseException:
        await app.close()
        raise
    await app.start()
    return server, port, app


async def build(settings: RetargetSettings) -> ServiceDefinition:
    """``run_service`` wiring: open the ledger, resume launches, hand over the servicers."""
    app = await RetargetApp.open(settings)
    await app.start()
    return app.definition()
