"""Domain errors and their one mapping to ``google.rpc.Status`` (AIP-193).

Servicers raise the exceptions below; ``ErrorInterceptor`` (installed by ``create_server``) turns
them into a status with ``ErrorInfo{reason, domain="flashcrowd.dev", metadata}`` plus the detail
message each code calls for (``BadRequest``, ``ResourceInfo``, ``PreconditionFailure``,
``QuotaFailure``, ``RetryInfo``). Anything else a handler raises becomes INTERNAL with a generic
message: the stack trace goes to the log, never to the caller.

Clients (tests, the gateway) read the details back with ``error_details(rpc_error)``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

DOMAIN = "flashcrowd.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
INTERNAL_MESSAGE = "internal error"

logger = logging.getLogger(__name__)

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_WORD = re.compile(r"[^A-Za-z0-9]+")
_UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9_]*")


def upper_snake(text: str) -> str:
    """``packNotFound`` / ``pack-not found`` -> ``PACK_NOT_FOUND`` (AIP-193 reason format)."""
    if _UPPER_SNAKE.fullmatch(text):
        return text[:63]
    words = _NON_WORD.sub("_", _CAMEL_BOUNDARY.sub("_", text)).strip("_")
    return words.upper()[:63] or "UNKNOWN"


def _type_token(resource_type: str) -> str:
    # "flashcrowd.dev/Pack" or "audience.v1.Pack" -> "PACK"
    return upper_snake(re.split(r"[/.]", resource_type)[-1])


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


class ServiceError(Exception):
    """Base of the errors a servicer raises on purpose; carries code, reason and details."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = upper_snake(reason) if reason else self.default_reason
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.extra_details = list(details)

    def detail_messages(self) -> list[Message]:
        """Detail messages specific to the code (beyond ErrorInfo); subclasses add theirs."""
        return []

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        for detail in [info, *self.detail_messages(), *self.extra_details]:
            status.details.add().Pack(detail)
        return status

    def grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its state, not through ``__init__`` (whose arguments differ per subclass), so
        # that an error raised in a child process (compute_pool.py) reaches the caller intact.
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type[ServiceError], args: tuple[Any, ...], state: dict[str, Any]) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidArgument(ServiceError):
    """The request itself is wrong, whatever the system state: ``BadRequest`` field violations.

    ``InvalidArgument("page_size", "must be between 1 and 1000")`` or
    ``InvalidArgument([("spec.window", "end before start"), ("parent", "required")])``.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field_or_violations: str | Iterable[tuple[str, str]],
        description: str | None = None,
        *,
        message: str | None = None,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        if isinstance(field_or_violations, str):
            if description is None:
                raise TypeError("InvalidArgument(field, description): description is required")
            violations = [(field_or_violations, description)]
        else:
            violations = [(str(f), str(d)) for f, d in field_or_violations]
        self.violations = violations
        summary = "; ".join(f"{f}: {d}" for f, d in violations)
        super().__init__(message or f"invalid argument: {summary}", reason=reason, metadata=metadata)

    def detail_messages(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
        ]


class _ResourceError(ServiceError):
    suffix: ClassVar[str]
    verb: ClassVar[str]

    def __init__(
        self,
        resource_type: str,
        name: str,
        *,
        owner: str = "",
        description: str = "",
        message: str | None = None,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        self.resource_type = resource_type
        self.name = name
        self.owner = owner
        self.description = description
        merged = {"resourceType": resource_type, "resourceName": name, **(metadata or {})}
        super().__init__(
            message or f"{resource_type} {self.verb}: {name}",
            reason=reason or f"{_type_token(resource_type)}_{self.suffix}",
            metadata=merged,
        )

    def detail_messages(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=self.resource_type,
                resource_name=self.name,
                owner=self.owner,
                description=self.description,
            )
        ]


class NotFound(_ResourceError):
    """``NotFound("flashcrowd.dev/Pack", "tenants/t1/packs/p9")``; reason defaults to ``PACK_NOT_FOUND``."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"
    suffix = "NOT_FOUND"
    verb = "not found"


class AlreadyExists(_ResourceError):
    """The resource the caller tried to create exists; reason defaults to ``<TYPE>_ALREADY_EXISTS``."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"
    suffix = "ALREADY_EXISTS"
    verb = "already exists"


class FailedPrecondition(ServiceError):
    """The system is not in a state the request needs (e.g. seed pack too small for lookalike).

    ``violations`` are ``(type, subject, description)``; without them one violation is derived
    from ``reason`` and ``description`` so that a ``PreconditionFailure`` is always present.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        reason: str,
        description: str,
        violations: Iterable[tuple[str, str, str]] = (),
        *,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(description, reason=reason, metadata=metadata)
        self.violations = [(str(t), str(s), str(d)) for t, s, d in violations] or [
            (self.reason, "", description)
        ]

    def detail_messages(self) -> list[Message]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(type=t, subject=s, description=d)
                    for t, s, d in self.violations
                ]
            )
        ]


class PermissionDenied(ServiceError):
    """The caller is known but may not do this; names the resource when given."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"

    def __init__(
        self,
        message: str = "permission denied",
        *,
        resource_type: str = "",
        name: str = "",
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.name = name

    def detail_messages(self) -> list[Message]:
        if not (self.resource_type or self.name):
            return []
        return [error_details_pb2.ResourceInfo(resource_type=self.resource_type, resource_name=self.name)]


class Unauthenticated(ServiceError):
    """No or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"

    def __init__(
        self,
        message: str = "authentication required",
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)


class _RetryableError(ServiceError):
    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds

    def detail_messages(self) -> list[Message]:
        if self.retry_after_seconds is None:
            return []
        return [error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after_seconds))]


