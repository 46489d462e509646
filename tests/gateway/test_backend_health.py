"""The gateway's health names what is down: a proxied service is NOT_SERVING while its backend does
not answer SERVING, and SERVING again once it does; the gateway itself stays SERVING.

The gateway runs as a process (``python -m services.gateway``, backends checked every 0.3 s); the
audience backend is a real server started and stopped on the port the gateway was given.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.audience.config import AudienceSettings
from services.audience.server import create_audience_server
from services.runtime import load_settings
from tests.fixtures.processes import ROOT, free_ports, service_env, wait_serving

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
AUDIENCE = "flashcrowd.audience.v1.AudienceService"
RETARGET = "flashcrowd.retarget.v1.RetargetService"
GATEWAY = "flashcrowd.gateway.v1.GatewayService"


async def _until(stub: health_pb2_grpc.HealthStub, service: str, status: int, seconds: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        if reply.status == status:
            return
        assert loop.time() < deadline, f"{service} still {reply.status} after {seconds} s"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_health_follows_each_backend(tmp_path: Path) -> None:
    gateway_port, http_port, audience_port, retarget_port, monitor_port = free_ports(5)
    env = service_env(
        0.5,
        FLASHCROWD_PORT=str(gateway_port), FLASHCROWD_HTTP_PORT=str(http_port),
        FLASHCROWD_AUDIENCE_TARGET=f"127.0.0.1:{audience_port}",
        FLASHCROWD_RETARGET_TARGET=f"127.0.0.1:{retarget_port}",
        FLASHCROWD_SALE_MONITOR_TARGET=f"127.0.0.1:{monitor_port}",
        FLASHCROWD_KEYSTORE_PATH=str(tmp_path / "keys.sqlite3"),
        FLASHCROWD_BACKEND_HEALTH_INTERVAL_SECONDS="0.3",
    )  # fmt: skip
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        target = f"127.0.0.1:{gateway_port}"
        await wait_serving(target, proc, 60)
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # Nothing listens behind it yet: the proxied services say so, the gateway does not.
            await _until(health, AUDIENCE, NOT_SERVING)
            await _until(health, RETARGET, NOT_SERVING)
            await _until(health, GATEWAY, SERVING, seconds=1)
            await _until(health, "", SERVING, seconds=1)
            settings = load_settings(
                AudienceSettings, store_url=str(tmp_path / "store"), port=audience_port,
                grace_seconds=0.2, log_json=False,
            )  # fmt: skip
            server, _, app = await create_audience_server(settings)
            try:
                await _until(health, AUDIENCE, SERVING)
                await _until(health, RETARGET, NOT_SERVING, seconds=1)
            finally:
                await server.stop(0.2)
                await app.close()
            await _until(health, AUDIENCE, NOT_SERVING)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
