"""The generic proxy: admit a call (auth, limits, scope), check its resources, forward raw bytes.

Admission comes first and reads nothing but headers: ``authenticate`` (credential, then the
failed-authentication limiter, which never refuses a valid credential) and ``authorize`` (the rate
limit, then the scope). Only an admitted call gets its request parsed: gRPC has read the message by
then (its size bounded by the server), and HTTP reads its body only after admission
(``Gateway.unary``'s ``read_message``), so an anonymous request never costs a JSON parse.

Request bytes are parsed at most once (only for methods whose request carries resource names) and
forwarded unchanged, so the gateway never re-serialises a message; responses are relayed as bytes.
gRPC handlers (``grpc_handlers``) and the HTTP/JSON side (``http.py``) share ``Gateway.unary`` so
both transports enforce exactly the same rules. Audited methods (``catalog.MethodInfo.audited``)
leave an entry in the audit log (``audit.py``) once answered.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from google.longrunning import operations_pb2, operations_proto_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from services.gateway import catalog
from services.gateway.admin import GatewayApi
from services.gateway.audit import AuditEntry, AuditLog, status_name
from services.gateway.auth import Authenticator, Principal, credential_id
from services.gateway.catalog import MethodInfo, iter_resource_values
from services.gateway.client_address import ClientAddresses
from services.gateway.config import GatewaySettings
from services.gateway.key_directory import KeyDirectory
from services.gateway.keystore import open_keystore
from services.gateway.limits import AuthFailureLimiter, RateLimiter, RetryBudget, StreamLimiter
from services.gateway.metrics import GatewayMetrics
from services.gateway.purge import TenantPurger
from services.gateway.shared_buckets import SharedBuckets
from services.runtime import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    attributes,
    channel_options,
    instrumented_channel,
    retry_service_config,
)
from services.runtime.assertion import AssertionSigner, Caller, settings_key
from services.runtime.errors import STATUS_DETAILS_KEY

logger = logging.getLogger(__name__)

HeaderLookup = Callable[[str], str | None]

#: Caller metadata relayed to backends; everything else (credentials, x-flashcrowd-*) stays here.
FORWARDED_HEADERS = ("x-request-id",)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CALLER_HEADERS = ("authorization", "x-api-key", *FORWARDED_HEADERS)
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


class BackendError(Exception):
    """A backend answered non-OK: relayed to the caller with its status details."""

    def __init__(self, code: grpc.StatusCode, details: str, status_details: bytes | None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.status_details = status_details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_KEY, self.status_details),) if self.status_details else ()


def _status_details(error: grpc.aio.AioRpcError) -> bytes | None:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


class BackendPool:
    """A few channels to one backend, used round-robin; multicallables are created once per method."""

    def __init__(self, name: str, target: str, settings: GatewaySettings) -> None:
        self.name = name
        self.target = target
        options = [
            *channel_options(settings, service_config=retry_service_config(())),
            # Our own retry loop decides (budget, idempotency); the channel must not retry too.
            ("grpc.enable_retries", 0),
            # Fail a connection attempt after connect_timeout instead of the 20 s default, and keep
            # the reconnect backoff short so a restarted backend is used again within seconds.
            ("grpc.min_reconnect_backoff_ms", int(settings.connect_timeout_seconds * 1000)),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(settings.max_reconnect_backoff_seconds * 1000)),
            # Separate connections per pooled channel (gRPC would otherwise share one subchannel).
            ("grpc.use_local_subchannel_pool", 1),
        ]
        # channel_options already sets enable_retries=1; the later entry must win, so drop it.
        options = [opt for opt in options if opt != ("grpc.enable_retries", 1)]
        self.channels = [
            instrumented_channel(target, options=[*options, ("grpc.channel_id", index)])
            for index in range(settings.channel_pool_size)
        ]
        self._next = itertools.cycle(range(len(self.channels)))
        self._callables: dict[tuple[int, str], Any] = {}

    def _callable(self, info: MethodInfo) -> Any:
        index = next(self._next)
        key = (index, info.full)
        multicallable = self._callables.get(key)
        if multicallable is None:
            channel = self.channels[index]
            if info.client_streaming and info.server_streaming:
                factory = channel.stream_stream
            elif info.client_streaming:
                factory = channel.stream_unary
            elif info.server_streaming:
                factory = channel.unary_stream
            else:
                factory = channel.unary_unary
            # No serializers: requests and responses stay bytes.
            multicallable = self._callables[key] = factory(info.full)
        return multicallable

    def call(self, info: MethodInfo) -> Any:
        return self._callable(info)

    async def serving(self, timeout: float) -> bool:
        """Whether the backend answers its overall health check with SERVING within ``timeout``."""
        stub = health_pb2_grpc.HealthStub(self.channels[0])
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels), return_exceptions=True)


class _OperationRoutes:
    """Remembers which backend created an operation (LRU), so Get/Wait/Cancel go straight there."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._routes: OrderedDict[str, str] = OrderedDict()

    def remember(self, name: str, backend: str) -> None:
        self._routes[name] = backend
        self._routes.move_to_end(name)
        if len(self._routes) > self.size:
            self._routes.popitem(last=False)

    def lookup(self, name: str) -> str | None:
        return self._routes.get(name)