class Aborted(_RetryableError):
    """A concurrency conflict (e.g. a stale etag); the caller retries the read-modify-write."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"

    def __init__(self, message: str = "aborted by a concurrent change", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class Unavailable(_RetryableError):
    """A dependency or this server is temporarily down; safe to retry (with backoff)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str = "service unavailable", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class ResourceExhausted(_RetryableError):
    """A quota or rate limit is hit: ``RetryInfo`` when to come back, ``QuotaFailure`` what was hit.

    ``violations`` are ``(subject, description)``, e.g. ``("tenants/t1", "100 requests/s")``.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str = "resource exhausted",
        *,
        retry_after_seconds: float | None = None,
        violations: Iterable[tuple[str, str]] = (),
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, reason=reason, metadata=metadata)
        self.violations = [(str(s), str(d)) for s, d in violations]

    def detail_messages(self) -> list[Message]:
        details = super().detail_messages()
        if self.violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.violations
                    ]
                )
            )
        return details


class DeadlineExceeded(ServiceError):
    """The work could not finish in the caller's deadline (e.g. a downstream call ran out)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"

    def __init__(
        self,
        message: str = "deadline exceeded",
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)


# --- server side: the one interceptor -------------------------------------------------------


def _internal_status(context: grpc.aio.ServicerContext) -> grpc.Status:
    metadata: dict[str, str] = {}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:  # lets an operator find the stack trace from the client's report
        metadata["traceId"] = trace.format_trace_id(span_context.trace_id)
    code, message = code_pb2.INTERNAL, INTERNAL_MESSAGE
    # A handler that set a code itself before failing chose that code (and its details) on purpose.
    preset = context.code()
    if isinstance(preset, grpc.StatusCode) and preset is not grpc.StatusCode.OK:
        code = preset.value[0]
        message = context.details() or preset.value[1]
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata=metadata)
    )
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, ServiceError):
        logger.info(
            "%s failed: %s %s",
            method,
            error.code.name,
            error.reason,
            extra={"rpc.method": method, "rpc.grpc.status": error.code.name, "error.reason": error.reason},
        )
        status = error.grpc_status()
    else:
        logger.error(
            "%s failed with an unexpected error", method, exc_info=error, extra={"rpc.method": method}
        )
        status = _internal_status(context)
    # context.abort rather than abort_with_status: the OpenTelemetry context proxy only sees
    # abort(), and that is what records the status code on the server span.
    await context.abort(status.code, status.details, status.trailing_metadata)


Behavior = Callable[..., Any]


def _wrap_unary(behavior: Behavior, method: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(request, context)
            return (await result) if inspect.isawaitable(result) else result
        except grpc.aio.AbortError:
            raise  # the handler aborted with a status of its own choosing
        except Exception as error:
            await _abort(context, error, method)

    return handle


def _wrap_stream(
    behavior: Behavior, method: str
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    # Always an async generator, whatever style the handler uses: grpc dispatches on the wrapper's
    # function type, and outer interceptors (OpenTelemetry) iterate it with ``async for``.
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):  # reader/writer style: the handler calls context.write
                await result
            elif hasattr(result, "__aiter__"):
                if hasattr(result, "aclose"):
                    async with aclosing(result) as stream:  # run the handler's finally blocks promptly
                        async for response in stream:
                            yield response
                else:
                    async for response in result:
                        yield response
            elif result is not None:
                for response in result:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error, method)

    return handle


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ``ServiceError`` to its rich status and anything unexpected to a generic INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method), **kwargs
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method), **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method), **kwargs)
        return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method), **kwargs)


# --- client side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call carried: code, message and the decoded ``google.rpc`` details."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None = None
    error_info: error_details_pb2.ErrorInfo | None = None
    bad_request: error_details_pb2.BadRequest | None = None
    resource_info: error_details_pb2.ResourceInfo | None = None
    precondition_failure: error_details_pb2.PreconditionFailure | None = None
    quota_failure: error_details_pb2.QuotaFailure | None = None
    retry_info: error_details_pb2.RetryInfo | None = None
    #: Detail messages of types not decoded above, still packed.
    other: list[Any] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return self.error_info.reason if self.error_info else None

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        if self.bad_request is None:
            return []
        return [(v.field, v.description) for v in self.bad_request.field_violations]

    @property
    def retry_after_seconds(self) -> float | None:
        if self.retry_info is None or not self.retry_info.HasField("retry_delay"):
            return None
        return self.retry_info.retry_delay.ToTimedelta().total_seconds()


_DETAIL_FIELDS: dict[str, type[Message]] = {
    "error_info": error_details_pb2.ErrorInfo,
    "bad_request": error_details_pb2.BadRequest,
    "resource_info": error_details_pb2.ResourceInfo,
    "precondition_failure": error_details_pb2.PreconditionFailure,
    "quota_failure": error_details_pb2.QuotaFailure,
    "retry_info": error_details_pb2.RetryInfo,
}


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` in the trailers of a failed call (sync or aio), if any."""
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Decode a failed call's status details; works for ``grpc.aio.AioRpcError`` and sync errors."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or ""
    status = rich_status(error)
    if status is None:
        return ErrorDetails(code=code, message=message)
    found: dict[str, Any] = {}
    other: list[Any] = []
    for detail in status.details:
        for name, message_type in _DETAIL_FIELDS.items():
            if name not in found and detail.Is(message_type.DESCRIPTOR):
                decoded = message_type()
                detail.Unpack(decoded)
                found[name] = decoded
                break
        else:
            other.append(detail)
    return ErrorDetails(code=code, message=message, status=status, other=other, **found)


__all__ = [
    "DOMAIN",
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "ErrorDetails",
    "ErrorInterceptor",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_details",
    "rich_status",
    "upper_snake",
]
