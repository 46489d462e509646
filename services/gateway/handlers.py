"""gRPC side of the gateway: generic handlers (bytes in, bytes out) for every served method."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace

from services.gateway import catalog
from services.gateway.catalog import METHODS, MethodInfo
from services.gateway.proxy import _AUTH_HEADERS, BackendError, Gateway, HeaderLookup
from services.runtime import ServiceError, Unauthenticated, attributes


def metadata_lookup(context: grpc.aio.ServicerContext) -> HeaderLookup:
    """Header lookup over the call's metadata; a credential sent twice is refused, not guessed."""
    found: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        key, value = item[0], item[1]
        if key in _AUTH_HEADERS:
            if key in found:
                raise Unauthenticated(f"{key} sent more than once", reason="AMBIGUOUS_CREDENTIALS")
            found[key] = value if isinstance(value, str) else ""
    return found.get


async def _abort(context: grpc.aio.ServicerContext, error: BackendError) -> None:
    await context.abort(error.code, error.details, error.trailing_metadata())


def _unary_unary(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await gateway.unary(info, request, metadata_lookup(context), context.time_remaining())
        except BackendError as error:
            await _abort(context, error)
            raise  # not reached: abort raises

    return handle


class _StreamCall:
    """Shared admission and bookkeeping of streaming calls (stream limit, metrics, errors)."""

    def __init__(self, gateway: Gateway, info: MethodInfo, context: grpc.aio.ServicerContext) -> None:
        self.gateway = gateway
        self.info = info
        self.context = context
        self.started = time.perf_counter()
        self.tenant = ""
        self.code = 0
        self.principal: Any = None
        self.header: HeaderLookup | None = None
        self.acquired = False

    def admit(self) -> None:
        self.header = metadata_lookup(self.context)
        self.principal = self.gateway.admit(self.info, self.header)
        self.tenant = self.principal.tenant or ""
        trace.get_current_span().set_attribute(attributes.TENANT, self.tenant)
        self.gateway.streams.acquire(self.tenant)
        self.acquired = True

    def timeout(self) -> float | None:
        deadline = self.gateway.deadline(self.context.time_remaining(), streaming=True)
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        assert self.header is not None
        return self.gateway.outgoing_metadata(self.principal, self.header)

    def failed(self, error: Exception) -> None:
        if isinstance(error, ServiceError | BackendError):
            self.code = error.code.value[0]
        elif isinstance(error, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED.value[0]
        else:
            self.code = grpc.StatusCode.INTERNAL.value[0]

    def finish(self) -> None:
        if self.acquired:
            self.gateway.streams.release(self.tenant)
        self.gateway.metrics.record(
            self.info.service,
            self.info.name,
            self.tenant,
            self.code,
            time.perf_counter() - self.started,
            "grpc",
        )


def _translate(gateway: Gateway, info: MethodInfo, error: grpc.aio.AioRpcError) -> Exception:
    return gateway._backend_error(gateway.backends[info.backend], error)


def _unary_stream(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        state = _StreamCall(gateway, info, context)
        call = None
        try:
            state.admit()
            if info.checks_resources:
                gateway.check_resources(info, gateway.parse(info, request), state.principal)
            call = gateway.backends[info.backend].call(info)(
                request, timeout=state.timeout(), metadata=state.metadata(), wait_for_ready=False
            )
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                raise _translate(gateway, info, error) from None
        except BackendError as error:
            state.failed(error)
            await _abort(context, error)
        except BaseException as error:
            state.failed(error) if isinstance(error, Exception | asyncio.CancelledError) else None
            raise
        finally:
            if call is not None and not call.done():
                call.cancel()
            state.finish()

    return handle


def _stream_request(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    """Client-streaming and bidi: each message is checked as it passes, then forwarded as bytes."""

    async def start(state: _StreamCall, requests: AsyncIterator[bytes]) -> tuple[Any, list[Exception]]:
        state.admit()
        failure: list[Exception] = []
        holder: list[Any] = []

        def stop() -> None:
            if holder:
                holder[0].cancel()

        checked = gateway._checked_requests(info, requests, state.principal, failure, stop)
        call = gateway.backends[info.backend].call(info)(
            checked, timeout=state.timeout(), metadata=state.metadata(), wait_for_ready=False
        )
        holder.append(call)
        return call, failure

    if not info.server_streaming:

        async def handle_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            state = _StreamCall(gateway, info, context)
            call = None
            try:
                call, failure = await start(state, requests)
                try:
                    return await call
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                    if failure:
                        raise failure[0] from None
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    raise _translate(gateway, info, error) from None
            except BackendError as error:
                state.failed(error)
                await _abort(context, error)
                raise
            except BaseException as error:
                state.failed(error) if isinstance(error, Exception | asyncio.CancelledError) else None
                raise
            finally:
                if call is not None and not call.done():
                    call.cancel()
                state.finish()

        return handle_unary

    async def handle_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        state = _StreamCall(gateway, info, context)
        call = None
        try:
            call, failure = await start(state, requests)
            try:
                async for response in call:
                    yield response
                if failure:
                    raise failure[0]
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                if failure:
                    raise failure[0] from None
                if isinstance(error, asyncio.CancelledError):
                    raise
                raise _translate(gateway, info, error) from None
        except BackendError as error:
            state.failed(error)
            await _abort(context, error)
        except BaseException as error:
            state.failed(error) if isinstance(error, Exception | asyncio.CancelledError) else None
            raise
        finally:
            if call is not None and not call.done():
                call.cancel()
            state.finish()

    return handle_stream


def generic_handlers(gateway: Gateway) -> list[grpc.GenericRpcHandler]:
    """One generic handler per served service, built from the descriptors."""
    handlers: list[grpc.GenericRpcHandler] = []
    for service in catalog.PUBLIC_SERVICES:
        method_handlers: dict[str, grpc.RpcMethodHandler] = {}
        for info in METHODS.values():
            if info.service != service:
                continue
            if info.client_streaming and info.server_streaming:
                handler = grpc.stream_stream_rpc_method_handler(_stream_request(gateway, info))
            elif info.client_streaming:
                handler = grpc.stream_unary_rpc_method_handler(_stream_request(gateway, info))
            elif info.server_streaming:
                handler = grpc.unary_stream_rpc_method_handler(_unary_stream(gateway, info))
            else:
                handler = grpc.unary_unary_rpc_method_handler(_unary_unary(gateway, info))
            method_handlers[info.name] = handler
        handlers.append(grpc.method_handlers_generic_handler(service, method_handlers))
    return handlers


__all__ = ["generic_handlers", "metadata_lookup"]
