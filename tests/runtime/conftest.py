from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime import (
    BaseServiceSettings,
    HealthServicer,
    create_server,
    load_settings,
    setup_telemetry,
)

from .probe import SERVICE, Probe


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    # Telemetry is process-global and idempotent: attaching the exporter once serves every test.
    exporter = InMemorySpanExporter()
    setup_telemetry("runtime-tests", span_exporter=exporter)
    return exporter


@pytest.fixture(scope="session")
def settings() -> BaseServiceSettings:
    return load_settings(BaseServiceSettings, host="127.0.0.1", port=0, grace_seconds=0.5)


class ProbeServer:
    def __init__(self, server: grpc.aio.Server, port: int, health: HealthServicer, probe: Probe) -> None:
        self.server, self.port, self.health, self.probe = server, port, health, probe
        self.target = f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
async def probe_server(
    settings: BaseServiceSettings, span_exporter: InMemorySpanExporter
) -> AsyncIterator[ProbeServer]:
    probe = Probe()
    health = HealthServicer()
    server, port = await create_server(
        settings, service_names=[SERVICE], register=probe.register, health=health
    )
    yield ProbeServer(server, port, health, probe)
    await server.stop(None)


@pytest.fixture(scope="module")
async def channel(probe_server: ProbeServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(probe_server.target) as channel:
        yield channel
