"""Who is calling a backend: the gateway's signed assertion, and the ``Caller`` it carries.

Backends (audience, retarget, the sale monitor) trust no caller metadata except one header,
``x-flashcrowd-assertion``, which only holders of the shared assertion key can produce: the gateway
(for every authenticated caller it forwards) and the platform's own services (retarget calling
audience, the monitor calling retarget, the demo and batch tools). A request without a valid
assertion is refused with UNAUTHENTICATED before any handler runs (``AssertionInterceptor``).

The assertion is ``v1.<payload>.<mac>``: ``payload`` is base64url of a compact JSON object
``{"m": method, "t": tenant | null, "k": "tenant" | "platform", "s": subject, "c": scopes, "e": expiry}``
and ``mac`` is base64url of HMAC-SHA-256(key, "v1." + payload). It is bound to the gRPC method it was
made for and expires ``ttl`` seconds after it was made (60 s; clocks of pods may differ by up to
``CLOCK_SKEW_SECONDS``), so a captured header opens nothing else and not for long.

The key comes from ``FLASHCROWD_GATEWAY_ASSERTION_KEY`` (hex or base64 of at least 32 bytes; a Secret
shared by the gateway and the backends in Kubernetes). Without it, the embedded default generates one
under ``./var/gateway-assertion.key`` (mode 0600) and says so in the log: every process started from
the same directory (the demo, tests, a laptop) then agrees on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio

from services.runtime.errors import PermissionDenied, Unauthenticated
from services.runtime.scopes import ALL_SCOPES, MEMBERS_READ, PLATFORM_SCOPES
from services.runtime.tenant_ids import valid_tenant_id

logger = logging.getLogger(__name__)

#: The one header name, used by the gateway (sender) and every backend (receiver).
ASSERTION_HEADER = "x-flashcrowd-assertion"
ASSERTION_KEY_VARIABLE = "FLASHCROWD_GATEWAY_ASSERTION_KEY"
DEFAULT_KEY_PATH = Path("var/gateway-assertion.key")
DEFAULT_TTL_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 30.0
MIN_KEY_BYTES = 32
MAX_ASSERTION_LENGTH = 4096
#: Methods any client may call without an assertion (probes and tooling).
UNASSERTED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

CallerKind = Literal["tenant", "platform"]
_VERSION = "v1"


@dataclass(frozen=True)
class Caller:
    """The principal a call acts for, as the gateway (or a platform service) asserted it.

    ``tenant`` is the tenant a tenant principal is bound to; platform principals have none and may
    act on any tenant's resources (the platform owns the user base).
    """

    kind: CallerKind
    tenant: str | None = None
    subject: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.kind == "tenant" and not valid_tenant_id(self.tenant):
            raise ValueError(f"a tenant caller needs a valid tenant id, got {self.tenant!r}")
        if self.kind == "platform" and self.tenant is not None:
            raise ValueError("a platform caller is bound to no tenant")
        if self.kind == "tenant" and self.scopes & PLATFORM_SCOPES:
            raise ValueError(f"a tenant caller cannot hold {sorted(self.scopes & PLATFORM_SCOPES)}")

    @property
    def is_platform(self) -> bool:
        return self.kind == "platform"

    def may_act_for(self, tenant: str) -> bool:
        """Platform principals act for every tenant; a tenant principal only for itself."""
        return self.is_platform or self.tenant == tenant

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    @classmethod
    def platform(cls, subject: str, scopes: Iterable[str] = ALL_SCOPES) -> Caller:
        return cls(kind="platform", subject=subject, scopes=frozenset(scopes))

    @classmethod
    def for_tenant(cls, tenant: str, subject: str = "", scopes: Iterable[str] = ()) -> Caller:
        return cls(kind="tenant", tenant=tenant, subject=subject, scopes=frozenset(scopes))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_key(text: str) -> bytes:
    """Hex or base64 text of at least 32 bytes -> the key bytes; ``ValueError`` saying why not."""
    text = text.strip()
    key: bytes | None = None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=False, altchars=b"-_")
        except (binascii.Error, ValueError):
            key = None
    if not key or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"must be hex or base64 of at least {MIN_KEY_BYTES} random bytes")
    return key


def load_assertion_key(configured: str | None = None, path: Path = DEFAULT_KEY_PATH) -> bytes:
    """The configured key, else the embedded default under ``./var`` (created once, mode 0600)."""
    value = configured if configured is not None else os.environ.get(ASSERTION_KEY_VARIABLE)
    if value:
        return parse_key(value)
    try:
        return parse_key(path.read_text())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this directory made it first
        return parse_key(path.read_text())
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text + "\n")
    logger.warning(
        "%s is not set: generated a gateway assertion key in %s for this directory's processes; "
        "a deployment must set it from a Secret shared by the gateway and the backends",
        ASSERTION_KEY_VARIABLE,
        path,
    )
    return bytes.fromhex(text)


class AssertionSigner:
    """Makes assertions (the gateway, and platform services calling each other)."""

    def __init__(self, key: bytes, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"assertion key must have at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.ttl = ttl_seconds

    def sign(self, caller: Caller, method: str, *, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.ttl)
        body = {
            "m": method,
            "t": caller.tenant,
            "k": caller.kind,
            "s": caller.subject[:128],
            "c": sorted(caller.scopes),
            "e": expiry,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        signed = f"{_VERSION}.{payload}"
        mac = hmac.new(self._key, signed.encode(), hashlib.sha256).digest()
        return f"{signed}.{_b64(mac)}"

    def metadata(self, caller: Caller, method: str) -> tuple[str, str]:
        return (ASSERTION_HEADER, self.sign(caller, method))


class AssertionVerifier:
    """Checks assertions (every backend); ``verify`` raises Unauthenticated with a reason."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def verify(self, value: str, method: str, *, now: float | None = None) -> Caller:
        if len(value) > MAX_ASSERTION_LENGTH:
            raise _refused("gateway assertion too long")
        version, _, rest = value.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not payload or not mac:
            raise _refused("malformed gateway assertion")
        expected = hmac.new(self._key, f"{version}.{payload}".encode(), hashlib.sha256).digest()
        try:
            presented = _unb64(mac)
        except (binascii.Error, ValueError):
            raise _refused("malformed gateway assertion") from None
        # The signature first: nothing of an unsigned payload is parsed.
        if not hmac.compare_digest(presented, expected):
            raise _refused("gateway assertion signature does not verify")
        try:
            body = json.loads(_unb64(payload))
        except (binascii.Error, ValueError):
            raise _refused("malformed gateway assertion") from None
        if not isinstance(body, dict) or body.get("m") != method:
            raise _refused("gateway assertion was made for another method")
        expiry = body.get("e")
        current = time.time() if now is None else now
        if not isinstance(expiry, int) or expiry + CLOCK_SKEW_SECONDS < current:
            raise _refused("gateway assertion expired")
        return _caller_of(body)


