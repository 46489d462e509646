"""HTTP/JSON side of the gateway (aiohttp): transcoded routes, ``/openapi.json`` and ``/healthz``.

Calls go through ``Gateway.unary`` like gRPC ones, so authentication (``Authorization: Bearer`` or
``X-Api-Key``), scopes, tenant checks, limits, deadlines (``X-Server-Timeout: <seconds>``) and
retries are the same.

Nothing of a body is read before the call is admitted: the route, the credential headers, the
failed-authentication and rate limits are checked first, and only then is the body read (refused
with 413 past ``http_max_body_bytes``, by its Content-Length before reading when it has one) and
parsed. An anonymous or unauthenticated request is answered 401 with its body unread (the
connection is then closed rather than kept alive, so the unread body is never parsed as a next
request). The client address for the limits and the audit log comes from ``client_address.py``
(the peer, or trusted proxies' ``X-Forwarded-For`` / ``Forwarded``).

Errors are Google's JSON error shape::

    {"error": {"code": 404, "status": "NOT_FOUND", "message": "...", "details": [{"@type": ...}]}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from services.gateway.config import GatewaySettings
from services.gateway.openapi import openapi_document
from services.gateway.proxy import CALLER_HEADERS, BackendError, Gateway, HeaderLookup
from services.gateway.transcoding import Route, all_routes, build_request
from services.runtime import InvalidArgument, ResourceExhausted, ServiceError, Unauthenticated

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("flashcrowd.gateway.http")

#: gRPC code -> HTTP status (google.rpc.Code's documented mapping).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_body(status: status_pb2.Status) -> dict[str, Any]:
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    details = []
    for detail in status.details:
        try:
            details.append(json_format.MessageToDict(detail))
        except (TypeError, KeyError, json_format.Error):  # type not in the pool: keep it opaque
            details.append({"@type": detail.type_url})
    return {
        "error": {
            "code": HTTP_STATUS.get(code, 500),
            "status": code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else code.name,
            "message": status.message,
            "details": details,
        }
    }


def error_response(status: status_pb2.Status) -> web.Response:
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    headers: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds = info.retry_delay.seconds + (1 if info.retry_delay.nanos else 0)
            headers["Retry-After"] = str(max(seconds, 1))
    if code is grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="flashcrowd"'
    return web.json_response(error_body(status), status=HTTP_STATUS.get(code, 500), headers=headers)


class BodyTooLarge(ResourceExhausted):
    """A request body over ``http_max_body_bytes``: RESOURCE_EXHAUSTED, answered with HTTP 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body larger than {limit} bytes",
            violations=[("body", f"at most {limit} bytes")],
            reason="BODY_TOO_LARGE",
        )


def _status_of(error: Exception) -> status_pb2.Status:
    if isinstance(error, ServiceError):
        return error.to_status()
    if isinstance(error, BackendError):
        if error.status_details:
            try:
                return status_pb2.Status.FromString(error.status_details)
            except Exception:  # a malformed detail blob: fall back to code and message
                pass
        return status_pb2.Status(code=error.code.value[0], message=error.details)
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")


def _header_lookup(request: web.Request) -> HeaderLookup:
    found: dict[str, str] = {}
    for name in CALLER_HEADERS:
        values = request.headers.getall(name, [])
        if len(values) > 1:
            raise Unauthenticated(f"{name} sent more than once", reason="AMBIGUOUS_CREDENTIALS")
        if values:
            found[name] = values[0]
    return found.get


