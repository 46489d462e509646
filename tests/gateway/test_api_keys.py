"""API keys: expiry (expire_time / ttl), listing and reading without secrets, who may see which keys."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from google.protobuf import duration_pb2, timestamp_pb2

from .conftest import BOOTSTRAP, PLATFORM
from .test_auth import expect

BOOT = (("x-api-key", BOOTSTRAP),)
GET = pb.GetPackRequest(name="tenants/alpha/packs/p1")


def at(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def test_keys_expire(fake_stack) -> None:
    stack, _ = fake_stack
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    short = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(
            parent="tenants/alpha", scopes=["packs.read"], ttl=duration_pb2.Duration(nanos=600_000_000)
        ),
        metadata=BOOT,
    )
    until = time.time() + 3600
    later = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"], expire_time=at(until)),
        metadata=BOOT,
    )
    assert short.api_key.HasField("expire_time") and abs(later.api_key.expire_time.seconds - until) <= 1
    short_md = (("x-api-key", short.secret),)
    assert (await stub.GetPack(GET, metadata=short_md)).size == 42
    await asyncio.sleep(0.7)
    await expect(stub.GetPack(GET, metadata=short_md), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED")
    assert (await stub.GetPack(GET, metadata=(("x-api-key", later.secret),))).size == 42
    # Bad expirations name their field.
    for request, field in (
        (
            gw.CreateApiKeyRequest(
                parent="tenants/alpha", scopes=["packs.read"], expire_time=at(time.time() - 5)
            ),
            "expire_time",
        ),
        (
            gw.CreateApiKeyRequest(
                parent="tenants/alpha", scopes=["packs.read"], ttl=duration_pb2.Duration(seconds=-1)
            ),
            "ttl",
        ),
        (
            gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"], display_name="x" * 201),
            "display_name",
        ),
    ):
        details = await expect(admin.CreateApiKey(request, metadata=BOOT), grpc.StatusCode.INVALID_ARGUMENT)
        assert details.bad_request.field_violations[0].field == field


async def test_listing_and_reading_keys(fake_stack) -> None:
    stack, _ = fake_stack
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    alpha_admin = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["admin"], display_name="alpha admin"),
        metadata=BOOT,
    )
    as_alpha = (("x-api-key", alpha_admin.secret),)
    made = [
        await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"], display_name=f"k{index}"),
            metadata=as_alpha,
        )
        for index in range(3)
    ]
    await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=made[0].api_key.name), metadata=as_alpha)
    # Paged, oldest first, every key of the tenant (the fixture's, the admin's, the three new ones).
    names: list[str] = []
    listed: list[gw.ApiKey] = []
    token = ""
    while True:
        page = await admin.ListApiKeys(
            gw.ListApiKeysRequest(parent="tenants/alpha", page_size=2, page_token=token), metadata=as_alpha
        )
        assert len(page.api_keys) <= 2
        listed.extend(page.api_keys)
        names.extend(key.name for key in page.api_keys)
        token = page.next_page_token
        if not token:
            break
        assert not any(key.secret in page.SerializeToString().decode("latin-1") for key in made)
    assert len(names) == 5 and names[-3:] == [key.api_key.name for key in made]
    by_name = {key.name: key for key in listed}
    assert by_name[made[0].api_key.name].HasField("revoke_time")
    assert not by_name[made[1].api_key.name].HasField("revoke_time")
    assert by_name[alpha_admin.api_key.name].display_name == "alpha admin"
    got = await admin.GetApiKey(gw.GetApiKeyRequest(name=made[2].api_key.name), metadata=as_alpha)
    assert got == by_name[made[2].api_key.name] and got.scopes == ["packs.read"]
    # Another tenant's keys are NOT_FOUND to alpha's admin; platform keys are the system admin's.
    beta_keys = await admin.ListApiKeys(gw.ListApiKeysRequest(parent="tenants/beta"), metadata=BOOT)
    assert len(beta_keys.api_keys) == 1
    await expect(
        admin.ListApiKeys(gw.ListApiKeysRequest(parent="tenants/beta"), metadata=as_alpha),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect(
        admin.GetApiKey(gw.GetApiKeyRequest(name=beta_keys.api_keys[0].name), metadata=as_alpha),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect(
        admin.GetApiKey(
            gw.GetApiKeyRequest(name=made[1].api_key.name.replace("alpha", "beta")), metadata=BOOT
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect(
        admin.ListApiKeys(gw.ListApiKeysRequest(parent="platform"), metadata=as_alpha),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    platform = await admin.ListApiKeys(gw.ListApiKeysRequest(parent="platform"), metadata=BOOT)
    assert len(platform.api_keys) == 2 and all(
        k.name.startswith("platform/apiKeys/") for k in platform.api_keys
    )
    assert set(platform.api_keys[0].scopes) == set(PLATFORM)
    # A key without the admin scope lists nothing; bad page sizes and tokens name their field.
    await expect(
        admin.ListApiKeys(gw.ListApiKeysRequest(parent="tenants/alpha"), metadata=stack.auth("alpha")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    for request, field in (
        (gw.ListApiKeysRequest(parent="tenants/alpha", page_size=5000), "page_size"),
        (gw.ListApiKeysRequest(parent="tenants/alpha", page_token="bm9wZQ=="), "page_token"),
        (gw.ListApiKeysRequest(parent="tenants/Alpha"), "parent"),
    ):
        details = await expect(admin.ListApiKeys(request, metadata=BOOT), grpc.StatusCode.INVALID_ARGUMENT)
        assert details.bad_request.field_violations[0].field == field
    # A token of one parent is refused for another.
    first = await admin.ListApiKeys(gw.ListApiKeysRequest(parent="tenants/alpha", page_size=1), metadata=BOOT)
    await expect(
        admin.ListApiKeys(
            gw.ListApiKeysRequest(parent="tenants/beta", page_token=first.next_page_token), metadata=BOOT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_keys_over_http(fake_stack) -> None:
    stack, _ = fake_stack
    boot = {"X-Api-Key": BOOTSTRAP}
    async with aiohttp.ClientSession(base_url=stack.http_url) as session:
        async with session.post(
            "/v1/tenants/alpha/apiKeys",
            json={"scopes": ["packs.read"], "ttl": "3600s", "displayName": "curl"},
            headers=boot,
        ) as response:
            created = await response.json()
            assert response.status == 200, created
        assert created["apiKey"]["expireTime"] and created["secret"].startswith("fc_")
        async with session.get("/v1/tenants/alpha/apiKeys?pageSize=10", headers=boot) as response:
            listed = await response.json()
            assert response.status == 200, listed
        assert created["apiKey"] in listed["apiKeys"]
        assert created["secret"] not in str(listed)
        async with session.get(f"/v1/{created['apiKey']['name']}", headers=boot) as response:
            assert (await response.json()) == created["apiKey"]
        async with session.get("/v1/platform/apiKeys", headers=boot) as response:
            assert len((await response.json())["apiKeys"]) == 2
        platform_key = (await (await session.get("/v1/platform/apiKeys", headers=boot)).json())["apiKeys"][0][
            "name"
        ]
        async with session.delete(f"/v1/{platform_key}", headers=boot) as response:
            assert response.status == 200
        async with session.get(f"/v1/{platform_key}", headers=boot) as response:
            assert "revokeTime" in await response.json()