class Gateway:
    """Everything a call goes through, independent of the transport it arrived on."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.store = open_keystore(settings.keystore_url, settings.keystore_path)
        self.key_directory = KeyDirectory(
            self.store, min_refresh_seconds=settings.key_directory_refresh_seconds
        )
        self.authenticator = Authenticator(settings, self.store, self.key_directory)
        self.client_addresses = ClientAddresses(settings.trusted_proxies, settings.client_address_header)
        self.audit = AuditLog(
            self.store,
            self.metrics,
            queue_size=settings.audit_queue_size,
            batch_size=settings.audit_batch_size,
            log_lines=settings.audit_log_lines,
        )
        self.buckets = SharedBuckets(
            settings.redis_url,
            replicas=settings.gateway_replicas,
            timeout_seconds=settings.redis_timeout_seconds,
        )
        self.rate_limiter = RateLimiter(settings, self.buckets)
        self.streams = StreamLimiter(settings.max_streams_per_tenant)
        self.auth_failures = AuthFailureLimiter(
            settings.auth_failure_limit, settings.auth_failure_address_limit, buckets=self.buckets
        )
        self.retry_budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min_per_second)
        self.backends: dict[str, BackendPool] = {
            catalog.AUDIENCE: BackendPool(catalog.AUDIENCE, settings.audience_target, settings),
            catalog.RETARGET: BackendPool(catalog.RETARGET, settings.retarget_target, settings),
            catalog.SALE_MONITOR: BackendPool(catalog.SALE_MONITOR, settings.sale_monitor_target, settings),
        }
        self.operation_routes = _OperationRoutes()
        self.signer = AssertionSigner(settings_key(settings))
        self.purger = TenantPurger(self)
        self.api = GatewayApi(self)
        self.local_handlers = self.api.handlers()
        #: Backend attempts made, per method (tests and the bench read it).
        self.attempts: dict[str, int] = {}

    async def start(self) -> None:
        """Start the background tasks (audit writer, periodic purge); needs the running loop."""
        self.audit.start()
        self.purger.start()

    async def backend_health(self) -> dict[str, bool]:
        """``{proxied service: its backend is SERVING}``; Operations while any backend is."""
        names = list(self.backends)
        timeout = self.settings.connect_timeout_seconds
        answers = await asyncio.gather(*(self.backends[n].serving(timeout) for n in names))
        up = dict(zip(names, answers, strict=True))
        statuses = {service: up[backend] for service, backend in catalog.SERVICES.items() if backend in up}
        statuses[catalog.OPERATIONS_SERVICE] = up[catalog.AUDIENCE] or up[catalog.RETARGET]
        return statuses

    async def close(self) -> None:
        await self.purger.close()
        await self.key_directory.close()
        await self.audit.close(timeout=max(self.settings.grace_seconds, 1.0))
        await asyncio.gather(*(pool.close() for pool in self.backends.values()))
        await self.buckets.close()
        self.store.close()

    # --- admission ---------------------------------------------------------------------------
    async def authenticate(self, header: HeaderLookup, client: str = "") -> Principal:
        """The caller's principal, or Unauthenticated; past the failed-authentication limits of
        (client, credential id) a failure is answered RESOURCE_EXHAUSTED instead. A valid credential
        is never refused here."""
        try:
            return await self.authenticator.authenticate(header)
        except Unauthenticated:
            refusal = await self.auth_failures.failed(client or "unknown", credential_id(header))
            self.metrics.auth_failures.add(1, {"outcome": "limited" if refusal else "unauthenticated"})
            if refusal is not None:
                raise refusal from None
            raise

    async def authorize(self, info: MethodInfo, principal: Principal) -> None:
        """Take a rate-limit token (refused calls too, so refusals cannot flood), then check the scope."""
        try:
            await self.rate_limiter.check(principal.limit_key, info.full)
        except ResourceExhausted:
            self.metrics.rate_limited.add(
                1, {attributes.TENANT: principal.tenant or "", "rpc.method": info.name}
            )
            raise
        if not principal.allows(info.scopes):
            raise PermissionDenied(
                f"{info.name} needs one of the scopes {sorted(info.scopes)}",
                reason="MISSING_SCOPE",
                metadata={"method": info.name, "scopes": " ".join(sorted(info.scopes))},
            )
        if info.backend != catalog.LOCAL and principal.is_system:
            raise PermissionDenied(
                "system credentials cannot call tenant APIs; use a tenant or platform key",
                reason="TENANT_REQUIRED",
            )

    async def admit(self, info: MethodInfo, header: HeaderLookup, client: str = "") -> Principal:
        """Authenticate, take a rate-limit token and check the scope."""
        principal = await self.authenticate(header, client)
        await self.authorize(info, principal)
        return principal

    def audit_entry(
        self,
        info: MethodInfo,
        principal: Principal,
        request: Message | None,
        code: int,
        *,
        transport: str,
        client: str,
        header: HeaderLookup,
        resource_hint: Sequence[str] = (),
    ) -> AuditEntry:
        request_id = header("x-request-id") or ""
        return AuditEntry(
            time=time.time(),
            tenant=principal.tenant or "",
            principal_kind=principal.kind,
            principal_tenant=principal.tenant or "",
            subject=principal.subject,
            auth_method=principal.method,
            method=info.full,
            resources=(),
            status_code=status_name(code),
            transport=transport,
            client_address=client,
            request_id=request_id if _REQUEST_ID.fullmatch(request_id) else "",
            pending=(info, request, tuple(resource_hint)),
        )

    def check_resources(self, info: MethodInfo, message: Message, principal: Principal) -> None:
        """Every resource name in the request must be under ``tenants/{caller}``; else NOT_FOUND.

        Platform principals act for every tenant: their names only need to be tenant resources.
        """
        if principal.is_platform:
            for path, value, strict in iter_resource_values(message):
                if strict and not value.startswith("tenants/"):
                    raise InvalidArgument(path, "must be a resource name under tenants/{tenant}")
            return
        assert principal.tenant is not None
        own = f"tenants/{principal.tenant}"
        for path, value, strict in iter_resource_values(message):
            if value == own or value.startswith(own + "/"):
                continue
            if value.startswith("tenants/") or "tenants/" in value:
                # Another tenant's (or a disguised) name: the same answer as a missing resource.
                raise NotFound(_resource_type(value), value)
            if strict:
                raise InvalidArgument(path, f"must be a resource name under {own}")

    def parse(self, info: MethodInfo, data: bytes) -> Message:
        try:
            return info.request_class.FromString(data)
        except (DecodeError, RecursionError, ValueError):
            raise InvalidArgument("request", f"not a valid {info.descriptor.input_type.name}") from None

    def deadline(self, time_remaining: float | None, *, streaming: bool = False) -> float | None:
        """Absolute (loop clock) deadline for backend calls: the caller's minus the margin."""
        loop_now = asyncio.get_running_loop().time()
        if time_remaining is None:
            if streaming:
                return None  # a follow stream may stay open as long as the caller wants
            return loop_now + self.settings.default_deadline_seconds
        budget = time_remaining - self.settings.deadline_margin_seconds
        if budget <= 0:
            raise DeadlineExceeded("deadline too short to reach the backend", reason="DEADLINE_TOO_SHORT")
        return loop_now + budget

    def outgoing_metadata(
        self, info: MethodInfo, principal: Principal, header: HeaderLookup
    ) -> tuple[tuple[str, str], ...]:
        """The signed assertion of who calls (bound to this method), plus a well-formed request id;
        nothing else of the caller's."""
        metadata: list[tuple[str, str]] = [self.signer.metadata(principal.caller(), info.full)]
        for name in FORWARDED_HEADERS:
            value = header(name)
            if value is not None and _REQUEST_ID.fullmatch(value):
                metadata.append((name, value))
        return tuple(metadata)

    # --- unary --------------------------------------------------------------------------------
    async def unary(
        self,
        info: MethodInfo,
        data: bytes,
        header: HeaderLookup,
        time_remaining: float | None,
        *,
        message: Message | None = None,
        read_message: Callable[[], Awaitable[Message]] | None = None,
        transport: str = "grpc",
        client: str = "",
        resource_hint: Sequence[str] = (),
    ) -> bytes:
        """Admit, check and forward one unary call; raises ServiceError or BackendError.

        ``read_message`` (HTTP) produces the request only once the call is admitted: nothing of
        the body is read or parsed for a caller that is refused.
        """
        started = time.perf_counter()
        tenant = ""
        code = 0
        principal: Principal | None = None
        request: Message | None = message
        audited = False
        try:
            principal = await self.authenticate(header, client)
            audited = info.audited
            try:
                await self.authorize(info, principal)
            except ResourceExhausted:
                audited = False  # rate-limited: nothing happened, and floods must not fill the log
                raise
            tenant = principal.tenant or ""
            if tenant:
                trace.get_current_span().set_attribute(attributes.TENANT, tenant)
            if read_message is not None:
                request = await read_message()
                data = request.SerializeToString()
            if info.backend == catalog.LOCAL:
                request = request if request is not None else self.parse(info, data)
                reply = await self.local_handlers[info.name](principal, request)
                return reply.SerializeToString()
            # Parsed once: a malformed request is INVALID_ARGUMENT here rather than a backend's
            # deserialisation failure (INTERNAL); the bytes forwarded are still the caller's own.
            request = request if request is not None else self.parse(info, data)
            if info.checks_resources:
                self.check_resources(info, request, principal)
            deadline = self.deadline(time_remaining)
            metadata = self.outgoing_metadata(info, principal, header)
            if info.backend == catalog.ROUTED:
                return await self._routed(
                    info, data, request, metadata, deadline, caller_deadline=time_remaining is not None
                )
            response = await self._forward(self.backends[info.backend], info, data, metadata, deadline)
            if info.returns_operation:
                self._remember_operation(response, info.backend)
            return response
        except ServiceError as error:
            code = error.code.value[0]
            raise
        except BackendError as error:
            code = error.code.value[0]
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.value[0]
            raise
        finally:
            self.metrics.record(
                info.service, info.name, tenant, code, time.perf_counter() - started, transport
            )
            if audited and principal is not None:
                if request is None and data:
                    request = self._parse_quietly(info, data)
                self.audit.record(
                    self.audit_entry(
                        info,
                        principal,
                        request,
                        code,
                        transport=transport,
                        client=client,
                        header=header,
                        resource_hint=resource_hint,
                    )
                )

    def _parse_quietly(self, info: MethodInfo, data: bytes) -> Message | None:
        """The request of a refused call, for its audit entry; None if it does not parse."""
        try:
            return self.parse(info, data)
        except InvalidArgument:
            return None

    async def forward_as(
        self, caller: Caller, info: MethodInfo, request: Message, backend: str = ""
    ) -> bytes:
        """Call a backend as ``caller`` (the gateway's own work, e.g. the purge): through the same
        pools, retries and budget as proxied calls, with an assertion signed for ``info``'s method."""
        metadata = (self.signer.metadata(caller, info.full),)
        deadline = asyncio.get_running_loop().time() + self.settings.default_deadline_seconds
        pool = self.backends[backend or info.backend]
        return await self._forward(pool, info, request.SerializeToString(), metadata, deadline)

    async def _forward(
        self,
        pool: BackendPool,
        info: MethodInfo,
        data: bytes,
        metadata: Sequence[tuple[str, str]],
        deadline: float | None,
    ) -> bytes:
        """One backend call with retries (idempotent methods only), backoff with jitter, budget."""
        loop = asyncio.get_running_loop()
        self.retry_budget.record_call()
        attempt = 0
        while True:
            attempt += 1
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded(f"deadline exceeded calling the {pool.name} service")
            self.attempts[info.full] = self.attempts.get(info.full, 0) + 1
            try:
                return await pool.call(info)(data, timeout=timeout, metadata=metadata, wait_for_ready=False)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if (
                    info.idempotent
                    and code in RETRYABLE_CODES
                    and attempt < self.settings.retry_max_attempts
                    and self.retry_budget.try_spend()
                ):
                    ceiling = min(
                        self.settings.retry_max_backoff_seconds,
                        self.settings.retry_initial_backoff_seconds * 2 ** (attempt - 1),
                    )
                    pause = random.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero
                    if deadline is None or loop.time() + pause < deadline:
                        self.metrics.retries.add(1, {"rpc.method": info.name})
                        await asyncio.sleep(pause)
                        continue
                raise self.backend_error(pool, error) from None

    @staticmethod
    def backend_error(pool: BackendPool, error: grpc.aio.AioRpcError) -> Exception:
        code = error.code()
        details = _status_details(error)
        if details is None and code is grpc.StatusCode.UNAVAILABLE:
            # A transport failure: its text names backend addresses, which callers need not see.
            return Unavailable(
                f"the {pool.name} service is unavailable",
                retry_after_seconds=1.0,
                reason="BACKEND_UNAVAILABLE",
            )
        if details is None and code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"deadline exceeded calling the {pool.name} service")
        return BackendError(code, error.details() or "", details)

    def _remember_operation(self, response: bytes, backend: str) -> None:
        try:
            operation = operations_proto_pb2.Operation.FromString(response)
        except DecodeError:
            return
        if operation.name:
            self.operation_routes.remember(operation.name, backend)

    async def _routed(
        self,
        info: MethodInfo,
        data: bytes,
        request: Message | None,
        metadata: Sequence[tuple[str, str]],
        deadline: float | None,
        *,
        caller_deadline: bool,
    ) -> bytes:
        """google.longrunning.Operations: the backend that owns the operation answers."""
        if request is None:
            request = self.parse(info, data)
        if info.name == "ListOperations":
            return await self._list_operations(info, request, metadata, deadline)
        name = getattr(request, "name", "")
        backend = self.operation_routes.lookup(name) or _operation_backend(name)
        if info.name == "WaitOperation" and not caller_deadline:
            # WaitOperation blocks up to its own timeout: give it that long (plus a little), not the default.
            assert isinstance(request, operations_pb2.WaitOperationRequest)
            wait = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
            deadline = asyncio.get_running_loop().time() + min(max(wait, 0.0), 600.0) + 5.0
        return await self._forward(self.backends[backend], info, data, metadata, deadline)

    async def _list_operations(
        self,
        info: MethodInfo,
        request: Message,
        metadata: Sequence[tuple[str, str]],
        deadline: float | None,
    ) -> bytes:
        """Both backends' operations, merged; the page token carries each backend's own token."""
        assert isinstance(request, operations_proto_pb2.ListOperationsRequest)
        tokens: dict[str, str] = {}
        if request.page_token:
            try:
                tokens = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
                if not isinstance(tokens, dict):
                    raise ValueError
            except ValueError:
                raise InvalidArgument("page_token", "not a token of this gateway") from None
        backends = [b for b in (catalog.AUDIENCE, catalog.RETARGET) if not request.page_token or b in tokens]
        merged = operations_proto_pb2.ListOperationsResponse()
        next_tokens: dict[str, str] = {}

        async def page_of(backend: str) -> operations_proto_pb2.ListOperationsResponse | Exception:
            sub = operations_proto_pb2.ListOperationsRequest()
            sub.CopyFrom(request)
            sub.page_token = str(tokens.get(backend, ""))
            try:
                raw = await self._forward(
                    self.backends[backend], info, sub.SerializeToString(), metadata, deadline
                )
            except (BackendError, Unavailable, DeadlineExceeded) as error:
                return error
            return operations_proto_pb2.ListOperationsResponse.FromString(raw)

        pages = await asyncio.gather(*(page_of(backend) for backend in backends))
        for backend, page in zip(backends, pages, strict=True):
            if isinstance(page, Exception):
                down = isinstance(page, Unavailable | DeadlineExceeded) or (
                    isinstance(page, BackendError)
                    and page.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
                )
                if not down or not request.return_partial_success:
                    raise page  # AIP-217: partial answers only when the caller asked for them
                # Named, never silently dropped: the caller knows this list is incomplete.
                merged.unreachable.append(_operations_collection(request.name, backend))
                continue
            merged.operations.extend(page.operations)
            for operation in page.operations:
                self.operation_routes.remember(operation.name, backend)
            if page.next_page_token:
                next_tokens[backend] = page.next_page_token
        if next_tokens:
            merged.next_page_token = base64.urlsafe_b64encode(json.dumps(next_tokens).encode()).decode()
        return merged.SerializeToString()


