"""Server factory details: port 0, bind failures, message size limits, caller interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
import pytest

from services.runtime import BaseServiceSettings, Unauthenticated, create_server, error_details, load_settings

from .conftest import ProbeServer
from .probe import SERVICE, Probe


async def test_port_zero_binds_a_free_port(probe_server: ProbeServer) -> None:
    assert probe_server.port > 0


async def test_taken_port_fails_loudly(probe_server: ProbeServer) -> None:
    settings = load_settings(BaseServiceSettings, port=probe_server.port)
    with pytest.raises(OSError, match=str(probe_server.port)):
        await create_server(settings, service_names=[SERVICE], register=Probe().register)


async def test_message_size_limit(settings: BaseServiceSettings) -> None:
    small = settings.model_copy(update={"max_message_bytes": 1024})
    server, port = await create_server(small, service_names=[SERVICE], register=Probe().register)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"ok"])) == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"x" * 2048]))
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


class DenyAnonymous(grpc.aio.ServerInterceptor):
    """A caller interceptor raising a domain error from its behaviour wrapper, like a gateway's auth."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = dict(context.invocation_metadata() or ())
            if "x-api-key" not in metadata:
                raise Unauthenticated("missing x-api-key", reason="API_KEY_MISSING")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_caller_interceptors_run_inside_error_mapping(settings: BaseServiceSettings) -> None:
    server, port = await create_server(
        settings, service_names=[SERVICE], register=Probe().register, interceptors=[DenyAnonymous()]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"ok")
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert error_details(caught.value).reason == "API_KEY_MISSING"
            assert await unary(b"ok", metadata=[("x-api-key", "k")]) == b"ok:ok"
    finally:
        await server.stop(None)


async def test_a_burst_beyond_grpc_cores_default_queue_is_answered_not_cancelled() -> None:
    # gRPC core's default pending-request queue (1,000) cancels about half of a 4,000-call burst.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = load_settings(BaseServiceSettings)
    server, port = await create_server(settings, service_names=[], register=lambda _server: None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check() -> str:
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
                    return "OK"
                except grpc.aio.AioRpcError as error:
                    return error.code().name

            outcomes = await asyncio.gather(*(check() for _ in range(4000)))
        assert set(outcomes) == {"OK"}, {code: outcomes.count(code) for code in set(outcomes)}
    finally:
        await server.stop(0)
