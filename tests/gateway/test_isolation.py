"""Tenant isolation through the gateway, against the real audience and retarget servers.

Tenant beta must not read, export, expand, reference, retarget or poll anything of tenant alpha: every
attempt answers NOT_FOUND exactly like a missing resource (member-level calls are PERMISSION_DENIED to
every tenant), and spoofed ``x-flashcrowd-*`` metadata is ignored. The backends enforce the same rules
on their own (checked by calling them directly with a tenant's assertion).
"""

from __future__ import annotations

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as apb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as apb_grpc
from flashcrowd.audience.v1 import (
    live_pack_pb2,
    live_pack_pb2_grpc,
    lookalike_pb2,
    lookalike_pb2_grpc,
    pack_pb2,
    spec_pb2,
)
from flashcrowd.retarget.v1 import campaign_pb2
from flashcrowd.retarget.v1 import retarget_service_pb2 as rpb
from flashcrowd.retarget.v1 import retarget_service_pb2_grpc as rpb_grpc
from google.longrunning import operations_pb2 as ops

from services.runtime import error_details
from tests.fixtures.channels import as_tenant, backend_channel

from .story import CLICKERS, Client

NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
async def alpha_world(real_stack):  # type: ignore[no-untyped-def]
    """Alpha's pack, template, campaign (launched) and build operation."""
    gateway = real_stack.gateway
    alpha = Client(gateway.channel, "alpha", gateway.auth("alpha"))
    operation = await alpha.audience.CreatePack(
        apb.CreatePackRequest(parent=alpha.parent, pack_id="secret-pack", pack=pack_pb2.Pack(spec=CLICKERS)),
        metadata=alpha.metadata,
    )
    done = await alpha.wait(operation)
    pack = pack_pb2.Pack()
    done.response.Unpack(pack)
    template = await alpha.create_template("secret-template")
    campaign = await alpha.create_campaign("secret-campaign", pack.name, template.name)
    launch = await alpha.retarget.LaunchCampaign(
        rpb.LaunchCampaignRequest(name=campaign.name), metadata=alpha.metadata
    )
    await alpha.wait(launch)
    return {
        "pack": pack,
        "template": template,
        "campaign": campaign,
        "build_op": operation,
        "launch_op": launch,
    }


