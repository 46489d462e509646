"""Library health servicer: Check per service, Watch sees NOT_SERVING during a graceful stop."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime import BaseServiceSettings, HealthServicer, create_server, graceful_stop

from .conftest import ProbeServer
from .probe import SERVICE, Probe

Status = health_pb2.HealthCheckResponse


async def test_check_is_serving_per_service_and_overall(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == Status.SERVING


async def test_check_unknown_service_is_not_found(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(health_pb2.HealthCheckRequest(service="flashcrowd.nope.v1.Nope"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_watch_sees_status_changes(probe_server: ProbeServer, channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="flashcrowd.test.v1.Later"))
    assert (await watch.read()).status == Status.SERVICE_UNKNOWN
    await probe_server.health.set("flashcrowd.test.v1.Later", Status.SERVING)
    assert (await asyncio.wait_for(watch.read(), 2)).status == Status.SERVING
    watch.cancel()


async def test_watch_gets_not_serving_on_graceful_stop(settings: BaseServiceSettings) -> None:
    health = HealthServicer()
    server, port = await create_server(
        settings, service_names=[SERVICE], register=Probe().register, health=health
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await asyncio.wait_for(watch.read(), 2)).status == Status.SERVING

        started = time.monotonic()
        stopping = asyncio.create_task(graceful_stop(server, health, grace_seconds=5))
        assert (await asyncio.wait_for(watch.read(), 2)).status == Status.NOT_SERVING
        watch.cancel()  # the last open stream gone, stop returns without waiting out the grace
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - started < 2
    # statuses stay NOT_SERVING: a late set() must not resurrect a stopping server
    await health.set(SERVICE, Status.SERVING)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), None)
    ).status == Status.NOT_SERVING


async def test_readiness_turns_health_not_serving_while_a_dependency_is_down(
    settings: BaseServiceSettings,
) -> None:
    """``ServiceDefinition.readiness`` (audience: is the object store reachable?) drives health."""
    from services.runtime import ServiceDefinition
    from services.runtime.server import watch_readiness

    store_up = True

    async def reachable() -> bool:
        if not store_up:
            raise OSError("store unreachable")
        return True

    health = HealthServicer()
    probe = Probe()
    definition = ServiceDefinition(
        names=[SERVICE], register=probe.register, readiness=reachable, readiness_interval_seconds=0.05
    )
    server, port = await create_server(
        settings, service_names=[SERVICE], register=probe.register, health=health
    )
    watcher = asyncio.create_task(watch_readiness(definition, health))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await asyncio.wait_for(watch.read(), 2)).status == Status.SERVING
            store_up = False
            assert (await asyncio.wait_for(watch.read(), 2)).status == Status.NOT_SERVING
            overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert overall.status == Status.NOT_SERVING
            store_up = True
            assert (await asyncio.wait_for(watch.read(), 2)).status == Status.SERVING
            watch.cancel()
    finally:
        watcher.cancel()
        await server.stop(None)
