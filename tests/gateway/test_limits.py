"""Limits: per-tenant per-method rate limits, message size, concurrent streams, metadata size."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc

from services.runtime import error_details

from .conftest import ALL, gateway_settings, start_stack

GET = pb.GetPackRequest(name="tenants/alpha/packs/p1")


async def drain(call) -> list:  # type: ignore[no-untyped-def]
    pages = []
    while (page := await call.read()) is not grpc.aio.EOF:
        pages.append(page)
    return pages


@pytest.fixture
async def limited(tmp_path, rsa_public_pem, fake_backend):  # type: ignore[no-untyped-def]
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        rate_limits={"GetPack": {"rate": 2, "burst": 3}},
        max_message_bytes=64 * 1024,
        max_streams_per_tenant=1,
    )
    stack = await start_stack(settings, {"alpha": ALL, "beta": ALL})
    yield stack, fake_backend
    await stack.close()


async def test_rate_limit_per_tenant_and_method(limited) -> None:
    stack, backend = limited
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    for _ in range(3):
        await stub.GetPack(GET, metadata=stack.auth("alpha"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(GET, metadata=stack.auth("alpha"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(caught.value)
    assert details.reason == "RATE_LIMITED"
    assert details.retry_after_seconds is not None and 0 < details.retry_after_seconds <= 0.5
    assert details.quota_failure is not None
    assert details.quota_failure.violations[0].subject == "tenants/alpha"
    assert backend.servicer.calls["GetPack"] == 3
    # Another tenant and another method have their own buckets.
    await stub.GetPack(pb.GetPackRequest(name="tenants/beta/packs/p1"), metadata=stack.auth("beta"))
    check = pb.CheckMembershipRequest(parent="tenants/alpha", packs=["tenants/alpha/packs/p1"], user_ids=[1])
    await stub.CheckMembership(check, metadata=stack.auth("platform"))
    # After the advertised delay the tenant may call again.
    await asyncio.sleep(details.retry_after_seconds + 0.05)
    await stub.GetPack(GET, metadata=stack.auth("alpha"))


async def test_oversized_message(limited) -> None:
    stack, backend = limited
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    huge = pb.CheckMembershipRequest(
        parent="tenants/alpha", packs=["tenants/alpha/packs/p1"], user_ids=list(range(2**40, 2**40 + 20_000))
    )
    assert huge.ByteSize() > 64 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CheckMembership(huge, metadata=stack.auth("platform"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert backend.servicer.calls["CheckMembership"] == 0


async def test_huge_metadata_refused(limited) -> None:
    stack, backend = limited
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(GET, metadata=(*stack.auth("alpha"), ("x-padding", "a" * 20_000)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert backend.servicer.calls["GetPack"] == 0


async def test_concurrent_streams_per_tenant(limited) -> None:
    stack, backend = limited
    backend.servicer.delay_seconds = 0.3
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    export = pb.ExportPackRequest(name="tenants/alpha/packs/p1", format=pb.EXPORT_FORMAT_USER_ID)
    first = stub.ExportPack(export, metadata=stack.auth("platform"))
    page = await first.read()  # the first stream is open and holds the tenant's only slot
    assert len(page.user_ids) == 10
    second = stub.ExportPack(export, metadata=stack.auth("platform"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await second.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value).retry_after_seconds == 1.0
    # Another tenant is not affected; after the first stream ends the slot is free again.
    other = stub.ExportPack(
        pb.ExportPackRequest(name="tenants/beta/packs/p1", format=pb.EXPORT_FORMAT_USER_ID),
        metadata=stack.auth("platform-b"),
    )
    assert len([page async for page in other]) == 3
    assert len(await drain(first)) == 2
    third = stub.ExportPack(export, metadata=stack.auth("platform"))
    assert len([page async for page in third]) == 3
    assert not stack.app.gateway.streams._open  # every slot released


async def test_failed_authentications_are_limited_per_address(tmp_path, rsa_public_pem, fake_backend) -> None:
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        auth_failure_limit={"rate": 2, "burst": 3},
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        bad = (("x-api-key", "fc_0123456789abcdef_" + "x" * 43),)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(GET, metadata=bad)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The address is now refused outright, whatever it sends, until its bucket refills.
        for metadata in (bad, stack.auth("alpha")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(GET, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error_details(caught.value)
            assert details.reason == "AUTH_FAILURES" and 0 < details.retry_after_seconds <= 0.5
        await asyncio.sleep(details.retry_after_seconds + 0.05)
        assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42
    finally:
        await stack.close()