async def expect_not_found(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == NOT_FOUND, (caught.value.code(), caught.value.details())
    assert "alpha" not in (error_details(caught.value).message or "").replace("tenants/alpha", "")


async def expect_denied(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert error_details(caught.value).reason == "MISSING_SCOPE"


async def test_other_tenants_packs_are_not_found(real_stack, alpha_world) -> None:
    gateway = real_stack.gateway
    beta = Client(gateway.channel, "beta", gateway.auth("beta"))
    pack = alpha_world["pack"].name
    md = beta.metadata
    await expect_not_found(beta.audience.GetPack(apb.GetPackRequest(name=pack), metadata=md))
    await expect_not_found(beta.audience.GetPackPersona(apb.GetPackPersonaRequest(name=pack), metadata=md))
    await expect_not_found(beta.audience.DeletePack(apb.DeletePackRequest(name=pack), metadata=md))
    await expect_not_found(beta.audience.RefreshPack(apb.RefreshPackRequest(name=pack), metadata=md))
    await expect_not_found(beta.audience.ListPacks(apb.ListPacksRequest(parent="tenants/alpha"), metadata=md))
    # Member-level calls are refused to every tenant principal, before any name is looked at.
    await expect_denied(
        beta.audience.CheckMembership(
            apb.CheckMembershipRequest(parent="tenants/beta", packs=[pack], user_ids=[1]), metadata=md
        )
    )
    export = beta.audience.ExportPack(
        apb.ExportPackRequest(name=pack, format=apb.EXPORT_FORMAT_USER_ID), metadata=md
    )
    await expect_denied(export.read())
    # Referencing alpha's pack from inside beta's own spec (nested deep in a set operation).
    nested = spec_pb2.PackSpec(
        union=spec_pb2.SetOperands(
            operands=[CLICKERS, spec_pb2.PackSpec(pack=spec_pb2.PackReference(pack=pack))]
        )
    )
    await expect_not_found(
        beta.audience.CreatePack(
            apb.CreatePackRequest(parent="tenants/beta", pack_id="steal", pack=pack_pb2.Pack(spec=nested)),
            metadata=md,
        )
    )
    await expect_not_found(
        beta.audience.EstimatePackSize(
            apb.EstimatePackSizeRequest(parent="tenants/beta", spec=nested), metadata=md
        )
    )
    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(gateway.channel)
    await expect_not_found(
        lookalike.ExpandLookalike(
            lookalike_pb2.ExpandLookalikeRequest(
                parent="tenants/beta", seed_pack=pack, pack_id="lal", reach_fraction=0.05
            ),
            metadata=md,
        )
    )
    await expect_not_found(
        live_pack_pb2_grpc.LivePackServiceStub(gateway.channel).GetLivePack(
            live_pack_pb2.GetLivePackRequest(name="tenants/alpha/livePacks/l1"), metadata=md
        )
    )
    # Alpha's pack is untouched.
    alpha = Client(gateway.channel, "alpha", gateway.auth("alpha"))
    assert (await alpha.audience.GetPack(apb.GetPackRequest(name=pack), metadata=alpha.metadata)).name == pack


async def test_other_tenants_campaigns_and_operations_are_not_found(real_stack, alpha_world) -> None:
    gateway = real_stack.gateway
    beta = Client(gateway.channel, "beta", gateway.auth("beta"))
    md = beta.metadata
    campaign = alpha_world["campaign"].name
    template = alpha_world["template"].name
    await expect_not_found(beta.retarget.GetCampaign(rpb.GetCampaignRequest(name=campaign), metadata=md))
    await expect_not_found(
        beta.retarget.GetCampaignReport(rpb.GetCampaignReportRequest(campaign=campaign), metadata=md)
    )
    await expect_not_found(
        beta.retarget.LaunchCampaign(rpb.LaunchCampaignRequest(name=campaign), metadata=md)
    )
    await expect_not_found(
        beta.retarget.CancelCampaign(rpb.CancelCampaignRequest(name=campaign), metadata=md)
    )
    await expect_not_found(
        beta.retarget.CopyCampaign(
            rpb.CopyCampaignRequest(name=campaign, campaign_id="copy", audience_pack="tenants/beta/packs/x"),
            metadata=md,
        )
    )
    await expect_not_found(
        beta.retarget.GetCouponTemplate(rpb.GetCouponTemplateRequest(name=template), metadata=md)
    )
    await expect_denied(
        beta.retarget.ClaimCoupon(rpb.ClaimCouponRequest(coupon_template=template, user_id=1), metadata=md)
    )
    # Retargeting alpha's pack from a campaign of beta's own.
    await expect_not_found(
        beta.retarget.CreateCampaign(
            rpb.CreateCampaignRequest(
                parent="tenants/beta",
                campaign_id="steal",
                campaign=campaign_pb2.Campaign(
                    audience_pack=alpha_world["pack"].name, coupon_template="tenants/beta/couponTemplates/t"
                ),
            ),
            metadata=md,
        )
    )
    stream = beta.retarget.StreamOffers(rpb.StreamOffersRequest(parent="tenants/alpha"), metadata=md)
    await expect_denied(stream.read())
    # Operations of both backends.
    for operation in (alpha_world["build_op"], alpha_world["launch_op"]):
        await expect_not_found(
            beta.operations.GetOperation(ops.GetOperationRequest(name=operation.name), metadata=md)
        )
        await expect_not_found(
            beta.operations.CancelOperation(ops.CancelOperationRequest(name=operation.name), metadata=md)
        )
    await expect_not_found(
        beta.operations.ListOperations(ops.ListOperationsRequest(name="tenants/alpha"), metadata=md)
    )
    # Beta's own listing shows none of alpha's operations.
    listed = await beta.operations.ListOperations(ops.ListOperationsRequest(name="tenants/beta"), metadata=md)
    assert all(op.name.startswith("tenants/beta/") for op in listed.operations)
    alpha = Client(gateway.channel, "alpha", gateway.auth("alpha"))
    mine = await alpha.operations.ListOperations(
        ops.ListOperationsRequest(name="tenants/alpha"), metadata=alpha.metadata
    )
    assert alpha_world["build_op"].name in {op.name for op in mine.operations}
    got = await alpha.operations.GetOperation(
        ops.GetOperationRequest(name=alpha_world["launch_op"].name), metadata=alpha.metadata
    )
    assert got.done


async def test_spoofed_tenant_header_is_ignored(real_stack, alpha_world) -> None:
    gateway = real_stack.gateway
    pack = alpha_world["pack"].name
    stub = apb_grpc.AudienceServiceStub(gateway.channel)
    spoofed = (*gateway.auth("beta"), ("x-flashcrowd-tenant", "alpha"), ("x-flashcrowd-scopes", "admin"))
    await expect_not_found(stub.GetPack(apb.GetPackRequest(name=pack), metadata=spoofed))
    # Alpha spoofing beta still sees its own packs, and only those.
    spoofed = (*gateway.auth("alpha"), ("x-flashcrowd-tenant", "beta"))
    listed = await stub.ListPacks(apb.ListPacksRequest(parent="tenants/alpha"), metadata=spoofed)
    assert pack in {p.name for p in listed.packs}


async def test_backends_enforce_the_tenant_themselves(real_stack, alpha_world) -> None:
    """Defence in depth: asserted as beta, the backends refuse alpha's resources too."""
    beta_header = as_tenant("beta")
    async with backend_channel(real_stack.audience_target) as channel:
        stub = apb_grpc.AudienceServiceStub(channel)
        await expect_not_found(
            stub.GetPack(apb.GetPackRequest(name=alpha_world["pack"].name), metadata=beta_header)
        )
    async with backend_channel(real_stack.retarget_target) as channel:
        stub = rpb_grpc.RetargetServiceStub(channel)
        await expect_not_found(
            stub.GetCampaign(rpb.GetCampaignRequest(name=alpha_world["campaign"].name), metadata=beta_header)
        )
        await expect_not_found(
            stub.CreateCampaign(
                rpb.CreateCampaignRequest(
                    parent="tenants/beta",
                    campaign_id="steal",
                    campaign=campaign_pb2.Campaign(
                        audience_pack=alpha_world["pack"].name,
                        coupon_template="tenants/beta/couponTemplates/t",
                    ),
                ),
                metadata=beta_header,
            )
        )


async def test_malformed_resource_names(real_stack) -> None:
    gateway = real_stack.gateway
    stub = apb_grpc.AudienceServiceStub(gateway.channel)
    md = gateway.auth("beta")
    for name in ["tenants/alpha/../beta/packs/x", "/tenants/alpha/packs/x", "x/tenants/alpha/packs/p"]:
        await expect_not_found(stub.GetPack(apb.GetPackRequest(name=name), metadata=md))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(apb.GetPackRequest(name="packs/x"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value).field_violations[0][0] == "name"