def _refused(message: str) -> Unauthenticated:
    return Unauthenticated(
        f"{message}: backends accept calls only through the gateway (or from platform services "
        f"holding {ASSERTION_KEY_VARIABLE})",
        reason="GATEWAY_ASSERTION_REQUIRED",
    )


def _caller_of(body: dict[str, Any]) -> Caller:
    scopes = body.get("c")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise _refused("malformed gateway assertion")
    try:
        return Caller(
            kind=body.get("k"),  # type: ignore[arg-type]  # checked by Caller
            tenant=body.get("t"),
            subject=str(body.get("s", "")),
            scopes=frozenset(scopes) & ALL_SCOPES,
        )
    except (ValueError, TypeError):
        raise _refused("malformed gateway assertion") from None


def _header_value(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == ASSERTION_HEADER:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def caller_of(context: grpc.aio.ServicerContext | None) -> Caller | None:
    """The caller of a request whose assertion ``AssertionInterceptor`` has verified.

    None for a servicer called without a context (unit tests of servicer methods).
    """
    if context is None:
        return None
    cached = getattr(context, "_flashcrowd_caller", None)
    if isinstance(cached, Caller):
        return cached
    value = _header_value(context.invocation_metadata())
    if value is None:
        return None
    # Verified by the interceptor already: only the payload needs reading here.
    try:
        body = json.loads(_unb64(value.split(".")[1]))
    except (IndexError, binascii.Error, ValueError):
        return None
    caller = _caller_of(body) if isinstance(body, dict) else None
    return caller


def require_platform(context: grpc.aio.ServicerContext | None, scope: str = MEMBERS_READ) -> None:
    """Member-level data: only a platform principal holding ``scope`` (PERMISSION_DENIED otherwise)."""
    caller = caller_of(context)
    if caller is None and context is None:
        return  # direct servicer calls in unit tests
    if caller is None or not caller.is_platform or not caller.has(scope):
        raise PermissionDenied(
            f"member-level data needs a platform principal with the {scope!r} scope; tenants see "
            "sizes, personas and reports and target packs through campaigns",
            reason="PLATFORM_SCOPE_REQUIRED",
            metadata={"scope": scope},
        )


class AssertionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid assertion (health and reflection excepted)."""

    def __init__(self, verifier: AssertionVerifier) -> None:
        self.verifier = verifier

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if method.startswith(UNASSERTED_PREFIXES):
            return await continuation(handler_call_details)
        value = _header_value(handler_call_details.invocation_metadata)
        try:
            if value is None:
                raise _refused("missing gateway assertion")
            self.verifier.verify(value, method)
        except Unauthenticated as error:
            handler = await continuation(handler_call_details)
            return _refusing_handler(handler, error)
        return await continuation(handler_call_details)


def _refusing_handler(handler: Any, error: Unauthenticated) -> Any:
    """A handler of the same shape as ``handler`` that raises ``error`` (mapped by ErrorInterceptor)."""
    if handler is None:
        return None

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise error
        yield  # pragma: no cover - makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            streaming, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer
    )


#: Picks the caller of one call from its metadata: ``(caller, the metadata to send)``.
CallerChoice = Callable[[list[tuple[str, Any]]], tuple[Caller, list[tuple[str, Any]]]]


def _with_assertion(signer: AssertionSigner, choose: CallerChoice, details: Any) -> Any:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    caller, metadata = choose([(k, v) for k, v in (details.metadata or ()) if k != ASSERTION_HEADER])
    metadata.append(signer.metadata(caller, method))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _Signing:
    def __init__(self, signer: AssertionSigner, choose: CallerChoice) -> None:
        self.signer = signer
        self.choose = choose


class _UnaryUnary(_Signing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_assertion(self.signer, self.choose, details), request)


class _UnaryStream(_Signing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_assertion(self.signer, self.choose, details), request)


class _StreamUnary(_Signing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_assertion(self.signer, self.choose, details), request_iterator)


class _StreamStream(_Signing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_assertion(self.signer, self.choose, details), request_iterator)


def signing_interceptors(
    signer: AssertionSigner, caller: Caller | CallerChoice
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that assert ``caller`` on every call of a channel (all four call shapes);
    ``caller`` may also choose per call from the call's metadata (``CallerChoice``)."""
    choose: CallerChoice = caller if callable(caller) else (lambda metadata: (caller, metadata))
    return [cls(signer, choose) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


__all__ = [
    "ASSERTION_HEADER",
    "ASSERTION_KEY_VARIABLE",
    "AssertionInterceptor",
    "AssertionSigner",
    "AssertionVerifier",
    "Caller",
    "asserting_channel",
    "backend_interceptors",
    "caller_of",
    "load_assertion_key",
    "parse_key",
    "platform_channel",
    "platform_interceptors",
    "require_platform",
    "settings_key",
    "signing_interceptors",
]


def settings_key(settings: Any) -> bytes:
    """The assertion key of a service's settings (``gateway_assertion_key``), else the default."""
    secret = getattr(settings, "gateway_assertion_key", None)
    return load_assertion_key(secret.get_secret_value() if secret is not None else None)


def backend_interceptors(settings: Any) -> list[grpc.aio.ServerInterceptor]:
    """What every backend's composition root installs: refuse calls without a valid assertion."""
    return [AssertionInterceptor(AssertionVerifier(settings_key(settings)))]


def platform_interceptors(
    settings: Any, subject: str, scopes: Iterable[str] = ALL_SCOPES
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors of a platform service calling another backend as ``subject``."""
    return signing_interceptors(AssertionSigner(settings_key(settings)), Caller.platform(subject, scopes))


def asserting_channel(
    target: str,
    caller: Caller | CallerChoice,
    *,
    key: bytes | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A plain channel to a backend whose every call asserts ``caller`` (or the caller a
    ``CallerChoice`` picks per call) - demo, tools, tests.

    ``key`` defaults to ``FLASHCROWD_GATEWAY_ASSERTION_KEY`` or the embedded default under ./var.
    """
    signer = AssertionSigner(key if key is not None else load_assertion_key())
    return grpc.aio.insecure_channel(
        target, options=list(options), interceptors=signing_interceptors(signer, caller)
    )


def platform_channel(
    target: str, subject: str, *, scopes: Iterable[str] = ALL_SCOPES, **kwargs: Any
) -> grpc.aio.Channel:
    """``asserting_channel`` for a platform principal ``subject`` (every scope by default)."""
    return asserting_channel(target, Caller.platform(subject, scopes), **kwargs)
