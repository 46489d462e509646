"""gRPC side of the gateway: generic handlers (bytes in, bytes out) for every served method.

gRPC core reads a request message (bounded by ``max_message_bytes``) before a handler runs; the
handler admits the call (``Gateway.authenticate`` / ``authorize``: headers only) before it parses a
byte of it, so an unauthenticated caller never costs a parse. The client address comes from the
peer, or from trusted proxies' forwarding metadata (``client_address.py``).
"""

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
from services.gateway.client_address import grpc_peer_host
from services.gateway.proxy import CALLER_HEADERS, BackendError, Gateway, HeaderLookup
from services.runtime import ResourceExhausted, ServiceError, Unauthenticated, attributes


def metadata_lookup(context: grpc.aio.ServicerContext) -> HeaderLookup:
    """Header lookup over the call's metadata; a credential sent twice is refused, not guessed."""
    found: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        key, value = item[0], item[1]
        if key in CALLER_HEADERS:
            if key in found:
                raise Unauthenticated(f"{key} sent more than once", reason="AMBIGUOUS_CREDENTIALS")
            found[key] = value if isinstance(value, str) else ""
    return found.get


def client_address(gateway: Gateway, context: grpc.aio.ServicerContext) -> str:
    """The caller's address: the peer's, or what trusted proxies forwarded in the metadata."""
    addresses = gateway.client_addresses
    peer = grpc_peer_host(context.peer() or "")
    if not addresses.trusted:
        return peer
    forwarded = [
        value
        for key, value in (item[:2] for item in context.invocation_metadata() or ())
        if key == addresses.header and isinstance(value, str)
    ]
    return addresses.resolve(peer, forwarded)


async def _abort(context: grpc.aio.ServicerContext, error: BackendError) -> None:
    await context.abort(error.code, error.details, error.trailing_metadata())


def _unary_unary(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await gateway.unary(
                info,
                request,
                metadata_lookup(context),
                context.time_remaining(),
                client=client_address(gateway, context),
            )
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
        self.limit_key = ""
        self.client = ""
        #: The (first) request message, for the audit entry.
        self.request: Any = None
        self.audited = False

    async def admit(self) -> None:
        self.header = metadata_lookup(self.context)
        self.client = client_address(self.gateway, self.context)
        self.principal = await self.gateway.authenticate(self.header, self.client)
        self.audited = self.info.audited
        self.tenant = self.principal.tenant or ""
        trace.get_current_span().set_attribute(attributes.TENANT, self.tenant)
        self.limit_key = self.principal.limit_key
        try:
            await self.gateway.authorize(self.info, self.principal)
            self.gateway.streams.acquire(self.limit_key)
        except ResourceExhausted:
            self.audited = False  # refused by a limit: nothing happened
            raise
        self.acquired = True

    def timeout(self) -> float | None:
        deadline = self.gateway.deadline(self.context.time_remaining(), streaming=True)
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        assert self.header is not None
        return self.gateway.outgoing_metadata(self.info, self.principal, self.header)

    def failed(self, error: BaseException) -> None:
        if isinstance(error, ServiceError | BackendError):
            self.code = error.code.value[0]
        elif isinstance(error, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED.value[0]
        else:
            self.code = grpc.StatusCode.INTERNAL.value[0]

    def finish(self) -> None:
        if self.acquired:
            self.gateway.streams.release(self.limit_key)
        self.gateway.metrics.record(
            self.info.service,
            self.info.name,
            self.tenant,
            self.code,
            time.perf_counter() - self.started,
            "grpc",
        )
        if self.audited and self.principal is not None and self.header is not None:
            entry = self.gateway.audit_entry(
                self.info,
                self.principal,
                self.request,
                self.code,
                transport="grpc",
                client=self.client,
                header=self.header,
            )
            self.gateway.audit.record(entry)


def _translate(gateway: Gateway, info: MethodInfo, error: grpc.aio.AioRpcError) -> Exception:
    return gateway.backend_error(gateway.backends[info.backend], error)


def _unary_stream(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        state = _StreamCall(gateway, info, context)
        call = None
        try:
            await state.admit()
            parsed = state.request = gateway.parse(info, request)
            if info.checks_resources:
                gateway.check_resources(info, parsed, state.principal)
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
            _note(state, error)
            raise
        finally:
            if call is not None and not call.done():
                call.cancel()
            state.finish()

    return handle


class _Pump:
    """Feeds the caller's messages to the backend call, each parsed and checked, as bytes.

    An async generator handed to gRPC as the request iterator (the write() API would deadlock
    behind the OpenTelemetry client interceptor, which holds the call until the response). A
    message that fails the checks stops the stream and cancels the backend call.
    """

    def __init__(self, gateway: Gateway, info: MethodInfo, state: _StreamCall) -> None:
        self.gateway = gateway
        self.info = info
        self.state = state
        self.principal = state.principal
        self.call: Any = None
        self.failure: Exception | None = None

    async def messages(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for data in requests:
            try:
                request = self.gateway.parse(self.info, data)
                if self.state.request is None:
                    self.state.request = request
                if self.info.checks_resources:
                    self.gateway.check_resources(self.info, request, self.principal)
            except ServiceError as error:
                self.failure = error
                if self.call is not None:
                    self.call.cancel()
                return
            yield data

    async def stop(self) -> None:
        if self.call is not None and not self.call.done():
            self.call.cancel()

    def outcome(self, error: BaseException) -> Exception:
        """What to answer when the backend call failed or was cancelled."""
        if self.failure is not None:
            return self.failure
        if isinstance(error, grpc.aio.AioRpcError):
            return _translate(self.gateway, self.info, error)
        raise error


def _stream_request(gateway: Gateway, info: MethodInfo) -> Callable[..., Any]:
    """Client-streaming and bidi: each message is checked as it passes, then forwarded as bytes."""

    async def open_call(state: _StreamCall, requests: AsyncIterator[bytes]) -> _Pump:
        await state.admit()
        pump = _Pump(gateway, info, state)
        pump.call = gateway.backends[info.backend].call(info)(
            pump.messages(requests), timeout=state.timeout(), metadata=state.metadata(), wait_for_ready=False
        )
        return pump

    if not info.server_streaming:

        async def handle_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            state = _StreamCall(gateway, info, context)
            pump: _Pump | None = None
            try:
                pump = await open_call(state, requests)
                try:
                    response = await pump.call
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                    await pump.stop()
                    raise pump.outcome(error) from None
                await pump.stop()
                if pump.failure is not None:
                    raise pump.failure
                return response
            except BackendError as error:
                state.failed(error)
                await _abort(context, error)
                raise
            except BaseException as error:
                _note(state, error)
                raise
            finally:
                if pump is not None:
                    await pump.stop()
                state.finish()

        return handle_unary

    async def handle_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        state = _StreamCall(gateway, info, context)
        pump: _Pump | None = None
        try:
            pump = await open_call(state, requests)
            try:
                async for response in pump.call:
                    yield response
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as error:
                await pump.stop()
                raise pump.outcome(error) from None
            await pump.stop()
            if pump.failure is not None:
                raise pump.failure
        except BackendError as error:
            state.failed(error)
            await _abort(context, error)
        except BaseException as error:
            _note(state, error)
            raise
        finally:
            if pump is not None:
                await pump.stop()
            state.finish()

    return handle_stream


def _note(state: _StreamCall, error: BaseException) -> None:
    if isinstance(error, Exception | asyncio.CancelledError):
        state.failed(error)


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
