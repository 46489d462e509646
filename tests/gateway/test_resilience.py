"""Deadlines, retries (idempotent methods only, within a budget) and failing fast when a backend is down."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc

from services.runtime import error_details

from .conftest import ALL, gateway_settings, start_stack
from .fakes import FakeBackend

GET = pb.GetPackRequest(name="tenants/alpha/packs/p1")
CREATE = pb.CreatePackRequest(parent="tenants/alpha", pack_id="p2")


async def test_deadline_propagated_with_margin(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    await stub.GetPack(GET, metadata=stack.auth("alpha"), timeout=2.0)
    remaining = backend.servicer.seen[-1].time_remaining
    margin = stack.app.gateway.settings.deadline_margin_seconds
    # grpc-timeout is encoded with limited precision (rounded up), hence the small slack.
    assert remaining is not None and 1.0 < remaining <= 2.0 - margin + 0.02
    # Without a caller deadline the backend still gets one: the default.
    await stub.GetPack(GET, metadata=stack.auth("alpha"))
    remaining = backend.servicer.seen[-1].time_remaining
    default = stack.app.gateway.settings.default_deadline_seconds
    assert remaining is not None and default - 2 < remaining <= default + 0.2


async def test_deadline_shorter_than_margin(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(GET, metadata=stack.auth("alpha"), timeout=0.03)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.servicer.calls["GetPack"] == 0


async def test_slow_backend_hits_the_callers_deadline(fake_stack) -> None:
    stack, backend = fake_stack
    backend.servicer.delay_seconds = 1.0
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(GET, metadata=stack.auth("alpha"), timeout=0.4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.8


async def test_retries_only_idempotent_methods(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    backend.servicer.fail_next["GetPack"] = 2
    assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42
    assert backend.servicer.calls["GetPack"] == 3  # two failures, then success
    backend.servicer.fail_next["CreatePack"] = 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreatePack(CREATE, metadata=stack.auth("alpha"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(caught.value).message == "flaky backend"  # the backend's own status, relayed
    assert backend.servicer.calls["CreatePack"] == 1  # never retried
    # Attempts are capped.
    backend.servicer.fail_next["GetPack"] = 10
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPack(GET, metadata=stack.auth("alpha"))
    assert backend.servicer.calls["GetPack"] == 3 + stack.app.gateway.settings.retry_max_attempts


async def test_retry_budget_limits_retries(tmp_path, rsa_public_pem, fake_backend) -> None:
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        retry_budget_ratio=0.1,
        retry_budget_min_per_second=0.0,
        retry_max_attempts=5,
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        # 20 successful calls deposit 20 * 0.1 = 2 retries.
        for _ in range(20):
            await stub.GetPack(GET, metadata=stack.auth("alpha"))
        fake_backend.servicer.fail_next["GetPack"] = 1000
        before = fake_backend.servicer.calls["GetPack"]
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetPack(GET, metadata=stack.auth("alpha"))
        attempts = fake_backend.servicer.calls["GetPack"] - before
        # 5 calls + the deposited 2 retries + 5 * 0.1 deposited on the way (at most 2 more).
        assert 5 + 2 <= attempts <= 5 + 3, attempts
        assert stack.app.gateway.retry_budget.refused > 0
    finally:
        await stack.close()


async def test_backend_down_fails_fast_and_recovers(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    await stub.GetPack(GET, metadata=stack.auth("alpha"))
    await backend.stop()
    attempts = stack.app.gateway.attempts
    before_get = attempts.get("/flashcrowd.audience.v1.AudienceService/GetPack", 0)
    before_create = attempts.get("/flashcrowd.audience.v1.AudienceService/CreatePack", 0)
    for request, method in ((GET, stub.GetPack), (CREATE, stub.CreatePack)):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request, metadata=stack.auth("alpha"), timeout=10)
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        details = error_details(caught.value)
        assert details.reason == "BACKEND_UNAVAILABLE"
        assert "127.0.0.1" not in details.message  # backend addresses are not leaked
        assert details.retry_after_seconds == 1.0
        assert elapsed < 1.0, elapsed
    # The idempotent read was retried, the create was not.
    assert attempts["/flashcrowd.audience.v1.AudienceService/GetPack"] - before_get == 3
    assert attempts["/flashcrowd.audience.v1.AudienceService/CreatePack"] - before_create == 1
    # Revived on the same port: the gateway finds it again within the capped reconnect backoff.
    await backend.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert (await stub.GetPack(GET, metadata=stack.auth("alpha"), timeout=2)).size == 42
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, "backend not found again"
            await asyncio.sleep(0.1)


async def test_silent_backend_is_not_a_hang(tmp_path, rsa_public_pem) -> None:
    """A port that accepts TCP but never speaks HTTP/2: UNAVAILABLE/DEADLINE within the connect timeout."""
    sockets: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sockets.append(writer)  # hold the connection open, say nothing

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = gateway_settings(
        tmp_path, rsa_public_pem, audience_target=f"127.0.0.1:{port}", connect_timeout_seconds=0.3
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreatePack(CREATE, metadata=stack.auth("alpha"))
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - started < 2.5
    finally:
        await stack.close()
        for writer in sockets:
            writer.close()
        silent.close()


async def test_backend_restart_as_real_server(tmp_path, rsa_public_pem) -> None:
    """Kill/restart with a flaky backend: every idempotent call eventually lands, non-idempotent ones once."""
    backend = FakeBackend()
    await backend.start()
    settings = gateway_settings(tmp_path, rsa_public_pem, audience_target=backend.target)
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        backend.servicer.fail_next["GetPack"] = 1
        backend.servicer.fail_next["CheckMembership"] = 2
        check = pb.CheckMembershipRequest(
            parent="tenants/alpha", packs=["tenants/alpha/packs/p1"], user_ids=[2]
        )
        results = await asyncio.gather(
            stub.GetPack(GET, metadata=stack.auth("alpha")),
            stub.CheckMembership(check, metadata=stack.auth("platform")),
        )
        assert results[0].size == 42 and list(results[1].results[0].members) == [True]
        assert backend.servicer.calls == {"GetPack": 2, "CheckMembership": 3}
    finally:
        await stack.close()
        await backend.stop()
