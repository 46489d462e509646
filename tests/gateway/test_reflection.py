"""Discovery: reflection lists and describes every proxied service (as grpcurl would use it), health."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.gateway.catalog import PUBLIC_SERVICES


async def test_reflection_lists_and_describes_proxied_services(fake_stack) -> None:
    stack, _ = fake_stack

    # The reflection client is synchronous (like grpcurl's); it runs in a thread against the aio server.
    def discover() -> tuple[set[str], list[str]]:
        with grpc.insecure_channel(stack.target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            pool = DescriptorPool(database)
            service = pool.FindServiceByName("flashcrowd.audience.v1.AudienceService")
            method = service.methods_by_name["GetPack"]
            fields = [f.name for f in method.input_type.fields]
            return services, fields

    services, fields = await asyncio.to_thread(discover)
    assert set(PUBLIC_SERVICES) <= services
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert fields == ["name"]


async def test_health_per_service(fake_stack) -> None:
    stack, _ = fake_stack
    health = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", *PUBLIC_SERVICES):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_backend_service_is_fronted(real_stack) -> None:
    """A service a backend starts serving but the gateway does not front fails here, not in production."""

    def backend_services(target: str) -> set[str]:
        with grpc.insecure_channel(target) as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    served: set[str] = set()
    for target in (real_stack.audience_target, real_stack.retarget_target):
        served |= await asyncio.to_thread(backend_services, target)
    internal = {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert served - internal <= set(PUBLIC_SERVICES), sorted(served - internal - set(PUBLIC_SERVICES))
