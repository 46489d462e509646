"""Client channels for service-to-service calls: keepalive, message limits, tracing, retries.

Retries are opt-in per method through the gRPC service config, and only for methods the caller
names as idempotent: a retried ``LaunchCampaign`` could issue coupons twice, a retried ``GetPack``
cannot do harm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from services.runtime.config import BaseServiceSettings
from services.runtime.telemetry import instrumented_channel

# Ping an idle connection every 30 s so a dead peer (pod gone without FIN) is noticed in ~40 s
# rather than at the next call; the server options in server.py permit this rate.
CLIENT_KEEPALIVE_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


def retry_service_config(
    idempotent_methods: Iterable[str],
    *,
    max_attempts: int = 4,
    initial_backoff_seconds: float = 0.1,
    max_backoff_seconds: float = 2.0,
    backoff_multiplier: float = 2.0,
    retryable_codes: Sequence[str] = ("UNAVAILABLE",),
    load_balancing: str | None = "round_robin",
) -> dict[str, Any]:
    """A gRPC service config retrying the given methods on ``retryable_codes``.

    Methods are ``"pkg.Service/Method"`` or ``"pkg.Service"`` (every method of it). Only UNAVAILABLE
    is retried by default: the request never reached a handler, or the handler said "try again".
    ``round_robin`` spreads calls over every address a (headless) Kubernetes service resolves to.
    """
    names: list[dict[str, str]] = []
    for entry in idempotent_methods:
        service, _, method = entry.lstrip("/").partition("/")
        names.append({"service": service, "method": method} if method else {"service": service})
    config: dict[str, Any] = {}
    if names:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{initial_backoff_seconds}s",
                    "maxBackoff": f"{max_backoff_seconds}s",
                    "backoffMultiplier": backoff_multiplier,
                    "retryableStatusCodes": list(retryable_codes),
                },
            }
        ]
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return config


def channel_options(
    settings: BaseServiceSettings, *, service_config: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """Channel options matching the server's limits; ``service_config`` goes in as JSON."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1),
        *CLIENT_KEEPALIVE_OPTIONS,
    ]
    if service_config:
        options.append(("grpc.service_config", json.dumps(service_config)))
    return options


def make_channel(
    target: str,
    settings: BaseServiceSettings,
    *,
    idempotent_methods: Iterable[str] = (),
    service_config: dict[str, Any] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A traced aio channel to another flashcrowd service.

    ``idempotent_methods`` builds a retry service config (see ``retry_service_config``); pass a full
    ``service_config`` instead for anything else. Close the channel (``await channel.close()``).
    """
    config = service_config if service_config is not None else retry_service_config(idempotent_methods)
    return instrumented_channel(
        target,
        options=channel_options(settings, service_config=config),
        interceptors=interceptors,
        credentials=credentials,
    )


__all__ = ["CLIENT_KEEPALIVE_OPTIONS", "channel_options", "make_channel", "retry_service_config"]
