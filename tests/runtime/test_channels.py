"""Service-to-service channels: retries only where the caller declared the method idempotent."""

from __future__ import annotations

import json

import grpc
import grpc.aio
import pytest

from services.runtime import BaseServiceSettings, channel_options, make_channel, retry_service_config

from .conftest import ProbeServer
from .probe import SERVICE


async def test_idempotent_method_is_retried(probe_server: ProbeServer, settings: BaseServiceSettings) -> None:
    channel = make_channel(probe_server.target, settings, idempotent_methods=[f"{SERVICE}/Flaky"])
    try:
        # the server refuses twice with UNAVAILABLE; the channel's retry policy hides that
        assert await channel.unary_unary(f"/{SERVICE}/Flaky")(b"retried", timeout=5) == b"3"
    finally:
        await channel.close()


async def test_other_methods_are_not_retried(
    probe_server: ProbeServer, settings: BaseServiceSettings
) -> None:
    channel = make_channel(probe_server.target, settings)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/Flaky")(b"not-retried", timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert probe_server.probe.attempts["not-retried"] == 1
    finally:
        await channel.close()


def test_retry_service_config_shape(settings: BaseServiceSettings) -> None:
    config = retry_service_config(["flashcrowd.audience.v1.AudienceService/GetPack", "pkg.Other"])
    [method_config] = config["methodConfig"]
    assert method_config["name"] == [
        {"service": "flashcrowd.audience.v1.AudienceService", "method": "GetPack"},
        {"service": "pkg.Other"},
    ]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    options = dict(channel_options(settings, service_config=config))
    assert json.loads(options["grpc.service_config"]) == config
    assert options["grpc.max_receive_message_length"] == settings.max_message_bytes
