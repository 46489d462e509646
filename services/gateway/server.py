"""Server factory of the gateway: the gRPC endpoint (via the runtime) plus the HTTP/JSON side.

``create_gateway_server(settings) -> (server, port, app)``; tests start it on port 0 and close
``app`` after stopping the server. ``python -m services.gateway`` runs it until SIGTERM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from services.gateway import catalog
from services.gateway.config import GatewaySettings
from services.gateway.handlers import generic_handlers
from services.gateway.http import HttpFrontend
from services.gateway.proxy import Gateway
from services.runtime import HealthServicer, ServiceDefinition, create_server

logger = logging.getLogger(__name__)

#: What reflection lists: every proxied service (so grpcurl can describe them) and the gateway's own.
SERVICE_NAMES: Sequence[str] = catalog.PUBLIC_SERVICES


@dataclass
class GatewayApp:
    """The gateway's parts, for tests and shutdown: core, HTTP side and its port."""

    gateway: Gateway
    http: HttpFrontend | None = None
    http_port: int | None = None
    closers: list[object] = field(default_factory=list)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.gateway.close()


def _register(gateway: Gateway):  # type: ignore[no-untyped-def]
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(tuple(generic_handlers(gateway)))

    return register


async def build(settings: GatewaySettings) -> tuple[ServiceDefinition, GatewayApp]:
    """The service definition for ``run_service`` plus the app (HTTP side started when configured)."""
    gateway = Gateway(settings)
    await gateway.start()  # audit writer and periodic purge; stopped (audit flushed) by app.close
    app = GatewayApp(gateway=gateway)
    if settings.http_port >= 0:
        app.http = HttpFrontend(gateway, settings)
        app.http_port = await app.http.start(settings.host, settings.http_port)
        logger.info("HTTP/JSON serving", extra={"host": settings.host, "http_port": app.http_port})
    definition = ServiceDefinition(names=SERVICE_NAMES, register=_register(gateway), on_stop=[app.close])
    return definition, app


async def create_gateway_server(
    settings: GatewaySettings, *, health: HealthServicer | None = None
) -> tuple[grpc.aio.Server, int, GatewayApp]:
    """Build, bind and start the gateway; ``settings.port``/``http_port`` 0 pick free ports."""
    definition, app = await build(settings)
    try:
        server, port = await create_server(
            settings, service_names=definition.names, register=definition.register, health=health
        )
    except BaseException:
        await app.close()
        raise
    return server, port, app


async def service_definition(settings: GatewaySettings) -> ServiceDefinition:
    """``run_service``'s build step."""
    definition, _ = await build(settings)
    return definition


__all__ = ["SERVICE_NAMES", "GatewayApp", "build", "create_gateway_server", "service_definition"]
