"""The tenant boundary through the real gateway and backends (issue 12): what an adversarial tenant
tried, and what now answers instead.

* member-level data (members, membership, the offer stream, claims) is for platform principals only;
* no tenant key or token can hold a platform scope;
* lookalike models are platform-owned: no tenant admin (nor the system admin) retrains them;
* the backends refuse calls that do not carry the gateway's signed assertion (forged headers,
  assertions under another key, replayed for another method, expired);
* tenant ids follow one rule in every service.
"""

from __future__ import annotations

import time

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as apb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as apb_grpc
from flashcrowd.audience.v1 import lookalike_pb2, lookalike_pb2_grpc, pack_pb2
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from flashcrowd.retarget.v1 import retarget_service_pb2 as rpb
from flashcrowd.retarget.v1 import retarget_service_pb2_grpc as rpb_grpc

from services.runtime import error_details
from services.runtime.assertion import ASSERTION_HEADER, AssertionSigner, Caller, load_assertion_key
from services.runtime.scopes import ALL_SCOPES, PLATFORM_SCOPES

from .conftest import BOOTSTRAP, make_token
from .story import CLICKERS, Client

GET_PACK = "/flashcrowd.audience.v1.AudienceService/GetPack"


async def _code(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    try:
        result = call
        if hasattr(result, "read"):
            await result.read()
        else:
            await result
    except grpc.aio.AioRpcError as error:
        return error.code(), error_details(error).reason or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
async def alpha_pack(real_stack) -> pack_pb2.Pack:  # type: ignore[no-untyped-def]
    gateway = real_stack.gateway
    alpha = Client(gateway.channel, "alpha", gateway.auth("alpha"))
    return await alpha.create_pack("boundary-clickers", CLICKERS)


async def test_member_level_calls_need_a_platform_principal(real_stack, alpha_pack) -> None:
    gateway = real_stack.gateway
    audience = apb_grpc.AudienceServiceStub(gateway.channel)
    retarget = rpb_grpc.RetargetServiceStub(gateway.channel)
    check = apb.CheckMembershipRequest(parent="tenants/alpha", packs=[alpha_pack.name], user_ids=[1, 2, 3])
    export = apb.ExportPackRequest(name=alpha_pack.name, format=apb.EXPORT_FORMAT_USER_ID)
    alpha = gateway.auth("alpha")
    # The pack's own tenant, even with every tenant scope, cannot read its members.
    for call in (
        audience.CheckMembership(check, metadata=alpha),
        audience.ExportPack(export, metadata=alpha),
        retarget.StreamOffers(rpb.StreamOffersRequest(parent="tenants/alpha"), metadata=alpha),
        retarget.ClaimCoupon(
            rpb.ClaimCouponRequest(coupon_template="tenants/alpha/couponTemplates/x", user_id=1),
            metadata=alpha,
        ),
    ):
        assert await _code(call) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    # A tenant JWT claiming platform scopes does not get them.
    token = make_token("alpha", sorted(ALL_SCOPES))
    bearer = (("authorization", f"Bearer {token}"),)
    assert await _code(audience.CheckMembership(check, metadata=bearer)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_SCOPE",
    )
    # The platform's serving side gets the members of any tenant's pack.
    platform = gateway.auth("platform")
    membership = await audience.CheckMembership(check, metadata=platform)
    assert len(membership.results[0].members) == 3
    pages = [page async for page in audience.ExportPack(export, metadata=platform)]
    assert sum(len(page.user_ids) for page in pages) == pages[-1].total > 0


async def test_lookalike_member_level_calls_need_a_platform_principal(real_stack, alpha_pack) -> None:
    gateway = real_stack.gateway
    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(gateway.channel)
    audience = apb_grpc.AudienceServiceStub(gateway.channel)
    scores = lookalike_pb2.ExportLookalikeScoresRequest(name=alpha_pack.name)
    alpha, platform = gateway.auth("alpha"), gateway.auth("platform")
    # Per-member ranks of an expansion: refused to the tenant at the gateway (members.read).
    assert await _code(lookalike.ExportLookalikeScores(scores, metadata=alpha)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_SCOPE",
    )
    # The platform gets through to the backend's checks (this pack is not a lookalike).
    assert await _code(lookalike.ExportLookalikeScores(scores, metadata=platform)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_A_LOOKALIKE",
    )

    def user_id_upload(pack_id: str):  # type: ignore[no-untyped-def]
        header = apb.UploadPackHeader(parent="tenants/alpha", pack_id=pack_id, id_type=apb.ID_TYPE_USER_ID)

        async def stream():  # type: ignore[no-untyped-def]
            yield apb.UploadPackRequest(header=header)
            yield apb.UploadPackRequest(chunk=apb.UploadPackChunk(user_ids=[1, 2, 3]))

        return stream()

    # A tenant holds no platform user ids: refused by the backend on the header.
    assert await _code(audience.UploadPack(user_id_upload("alpha-ids"), metadata=alpha)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PLATFORM_SCOPE_REQUIRED",
    )
    assert await _code(audience.UploadPack(user_id_upload("platform-ids"), metadata=platform)) == (
        grpc.StatusCode.OK,
        "",
    )


async def test_tenant_keys_cannot_hold_platform_scopes(real_stack) -> None:
    admin = gw_grpc.GatewayServiceStub(real_stack.gateway.channel)
    for holder in ((("x-api-key", BOOTSTRAP),), real_stack.gateway.auth("alpha")):
        for scope in sorted(PLATFORM_SCOPES):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.CreateApiKey(
                    gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read", scope]),
                    metadata=holder,
                )
            if holder[0][1] == BOOTSTRAP:
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error_details(caught.value).field_violations[0][0] == "scopes"
            else:  # a tenant key without the admin scope may not manage keys at all
                assert caught.value.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.PERMISSION_DENIED,
                )
    # Only a system admin creates platform keys.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="platform", scopes=["members.read"]),
            metadata=real_stack.gateway.auth("alpha"),
        )
    assert caught.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


