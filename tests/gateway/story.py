"""The seed story, told through the gateway only: packs, persona, a campaign on clickers-not-buyers,
launch, claim, redeem, report. Shared by the in-process gateway tests and the cross-process e2e test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import grpc.aio
from flashcrowd.audience.v1 import audience_service_pb2 as apb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as apb_grpc
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2
from flashcrowd.retarget.v1 import retarget_service_pb2 as rpb
from flashcrowd.retarget.v1 import retarget_service_pb2_grpc as rpb_grpc
from google.longrunning import operations_pb2 as ops
from google.longrunning import operations_pb2_grpc as ops_grpc
from google.protobuf import duration_pb2


def last(hours: int) -> spec_pb2.TimeWindow:
    return spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=hours * 3600))


def shortcut(kind: int, hours: int = 72) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(shortcut=spec_pb2.Shortcut(kind=kind, window=last(hours)))


CLICKERS = shortcut(spec_pb2.Shortcut.KIND_CLICKERS)
PURCHASERS = shortcut(spec_pb2.Shortcut.KIND_PURCHASERS)


def clickers_not_buyers() -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(exclude=spec_pb2.ExcludeOperands(base=CLICKERS, subtract=[PURCHASERS]))


@dataclass
class Client:
    """Stubs over one channel to the gateway, authenticated as one tenant.

    ``platform`` is the credential of the platform's serving side (member-level calls: reading a
    pack's members to deliver offers, a user's claim and redemption), which no tenant may make.
    """

    channel: grpc.aio.Channel
    tenant: str
    metadata: tuple[tuple[str, str], ...]
    platform: tuple[tuple[str, str], ...] = ()
    audience: apb_grpc.AudienceServiceStub = field(init=False)
    retarget: rpb_grpc.RetargetServiceStub = field(init=False)
    operations: ops_grpc.OperationsStub = field(init=False)

    def __post_init__(self) -> None:
        self.audience = apb_grpc.AudienceServiceStub(self.channel)
        self.retarget = rpb_grpc.RetargetServiceStub(self.channel)
        self.operations = ops_grpc.OperationsStub(self.channel)

    @property
    def parent(self) -> str:
        return f"tenants/{self.tenant}"

    async def wait(self, operation: ops.Operation, seconds: int = 60) -> ops.Operation:
        done = await self.operations.WaitOperation(
            ops.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=seconds)),
            metadata=self.metadata,
        )
        assert done.done, f"{operation.name} not done"
        assert not done.HasField("error"), done.error
        return done

    async def create_pack(self, pack_id: str, spec: spec_pb2.PackSpec) -> pack_pb2.Pack:
        operation = await self.audience.CreatePack(
            apb.CreatePackRequest(parent=self.parent, pack_id=pack_id, pack=pack_pb2.Pack(spec=spec)),
            metadata=self.metadata,
        )
        done = await self.wait(operation)
        pack = pack_pb2.Pack()
        done.response.Unpack(pack)
        return pack

    async def first_members(self, pack: str, count: int) -> list[int]:
        members: list[int] = []
        call = self.audience.ExportPack(
            apb.ExportPackRequest(name=pack, format=apb.EXPORT_FORMAT_USER_ID, page_size=max(count, 1)),
            metadata=self.platform,
        )
        async for page in call:
            members.extend(page.user_ids)
            if len(members) >= count:
                call.cancel()
                break
        return members[:count]

    async def create_template(self, template_id: str) -> coupon_pb2.CouponTemplate:
        template = coupon_pb2.CouponTemplate(
            display_name="10 yuan off",
            fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=1000),
            min_spend_fen=5000,
            total_stock=100_000,
            per_user_limit=1,
        )
        template.valid_for.FromTimedelta(timedelta(days=7))
        return await self.retarget.CreateCouponTemplate(
            rpb.CreateCouponTemplateRequest(
                parent=self.parent, coupon_template_id=template_id, coupon_template=template
            ),
            metadata=self.metadata,
        )

    async def create_campaign(self, campaign_id: str, pack: str, template: str) -> campaign_pb2.Campaign:
        campaign = campaign_pb2.Campaign(
            display_name="win back clickers", audience_pack=pack, coupon_template=template
        )
        return await self.retarget.CreateCampaign(
            rpb.CreateCampaignRequest(parent=self.parent, campaign_id=campaign_id, campaign=campaign),
            metadata=self.metadata,
        )


@dataclass
class StoryResult:
    clickers: pack_pb2.Pack
    audience_pack: pack_pb2.Pack
    persona: pack_pb2.PackPersona
    campaign: campaign_pb2.Campaign
    launched: campaign_pb2.Campaign
    coupon: coupon_pb2.Coupon
    redemption: rpb.RedeemCouponResponse
    report: campaign_pb2.CampaignReport
    member: int


async def seed_story(client: Client, suffix: str = "") -> StoryResult:
    """The flash-sale story end to end through the gateway; returns what each step answered."""
    clickers = await client.create_pack(f"clickers{suffix}", CLICKERS)
    assert clickers.state == pack_pb2.Pack.STATE_READY and clickers.size > 0
    target = await client.create_pack(f"clickers-not-buyers{suffix}", clickers_not_buyers())
    assert 0 < target.size <= clickers.size
    persona = await client.audience.GetPackPersona(
        apb.GetPackPersonaRequest(name=clickers.name), metadata=client.metadata
    )
    template = await client.create_template(f"ten-off{suffix}")
    campaign = await client.create_campaign(f"win-back{suffix}", target.name, template.name)
    operation = await client.retarget.LaunchCampaign(
        rpb.LaunchCampaignRequest(name=campaign.name), metadata=client.metadata
    )
    done = await client.wait(operation)
    launched = campaign_pb2.Campaign()
    done.response.Unpack(launched)
    (member,) = await client.first_members(target.name, 1)
    coupon = await client.retarget.ClaimCoupon(
        rpb.ClaimCouponRequest(
            coupon_template=template.name,
            user_id=member,
            campaign=campaign.name,
            request_id=f"claim-{member}",
        ),
        metadata=client.platform,
    )
    redemption = await client.retarget.RedeemCoupon(
        rpb.RedeemCouponRequest(
            coupon=coupon.name,
            user_id=member,
            order_id=f"order-{member}",
            order_amount_fen=20_000,
            idempotency_key=f"redeem-{member}",
        ),
        metadata=client.platform,
    )
    report = await client.retarget.GetCampaignReport(
        rpb.GetCampaignReportRequest(campaign=campaign.name), metadata=client.metadata
    )
    return StoryResult(clickers, target, persona, campaign, launched, coupon, redemption, report, member)