def _timeout(request: web.Request) -> float | None:
    raw = request.headers.get("x-server-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument("X-Server-Timeout", "must be a number of seconds") from None
    if not 0 < value < 86_400:
        raise InvalidArgument("X-Server-Timeout", "must be between 0 and 86400 seconds")
    return value


class HttpFrontend:
    """The aiohttp application and its runner."""

    def __init__(self, gateway: Gateway, settings: GatewaySettings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.routes = all_routes()
        self._openapi: bytes | None = None
        self.app = web.Application(client_max_size=settings.http_body_limit, middlewares=[self._errors])
        self.app.router.add_get("/openapi.json", self.openapi)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self.runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=self.settings.grace_seconds
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server = site._server  # the bound asyncio server: port 0 resolves here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status >= 400:
                code = {
                    404: code_pb2.NOT_FOUND,
                    405: code_pb2.UNIMPLEMENTED,
                    413: code_pb2.RESOURCE_EXHAUSTED,
                }.get(error.status, code_pb2.INVALID_ARGUMENT)
                message = error.reason or "bad request"
                if isinstance(error, web.HTTPMethodNotAllowed):
                    allowed = ", ".join(sorted(error.allowed_methods))
                    message = f"{error.method} is not allowed here; allowed: {allowed}"
                response = error_response(status_pb2.Status(code=code, message=message))
                response.set_status(error.status)
                if "Allow" in error.headers:  # RFC 9110: a 405 names the methods the resource has
                    response.headers["Allow"] = error.headers["Allow"]
                return response
            raise
        except (ServiceError, BackendError) as error:
            return error_response(_status_of(error))
        except Exception:
            logger.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(status_pb2.Status(code=code_pb2.INTERNAL, message="internal error"))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = json.dumps(openapi_document(), indent=2).encode()
        return web.Response(body=self._openapi, content_type="application/json")

    def _route(self, request: web.Request) -> tuple[Route, dict[str, str]]:
        raw_path = request.rel_url.raw_path
        allowed: list[str] = []
        for route in self.routes:
            values = route.match(raw_path)
            if values is None:
                continue
            if route.http_method == request.method:
                return route, values
            allowed.append(route.http_method)
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, sorted(set(allowed)))
        raise web.HTTPNotFound(reason=f"no route for {request.method} {request.path}")

    async def dispatch(self, request: web.Request) -> web.Response:
        route, path_values = self._route(request)
        info = route.info
        if info.streaming:
            raise web.HTTPNotFound(reason="streaming methods are served over gRPC only")
        context = propagate.extract(dict(request.headers))
        with tracer.start_as_current_span(
            f"{route.http_method} {route.template}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route.template,
                "rpc.service": info.service,
                "rpc.method": info.name,
            },
        ) as span:
            response = await self._call(request, route, path_values)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(StatusCode.ERROR)
            return response

    def client_address(self, request: web.Request) -> str:
        header = self.gateway.client_addresses.header
        return self.gateway.client_addresses.resolve(request.remote or "", request.headers.getall(header, []))

    async def _call(self, request: web.Request, route: Route, path_values: dict[str, str]) -> web.Response:
        body_read = False

        async def read_message() -> Message:
            """The request, built once the call is admitted (body size checked, then read, then parsed)."""
            nonlocal body_read
            body: Any = None
            if request.body_exists:
                limit = self.settings.http_body_limit
                length = request.content_length
                if length is not None and length > limit:
                    raise BodyTooLarge(limit)
                try:
                    raw = await request.read()  # aiohttp enforces client_max_size while reading
                except web.HTTPRequestEntityTooLarge:
                    raise BodyTooLarge(limit) from None
                body_read = True
                if raw.strip():
                    try:
                        body = json.loads(raw)
                    except (ValueError, RecursionError):
                        raise InvalidArgument("body", "not valid JSON") from None
            query = {name: request.query.getall(name) for name in set(request.query.keys())}
            return build_request(route, path_values, query, body)

        try:
            header = _header_lookup(request)
            timeout = _timeout(request)
            raw_response = await self.gateway.unary(
                route.info,
                b"",
                header,
                timeout,
                read_message=read_message,
                transport="http",
                client=self.client_address(request),
                resource_hint=tuple(path_values.values()),
            )
            reply = route.info.response_class.FromString(raw_response)
            return web.json_response(json_format.MessageToDict(reply))
        except (ServiceError, BackendError) as error:
            response = error_response(_status_of(error))
            if isinstance(error, BodyTooLarge):
                response.set_status(413)
            if request.body_exists and not body_read:
                response.force_close()  # the unread body is discarded, never taken for a next request
            return response


__all__ = ["HTTP_STATUS", "HttpFrontend", "error_body"]
