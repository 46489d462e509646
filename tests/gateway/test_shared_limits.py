"""Rate limits over a fleet of gateways: one tenant's limit holds across two replicas (Redis), and
falls back to 1/replicas per replica when Redis is unreachable.

Two real gateway servers share one key store and one Redis; a client spreads its calls over both
as fast as it can for a while and counts what was admitted. A token bucket admits at most ``burst +
rate x elapsed``; the fleet must not exceed that by more than 10% (per-replica buckets would admit
about twice it) nor fall far below it (a fleet that refuses what it may admit is broken too; the
lower bound leaves room for a loaded machine whose client cannot keep every slot busy).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc

from services.gateway.server import create_gateway_server

from .conftest import ALL, Stack, gateway_settings, start_stack

RATE, BURST, SECONDS = 20.0, 20.0, 2.0


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


async def _admitted(stubs: list[pb_grpc.AudienceServiceStub], tenant: str, metadata) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    admitted = 0
    started = time.monotonic()
    last_admission = started
    request = pb.GetPackRequest(name=f"tenants/{tenant}/packs/p1")

    async def worker(index: int) -> None:
        nonlocal admitted, last_admission
        turn = index
        while time.monotonic() - started < SECONDS:
            try:
                await stubs[turn % len(stubs)].GetPack(request, metadata=metadata, timeout=2)
                admitted += 1
                last_admission = time.monotonic()
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                await asyncio.sleep(0.005)
            turn += 1

    await asyncio.gather(*(worker(i) for i in range(8)))
    # Every admitted call reached a bucket before it completed, so the bucket's window ends at the
    # last admission, not when the slowest refused call came back.
    return admitted, last_admission - started


async def _fleet(tmp_path, rsa_public_pem, fake_backend, tenant: str, **overrides) -> list[Stack]:  # type: ignore[no-untyped-def]
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        rate_limits={"GetPack": {"rate": RATE, "burst": BURST}},
        **overrides,
    )
    first = await start_stack(settings, {tenant: ALL})
    server, port, app = await create_gateway_server(settings)  # a second replica, same key store
    second = Stack(server, port, app, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), dict(first.keys))
    return [first, second]


@pytest.mark.parametrize(
    "mode", ["shared", "redis-down", "per-replica"], ids=["shared", "redis-down", "per-replica"]
)
async def test_a_tenants_limit_holds_across_two_gateways(
    tmp_path, rsa_public_pem, fake_backend, mode: str
) -> None:
    if mode == "shared" and not _redis_up():
        pytest.skip("Redis is not running on 127.0.0.1:6379 (scripts/services.sh starts it)")
    tenant = f"t{uuid.uuid4().hex[:8]}"  # fresh buckets in Redis
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    overrides = {
        # A loaded test machine can keep Redis from answering within the production 50 ms; each such
        # blip would hand both replicas a fresh local burst and blur what this test measures.
        "shared": {
            "redis_url": "redis://127.0.0.1:6379/0",
            "gateway_replicas": 2,
            "redis_timeout_seconds": 1.0,
        },
        "redis-down": {"redis_url": f"redis://127.0.0.1:{closed}/0", "gateway_replicas": 2},
        "per-replica": {},
    }[mode]
    stacks = await _fleet(tmp_path, rsa_public_pem, fake_backend, tenant, **overrides)
    try:
        stubs = [pb_grpc.AudienceServiceStub(stack.channel) for stack in stacks]
        admitted, elapsed = await _admitted(stubs, tenant, stacks[0].auth(tenant))
        expected = BURST + RATE * elapsed
        if mode == "per-replica":  # the control: each replica its own full limit
            assert admitted > 1.6 * expected, (admitted, expected)
        else:
            assert 0.75 * expected <= admitted <= 1.1 * expected, (admitted, expected)
        if mode == "redis-down":
            assert all(stack.app.gateway.buckets.fallbacks > 0 for stack in stacks)
        if mode == "shared":
            assert all(stack.app.gateway.buckets.fallbacks == 0 for stack in stacks)
    finally:
        for stack in stacks:
            await stack.close()
