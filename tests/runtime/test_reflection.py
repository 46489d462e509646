"""Server reflection lists the registered services and describes the ones it has descriptors for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from .probe import SERVICE


async def _ask(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield request

    async for response in stub.ServerReflectionInfo(requests()):
        return response
    raise AssertionError("no reflection response")


async def test_lists_registered_services(channel: grpc.aio.Channel) -> None:
    response = await _ask(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in response.list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


async def test_describes_health(channel: grpc.aio.Channel) -> None:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health")
    response = await _ask(channel, request)
    [raw] = response.file_descriptor_response.file_descriptor_proto[:1]
    descriptor = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert "Health" in [service.name for service in descriptor.service]