async def test_only_the_platform_trains_lookalike_models(real_stack) -> None:
    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(real_stack.gateway.channel)
    bad_request = lookalike_pb2.TrainLookalikeModelRequest(model_id="Not A Valid Id")
    tenant_admin_token = make_token("alpha", ["admin"])
    for metadata in (
        real_stack.gateway.auth("alpha"),
        (("authorization", f"Bearer {tenant_admin_token}"),),  # a tenant admin
        (("x-api-key", BOOTSTRAP),),  # the system admin manages tenants, not models
    ):
        code, _ = await _code(lookalike.TrainLookalikeModel(bad_request, metadata=metadata))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    # A platform principal gets past the boundary (and to input validation).
    code, _ = await _code(
        lookalike.TrainLookalikeModel(bad_request, metadata=real_stack.gateway.auth("platform"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_backends_refuse_calls_without_a_valid_gateway_assertion(real_stack, alpha_pack) -> None:
    request = apb.GetPackRequest(name=alpha_pack.name)
    key = load_assertion_key()
    tenant = Caller.for_tenant("alpha", "k1", {"packs.read"})
    forged_key = AssertionSigner(b"f" * 32)
    attempts = {
        "nothing": (),
        "the old trusted header": (("x-flashcrowd-tenant", "alpha"),),
        "another key": ((ASSERTION_HEADER, forged_key.sign(tenant, GET_PACK)),),
        "another method": (
            (
                ASSERTION_HEADER,
                AssertionSigner(key).sign(tenant, "/flashcrowd.audience.v1.AudienceService/ListPacks"),
            ),
        ),
        "expired": (
            (
                ASSERTION_HEADER,
                AssertionSigner(key, ttl_seconds=1).sign(tenant, GET_PACK, now=time.time() - 120),
            ),
        ),
        "garbage": ((ASSERTION_HEADER, "v1.e30.AAAA"),),
    }
    async with grpc.aio.insecure_channel(real_stack.audience_target) as channel:
        stub = apb_grpc.AudienceServiceStub(channel)
        for what, metadata in attempts.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
            assert error_details(caught.value).reason == "GATEWAY_ASSERTION_REQUIRED", what
        # A valid assertion for this method is served.
        valid = ((ASSERTION_HEADER, AssertionSigner(key).sign(tenant, GET_PACK)),)
        assert (await stub.GetPack(request, metadata=valid)).name == alpha_pack.name
    async with grpc.aio.insecure_channel(real_stack.retarget_target) as channel:
        stub = rpb_grpc.RetargetServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCampaigns(
                rpb.ListCampaignsRequest(parent="tenants/alpha"), metadata=(("x-flashcrowd-tenant", "alpha"),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenant_sizes_are_disclosed_not_exact(real_stack, alpha_pack) -> None:
    gateway = real_stack.gateway
    audience = apb_grpc.AudienceServiceStub(gateway.channel)
    shown = await audience.GetPack(apb.GetPackRequest(name=alpha_pack.name), metadata=gateway.auth("alpha"))
    exact = await audience.GetPack(
        apb.GetPackRequest(name=alpha_pack.name), metadata=gateway.auth("platform")
    )
    assert exact.size_disclosure == pack_pb2.SIZE_DISCLOSURE_EXACT
    assert shown.size_disclosure in (pack_pb2.SIZE_DISCLOSURE_NOISY, pack_pb2.SIZE_DISCLOSURE_BELOW_MINIMUM)


@pytest.mark.parametrize("tenant_id", ["zz3437-", "-a", "A1", "a" * 64, "a_b"])
async def test_one_tenant_id_rule(real_stack, tenant_id: str) -> None:
    admin = gw_grpc.GatewayServiceStub(real_stack.gateway.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTenant(
            gw.CreateTenantRequest(tenant_id=tenant_id), metadata=(("x-api-key", BOOTSTRAP),)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("tenant_id", ["zz3437-", "9abc", "a_b"])
async def test_backends_apply_the_same_tenant_id_rule(real_stack, tenant_id: str) -> None:
    from tests.fixtures.channels import backend_channel

    async with backend_channel(real_stack.audience_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await apb_grpc.AudienceServiceStub(channel).GetPack(
                apb.GetPackRequest(name=f"tenants/{tenant_id}/packs/p")
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with backend_channel(real_stack.retarget_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rpb_grpc.RetargetServiceStub(channel).ListCampaigns(
                rpb.ListCampaignsRequest(parent=f"tenants/{tenant_id}")
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