def _operations_collection(parent: str, backend: str) -> str:
    """The collection of a backend's operations under ``parent`` (``unreachable`` of AIP-217)."""
    tenant = parent.removesuffix("/operations")
    return f"{tenant}/campaigns/-/operations" if backend == catalog.RETARGET else f"{tenant}/operations"


def _operation_backend(name: str) -> str:
    """Launch operations are ``tenants/{t}/campaigns/{c}/operations/launch``; pack builds are
    ``tenants/{t}/operations/{id}``."""
    return catalog.RETARGET if "/campaigns/" in name else catalog.AUDIENCE


_COLLECTION_TYPES = {
    "packs": "flashcrowd.dev/Pack",
    "campaigns": "flashcrowd.dev/Campaign",
    "couponTemplates": "flashcrowd.dev/CouponTemplate",
    "coupons": "flashcrowd.dev/Coupon",
    "operations": "google.longrunning.Operation",
    "apiKeys": "flashcrowd.dev/ApiKey",
    "livePacks": "flashcrowd.dev/LivePack",
}


def _resource_type(value: str) -> str:
    """The resource type a name denotes, by its last collection (``tenants/t/packs/p`` -> Pack)."""
    parts = value.split("/")
    collection = parts[-2] if len(parts) >= 4 and len(parts) % 2 == 0 else ""
    return _COLLECTION_TYPES.get(collection, "flashcrowd.dev/Tenant")


__all__ = ["BackendError", "BackendPool", "Gateway"]
