"""Server factory of the gateway: the gRPC endpoint (via the runtime) plus the HTTP/JSON side.

``create_gateway_server(settings) -> (server, port, app)``; tests start it on port 0 and close
``app`` after stopping the server. ``python -m services.gateway`` runs it until SIGTERM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from services.gateway import catalog
from services.gateway.config import GatewaySettings
from services.gateway.handlers import generic_handlers
from services.gateway.http import HttpFrontend
from services.gateway.proxy import Gateway
from services.runtime import HealthServicer, ServiceDefinition, create_server, start_callbacks

logger = logging.getLogger(__name__)

#: What reflection lists: every proxied service (so grpcurl can describe them) and the gateway's own.
SERVICE_NAMES: Sequence[str] = catalog.PUBLIC_SERVICES


@dataclass
class GatewayApp:
    """The gateway's parts, for tests and shutdown: core, HTTP side and its port."""

    settings: GatewaySettings
    gateway: Gateway
    http: HttpFrontend | None = None
    http_port: int | None = None

    async def start(self) -> None:
        """The audit writer and periodic purge, then the HTTP/JSON side when configured."""
        await self.gateway.start()
        if self.settings.http_port >= 0:
            self.http = HttpFrontend(self.gateway, self.settings)
            self.http_port = await self.http.start(self.settings.host, self.settings.http_port)
            logger.info("HTTP/JSON serving", extra={"host": self.settings.host, "http_port": self.http_port})

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.gateway.close()


def _register(gateway: Gateway):
    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(tuple(generic_handlers(gateway)))

    return register


def _definition(app: GatewayApp) -> ServiceDefinition:
    return ServiceDefinition(
        names=SERVICE_NAMES,
        register=_register(app.gateway),
        on_start=[app.start],
        on_stop=[app.close],
        service_readiness=app.gateway.backend_health,
        readiness_interval_seconds=app.settings.backend_health_interval_seconds,
    )


async def build(settings: GatewaySettings) -> ServiceDefinition:
    """``run_service``'s build step: the gateway wired; it starts once its port is bound."""
    return _definition(GatewayApp(settings, Gateway(settings)))


async def create_gateway_server(
    settings: GatewaySettings, *, health: HealthServicer | None = None
) -> tuple[grpc.aio.Server, int, GatewayApp]:
    """Build, bind and start the gateway; ``settings.port``/``http_port`` 0 pick free ports."""
    app = GatewayApp(settings, Gateway(settings))
    definition = _definition(app)
    try:
        server, port = await create_server(
            settings, service_names=definition.names, register=definition.register, health=health
        )
        await start_callbacks(definition.on_start)
    except BaseException:
        await app.close()
        raise
    return server, port, app


__all__ = ["SERVICE_NAMES", "GatewayApp", "build", "create_gateway_server"]
