"""Server bootstrap shared by every service: factory, health, reflection, graceful shutdown.

``create_server`` builds and starts a ``grpc.aio`` server (tests call it directly on port 0);
``run_service`` is the whole ``__main__`` of a service: settings, logging, telemetry, serve until
SIGTERM/SIGINT, then health NOT_SERVING, ``server.stop(grace)``, cleanup, telemetry flush.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.config import BaseServiceSettings, ConfigError, load_settings
from services.runtime.errors import ErrorInterceptor
from services.runtime.logs import setup_logging
from services.runtime.telemetry import Telemetry, setup_telemetry, tracing_server_interceptor

logger = logging.getLogger(__name__)

#: The library's asyncio health servicer (``Watch`` included); never hand-write one.
HealthServicer: TypeAlias = grpc_health.aio.HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Server pings idle clients every 60 s and drops them after 20 s without an answer; it accepts
# client pings down to every 20 s (channels.py pings every 30 s) instead of the 5-minute default
# that would make it answer GOAWAY "too_many_pings". gRPC core's key is
# ``grpc.http2.min_ping_interval_without_data_ms`` (a misspelt key is silently ignored).
MIN_CLIENT_PING_INTERVAL_MS = 20_000


def keepalive_options(
    min_client_ping_interval_ms: int = MIN_CLIENT_PING_INTERVAL_MS,
) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
    ]


SERVER_KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = tuple(keepalive_options())


def server_options(settings: BaseServiceSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Without this a second server on a taken port shares it silently instead of failing.
        ("grpc.so_reuseport", 0),
        # gRPC core cancels calls beyond ~1,000 queued before a handler picks them up (hard limit
        # 3,000): a flash-sale burst of claims would see CANCELLED instead of an answer.
        ("grpc.server.max_pending_requests", settings.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_requests),
        *SERVER_KEEPALIVE_OPTIONS,
    ]


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # bare IPv6 literal
    return f"{host}:{port}"


def _warn_unknown_services(service_names: Sequence[str]) -> None:
    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            # Reflection can list the name but not describe it: usually a typo or a _pb2 not imported.
            logger.warning("service %s is not in the descriptor pool; reflection cannot describe it", name)


async def create_server(
    settings: BaseServiceSettings,
    *,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    health: HealthServicer | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a server; return it with the bound port (port 0 picks a free one).

    ``service_names`` are full proto names (``flashcrowd.audience.v1.AudienceService``): each gets a
    SERVING health status (plus the overall ``""``) and is listed by reflection. Interceptors run in
    the order tracing, error mapping, then ``interceptors``, so errors raised inside the given ones
    are mapped too and every status lands on the server span. Pass ``health`` to flip statuses
    yourself (``serve_forever`` / ``graceful_stop`` need it).
    """
    server = grpc.aio.server(
        interceptors=[tracing_server_interceptor(), ErrorInterceptor(), *interceptors],
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    register(server)
    health_servicer = health if health is not None else HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _warn_unknown_services(service_names)
    reflection.enable_server_reflection(
        [*service_names, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = _address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpc raises a bare RuntimeError; say which address
        raise OSError(f"cannot bind {address}: {error}") from error
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, SERVING)
    return server, port


async def graceful_stop(server: grpc.aio.Server, health: HealthServicer | None, grace_seconds: float) -> None:
    """Health NOT_SERVING first (probes and Watch streams see it), then let in-flight RPCs finish."""
    if health is not None:
        await health.enter_graceful_shutdown()
    await server.stop(grace_seconds)


StopCallback = Callable[[], Awaitable[None]]
#: Awaited once the server listens (start workers, followers, background loops).
StartCallback = Callable[[], Awaitable[None]]


async def _run_callbacks(callbacks: Sequence[StopCallback]) -> None:
    for callback in callbacks:
        try:
            await callback()
        except Exception:  # one failing cleanup must not skip the others
            logger.exception("shutdown callback %r failed", callback)


async def start_callbacks(callbacks: Sequence[StartCallback]) -> None:
    """Run a definition's ``on_start`` callbacks in order (a failure stops the start)."""
    for callback in callbacks:
        await callback()


async def serve_forever(
    server: grpc.aio.Server,
    health: HealthServicer | None,
    settings: BaseServiceSettings,
    *,
    telemetry: Telemetry | None = None,
    on_stop: Sequence[StopCallback] = (),
    on_stopping: Sequence[StopCallback] = (),
) -> None:
    """Serve until SIGTERM/SIGINT (or the server stops), then stop gracefully and return.

    ``on_stopping`` callbacks run first, as soon as the stop is requested (cancel background work so
    that it ends within the same grace as the in-flight RPCs: one grace wait, not two); after the
    server stopped, ``on_stop`` callbacks run (close pools, flush stores) and telemetry is flushed
    last so that spans from the shutdown itself are exported.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no Unix signals
            pass
    waiters = [
        asyncio.ensure_future(stop_requested.wait()),
        # Shielded: grpc awaits its shutdown future unshielded here, and cancelling this waiter
        # would otherwise cancel that future and make server.stop() raise CancelledError.
        asyncio.shield(server.wait_for_termination()),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        logger.info("stopping", extra={"grace_seconds": settings.grace_seconds})
    finally:
        # Default handlers again: a second SIGTERM/SIGINT now ends the process without waiting.
        for sig in installed:
            loop.remove_signal_handler(sig)
        for waiter in waiters:
            waiter.cancel()
        try:
            await _run_callbacks(on_stopping)
            await graceful_stop(server, health, settings.grace_seconds)
            await _run_callbacks(on_stop)
            logger.info("stopped")
        finally:
            if telemetry is not None:
                telemetry.shutdown()


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service contributes to the shared server: its servicers and cleanup."""

    #: Full proto service names, for health statuses and reflection.
    names: Sequence[str]
    #: Adds the servicers, e.g. ``lambda s: pb2_grpc.add_AudienceServiceServicer_to_server(impl, s)``.
    register: Callable[[grpc.aio.Server], None]
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    #: Awaited in order once the server is bound (background tasks, child processes, followers):
    #: ``build`` only wires, so a process that fails to bind starts nothing.
    on_start: Sequence[StartCallback] = ()
    #: Awaited after the server stopped (close connection pools, channels).
    on_stop: Sequence[StopCallback] = ()
    #: Awaited when a stop is requested, before the server's grace starts (cancel background jobs
    #: so they end within that same grace).
    on_stopping: Sequence[StopCallback] = ()
    #: Polled every ``readiness_interval_seconds`` while serving: False (or an error) turns every
    #: health status NOT_SERVING until it answers True again (e.g. the object store is unreachable).
    readiness: Callable[[], Awaitable[bool]] | None = None
    #: Polled likewise: ``{service name: ready}`` for services whose readiness differs from the
    #: process's (the gateway: a service is NOT_SERVING while the backend behind it is down).
    service_readiness: Callable[[], Awaitable[Mapping[str, bool]]] | None = None
    readiness_interval_seconds: float = 5.0


async def watch_readiness(definition: ServiceDefinition, health: HealthServicer) -> None:
    """Keep health statuses in step with ``definition.readiness`` (every status) and
    ``definition.service_readiness`` (the statuses it names); runs until cancelled."""
    serving = True
    services: dict[str, bool] = {}  # the last status set per named service (absent: SERVING)
    interval = definition.readiness_interval_seconds
    while True:
        await asyncio.sleep(interval)
        ready = True
        if definition.readiness is not None:
            try:
                ready = await asyncio.wait_for(definition.readiness(), interval)
            except Exception:  # a probe that fails or hangs means "not ready"
                ready = False
        if ready != serving:
            serving = ready
            services.clear()
            logger.warning("dependency %s: health %s", "back" if ready else "unreachable",
                           "SERVING" if ready else "NOT_SERVING")  # fmt: skip
            for name in ("", *definition.names):
                await health.set(name, SERVING if ready else NOT_SERVING)
        if not ready or definition.service_readiness is None:
            continue
        try:
            statuses = await asyncio.wait_for(definition.service_readiness(), interval)
        except Exception:
            logger.warning("per-service readiness probe failed", exc_info=True)
            continue
        for name, ok in statuses.items():
            if services.get(name, True) != ok:
                logger.warning("%s: health %s", name, "SERVING" if ok else "NOT_SERVING")
                await health.set(name, SERVING if ok else NOT_SERVING)
            services[name] = ok


S = TypeVar("S", bound=BaseServiceSettings)
Build = Callable[[S], "ServiceDefinition | Awaitable[ServiceDefinition]"]


async def _run(settings: S, build: Build[S], telemetry: Telemetry) -> None:
    definition: ServiceDefinition | None = None
    try:
        # build runs inside the event loop so that it may open asyncio resources (pools, channels).
        built = build(settings)
        definition = await built if inspect.isawaitable(built) else built
        health = HealthServicer()
        server, port = await create_server(
            settings,
            service_names=definition.names,
            register=definition.register,
            interceptors=definition.interceptors,
            health=health,
        )
        await start_callbacks(definition.on_start)
    except BaseException:
        if definition is not None:  # built but could not serve: still release what build opened
            await _run_callbacks(definition.on_stop)
        telemetry.shutdown()
        raise
    logger.info(
        "serving",
        extra={"host": settings.host, "port": port, "services": list(definition.names)},
    )
    watched = definition.readiness is not None or definition.service_readiness is not None
    watcher = asyncio.ensure_future(watch_readiness(definition, health)) if watched else None
    try:
        await serve_forever(
            server,
            health,
            settings,
            telemetry=telemetry,
            on_stop=definition.on_stop,
            on_stopping=definition.on_stopping,
        )
    finally:
        if watcher is not None:
            watcher.cancel()


def run_service(service_name: str, settings_cls: type[S], build: Build[S]) -> None:
    """The body of a service's ``__main__``: returns after a graceful stop (exit status 0).

    A bad ``FLASHCROWD_*`` variable exits with status 2 and one line on stderr naming it; a failure
    while starting (bind, build) is logged with its stack trace and exits with status 1.
    """
    try:
        settings = load_settings(settings_cls)
    except ConfigError as error:
        print(f"{service_name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    telemetry = setup_telemetry(service_name)
    # OTEL_SERVICE_NAME may have renamed the service: logs and traces must agree on the name.
    setup_logging(settings, telemetry.service_name)
    try:
        asyncio.run(_run(settings, build, telemetry))
    except Exception:
        logger.exception("%s failed", service_name)
        raise SystemExit(1) from None


__all__ = [
    "NOT_SERVING",
    "SERVING",
    "HealthServicer",
    "ServiceDefinition",
    "create_server",
    "graceful_stop",
    "run_service",
    "serve_forever",
    "server_options",
]
