"""Limits: per-tenant per-method rate limits, message size, concurrent streams, metadata size, failed
authentications (per client address and credential, never refusing a valid credential)."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp
import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from services.runtime import error_details

from .conftest import ALL, BOOTSTRAP, gateway_settings, make_token, start_stack

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


async def test_a_stale_key_never_locks_out_valid_keys_behind_the_same_address(
    tmp_path, rsa_public_pem, fake_backend
) -> None:
    """One client behind a NAT keeps retrying a revoked key: that key is refused, then limited
    (RESOURCE_EXHAUSTED, AUTH_FAILURES); every valid key from the same address is still admitted."""
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        auth_failure_limit={"rate": 2, "burst": 3},
        auth_failure_address_limit={"rate": 2, "burst": 5},
    )
    stack = await start_stack(settings, {"alpha": ALL, "beta": ALL})
    try:
        admin = gw_grpc.GatewayServiceStub(stack.channel)
        boot = (("x-api-key", BOOTSTRAP),)
        stale = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"]), metadata=boot
        )
        await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=stale.api_key.name), metadata=boot)
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        stale_md = (("x-api-key", stale.secret),)
        codes = []
        for _ in range(8):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(GET, metadata=stale_md)
            codes.append(caught.value.code())
        assert codes[:3] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(caught.value)
        assert details.reason == "AUTH_FAILURES" and 0 < details.retry_after_seconds <= 1.0
        # The address's coarse ceiling is exhausted too: failures of other credentials are limited ...
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetPack(GET, metadata=(("x-api-key", "fc_0123456789abcdef_" + "x" * 43),))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ... but valid keys, tokens and the bootstrap key from the same address are admitted.
        for _ in range(5):
            assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42
        beta = pb.GetPackRequest(name="tenants/beta/packs/p1")
        assert (await stub.GetPack(beta, metadata=stack.auth("beta"))).size == 42
        assert (
            await stub.GetPack(GET, metadata=(("authorization", f"Bearer {make_token('alpha', ALL)}"),))
        ).size
        await admin.WhoAmI(gw.WhoAmIRequest(), metadata=boot)
        # Over HTTP too (same limiter, same address).
        async with aiohttp.ClientSession(base_url=stack.http_url) as session:
            async with session.get(
                "/v1/tenants/alpha/packs/p1", headers={"X-Api-Key": stale.secret}
            ) as response:
                assert response.status == 429 and response.headers["Retry-After"]
            async with session.get(
                "/v1/tenants/alpha/packs/p1", headers={"X-Api-Key": stack.keys["alpha"]}
            ) as response:
                assert response.status == 200
        assert stack.app.gateway.auth_failures.refused >= 5
    finally:
        await stack.close()


async def test_made_up_keys_never_reach_the_key_store(tmp_path, rsa_public_pem, fake_backend) -> None:
    """A flood of random key ids is answered from the in-memory key directory: no row lookup per
    request, a handful of directory refreshes in all, and a valid key is admitted throughout."""
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        auth_failure_address_limit={"rate": 1, "burst": 20},
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        gateway = stack.app.gateway
        lookups: list[str] = []
        original = gateway.store.get_key

        def counting_get_key(key_id: str):  # type: ignore[no-untyped-def]
            lookups.append(key_id)
            return original(key_id)

        gateway.store.get_key = counting_get_key  # type: ignore[method-assign]
        stub = pb_grpc.AudienceServiceStub(stack.channel)

        async def made_up() -> grpc.StatusCode:
            key = f"fc_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(GET, metadata=(("x-api-key", key),))
            return caught.value.code()

        codes = await asyncio.gather(*(made_up() for _ in range(200)))
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) <= 25  # the coarse per-address ceiling
        assert lookups == []
        assert gateway.key_directory.refreshes <= 10  # the first full load and a few coalesced refreshes
        assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42
        assert len(lookups) == 1  # the valid key's row, read once (cache off in tests)
    finally:
        await stack.close()


async def test_a_key_created_on_another_replica_is_found(tmp_path, rsa_public_pem, fake_backend) -> None:
    """The directory refreshes before refusing an unknown id: a key written to the store by another
    replica (here: directly) works on the next call."""
    settings = gateway_settings(tmp_path, rsa_public_pem, audience_target=fake_backend.target)
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42  # directory loaded
        _, secret = await asyncio.to_thread(stack.app.gateway.store.create_key, "alpha", ["packs.read"])
        assert (await stub.GetPack(GET, metadata=(("x-api-key", secret),))).size == 42
    finally:
        await stack.close()
