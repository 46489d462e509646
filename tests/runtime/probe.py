"""A tiny servicer built from generic handlers (bytes in, bytes out) whose methods raise on demand.

The request payload names what to do (``b"not_found"``, ``b"ok"``...), so one service exercises every
error mapping for each of the four RPC shapes without generating protos.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio

from services.runtime import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceDefinition,
    Unauthenticated,
    Unavailable,
)

SERVICE = "flashcrowd.test.v1.Probe"
SECRET = "secret internal detail /var/lib/flashcrowd"

ERRORS: dict[str, Callable[[], Exception]] = {
    "invalid_argument": lambda: InvalidArgument(
        [("spec.window", "end before start"), ("parent", "required")]
    ),
    "invalid_single": lambda: InvalidArgument("page_size", "must be between 1 and 1000"),
    "not_found": lambda: NotFound("flashcrowd.dev/Pack", "tenants/t1/packs/p9"),
    "already_exists": lambda: AlreadyExists("flashcrowd.dev/Pack", "tenants/t1/packs/p1"),
    "failed_precondition": lambda: FailedPrecondition(
        "SEED_TOO_SMALL", "seed has 12 users, needs 100", [("SEED_SIZE", "tenants/t1/packs/p1", "12 < 100")]
    ),
    "permission_denied": lambda: PermissionDenied(
        "tenant t2 does not own this pack", resource_type="flashcrowd.dev/Pack", name="tenants/t1/packs/p1"
    ),
    "unauthenticated": lambda: Unauthenticated(),
    "aborted": lambda: Aborted(),
    "resource_exhausted": lambda: ResourceExhausted(
        "rate limit exceeded", retry_after_seconds=1.5, violations=[("tenants/t1", "100 requests/s")]
    ),
    "unavailable": lambda: Unavailable(retry_after_seconds=0.2),
    "deadline_exceeded": lambda: DeadlineExceeded(),
    "unexpected": lambda: ValueError(SECRET),
}


async def _act(kind: str, context: grpc.aio.ServicerContext) -> None:
    if kind in ERRORS:
        raise ERRORS[kind]()
    if kind == "abort":  # a handler's own abort must pass through untouched
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "handler chose this")
    if kind == "set_code_then_raise":
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("handler set this")
        raise RuntimeError(SECRET)


class Probe:
    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await _act(request.decode(), context)
        return b"ok:" + request

    async def server_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        await _act(request.decode(), context)
        yield b"second"

    async def write_stream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        # reader/writer style (like the library health Watch): must survive every interceptor
        await context.write(b"first")
        await _act(request.decode(), context)
        await context.write(b"second")

    async def client_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        received = [request async for request in requests]
        await _act(received[-1].decode(), context)
        return b",".join(received)

    async def bidi_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            await _act(request.decode(), context)
            yield b"echo:" + request

    async def sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(float(request.decode()))
        return b"done"

    async def flaky(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Fails UNAVAILABLE until the third attempt for the same key."""
        key = request.decode()
        self.attempts[key] += 1
        if self.attempts[key] < 3:
            raise Unavailable(f"attempt {self.attempts[key]} refused")
        return str(self.attempts[key]).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: payloads stay bytes.
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "WriteStream": grpc.unary_stream_rpc_method_handler(self.write_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "BidiStream": grpc.stream_stream_rpc_method_handler(self.bidi_stream),
                "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
                "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            },
        )

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.handler(),))


async def build(settings: object) -> ServiceDefinition:
    """What a real service's build does: create its servicer (in the loop) and say how to clean up."""
    probe = Probe()

    async def close() -> None:
        logging.getLogger(__name__).info("probe closed", extra={"attempts": sum(probe.attempts.values())})

    return ServiceDefinition(names=[SERVICE], register=probe.register, on_stop=[close])
