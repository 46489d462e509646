"""Keepalive: clients pinging at the rate the server permits keep their connection (no GOAWAY).

The runtime's clients ping idle connections every 30 s and its servers accept pings down to every
20 s. gRPC core ignores option keys it does not know, so a misspelt key silently leaves the 5-minute
default and the server answers "too_many_pings" with GOAWAY. Here the same option set is used with
short intervals (a client pinging every 300 ms, a server permitting 200 ms) so an idle channel
stays READY; a server permitting only 5 s (the control) drops it, which shows the test can fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio

from services.runtime.server import keepalive_options, server_options

from .probe import SERVICE, Probe

CLIENT_PING_MS = 300


async def _idle_channel_survives(min_client_ping_interval_ms: int, idle_seconds: float = 8.0) -> bool:
    options: list[tuple[str, Any]] = keepalive_options(min_client_ping_interval_ms)
    server = grpc.aio.server(options=options)
    Probe().register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = [
        ("grpc.keepalive_time_ms", CLIENT_PING_MS),
        ("grpc.keepalive_timeout_ms", 2_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client) as channel:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"hi")
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            loop = asyncio.get_running_loop()
            deadline = loop.time() + idle_seconds
            while loop.time() < deadline:
                state = channel.get_state()
                if state is not grpc.ChannelConnectivity.READY:
                    return False  # GOAWAY: the channel left READY while idle
                try:
                    await asyncio.wait_for(channel.wait_for_state_change(state), deadline - loop.time())
                except TimeoutError:
                    break
            return channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await server.stop(None)


def test_server_options_use_grpc_cores_key() -> None:
    from services.runtime import BaseServiceSettings

    keys = dict(server_options(BaseServiceSettings()))
    assert keys["grpc.http2.min_ping_interval_without_data_ms"] == 20_000
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" not in keys  # the old, ignored key


async def test_idle_channel_pinging_within_the_permitted_rate_keeps_its_connection() -> None:
    assert await _idle_channel_survives(min_client_ping_interval_ms=200)


async def test_control_a_stricter_server_drops_the_same_client() -> None:
    assert not await _idle_channel_survives(min_client_ping_interval_ms=5_000)
