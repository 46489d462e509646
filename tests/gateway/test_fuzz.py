"""Fuzzing every public method through the gateway with requests generated from the descriptors.

Whatever the request, the answer is a deliberate status (INVALID_ARGUMENT, NOT_FOUND, ...), never
UNKNOWN or INTERNAL, and neither the gateway nor a backend falls over. Examples are bounded so the
whole module stays well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.catalog import METHODS, MethodInfo
from tests.fixtures.channels import backend_channel

from .strategies import messages

CLIENT_CORE_ARTIFACT = "Internal error from Core"
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZED = sorted(METHODS.values(), key=lambda info: info.full)
FUZZ_SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def call(channel: grpc.aio.Channel, info: MethodInfo, requests: list[bytes], metadata) -> None:  # type: ignore[no-untyped-def]
    """One call of any shape; returns normally or raises AioRpcError."""
    timeout = 1.0  # long enough for any validation answer; follow streams and waits just time out
    if info.client_streaming:
        factory = channel.stream_stream if info.server_streaming else channel.stream_unary
        stream = factory(info.full)(metadata=metadata, timeout=timeout)
        for request in requests:
            try:
                await stream.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.done_writing()
        if info.server_streaming:
            async for _ in stream:
                pass
        else:
            await stream
    elif info.server_streaming:
        stream = channel.unary_stream(info.full)(requests[0], metadata=metadata, timeout=timeout)
        for _ in range(3):
            if await stream.read() is grpc.aio.EOF:
                break
        stream.cancel()
    else:
        await channel.unary_unary(info.full)(requests[0], metadata=metadata, timeout=timeout)


def assert_deliberate(error: grpc.aio.AioRpcError, info: MethodInfo, request: object) -> None:
    if info.client_streaming and error.details() == CLIENT_CORE_ARTIFACT:
        # grpc-python's client reports this when the server answers before the client finished
        # writing; the same happens calling a backend directly, without the gateway.
        return
    assert error.code() not in FORBIDDEN, (
        f"{info.key} answered {error.code().name}: {error.details()}\n{request}"
    )


@pytest.mark.parametrize("info", FUZZED, ids=[info.key for info in FUZZED])
@FUZZ_SETTINGS
@given(data=st.data())
async def test_fuzz_method(real_stack, info: MethodInfo, data: st.DataObject) -> None:
    gateway = real_stack.gateway
    count = data.draw(st.integers(1, 3)) if info.client_streaming else 1
    requests = [data.draw(messages(info.descriptor.input_type, "fuzz")) for _ in range(count)]
    try:
        await call(gateway.channel, info, [r.SerializeToString() for r in requests], gateway.auth("fuzz"))
    except grpc.aio.AioRpcError as error:
        assert_deliberate(error, info, requests)


UNARY = [info for info in FUZZED if not info.streaming]


@pytest.mark.parametrize("info", UNARY, ids=[info.key for info in UNARY])
@settings(
    max_examples=5, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(payload=st.binary(min_size=1, max_size=200))
async def test_fuzz_raw_bytes(real_stack, info: MethodInfo, payload: bytes) -> None:
    """Bytes that may not even be a protobuf: INVALID_ARGUMENT from the gateway, or a valid call."""
    gateway = real_stack.gateway
    try:
        await call(gateway.channel, info, [payload], gateway.auth("fuzz"))
    except grpc.aio.AioRpcError as error:
        assert_deliberate(error, info, payload)


async def test_everyone_still_serving(real_stack) -> None:
    for target in (real_stack.gateway.target, real_stack.audience_target, real_stack.retarget_target):
        async with backend_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
