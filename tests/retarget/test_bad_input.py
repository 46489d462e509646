"""Bad input: every class of invalid request answers the right code with the field named, and
nothing is written (row counts of every ledger table are unchanged)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.runtime import error_details
from tests.fixtures.channels import AS_TENANT

from .conftest import Rt

api = retarget_service_pb2
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TABLES = (
    "coupon_templates",
    "campaigns",
    "campaign_members",
    "coupons",
    "redemptions",
    "refunds",
    "orders",
    "outbox",
    "audit_log",
)
TS = timestamp_pb2.Timestamp


def _template(**fields: Any) -> coupon_pb2.CouponTemplate:
    if "fixed_amount" not in fields and "percent_off" not in fields and not fields.pop("no_discount", False):
        fields["fixed_amount"] = coupon_pb2.FixedAmountOff(amount_fen=100)
    return coupon_pb2.CouponTemplate(**fields)


TEMPLATE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "parent": ({"parent": "acme"}, "parent"),
    "id": ({"coupon_template_id": "Bad_Id"}, "coupon_template_id"),
    "no discount": ({"coupon_template": _template(no_discount=True)}, "coupon_template.discount"),
    "negative amount": (
        {"coupon_template": _template(fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=-5))},
        "coupon_template.fixed_amount.amount_fen",
    ),
    "zero amount": (
        {"coupon_template": _template(fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=0))},
        "coupon_template.fixed_amount.amount_fen",
    ),
    "absurd amount": (
        {"coupon_template": _template(fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=10**12 + 1))},
        "coupon_template.fixed_amount.amount_fen",
    ),
    "percent 0": (
        {"coupon_template": _template(percent_off=coupon_pb2.PercentOff(basis_points=0, cap_fen=100))},
        "coupon_template.percent_off.basis_points",
    ),
    "percent over 100": (
        {"coupon_template": _template(percent_off=coupon_pb2.PercentOff(basis_points=10_001, cap_fen=100))},
        "coupon_template.percent_off.basis_points",
    ),
    "cap 0": (
        {"coupon_template": _template(percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=0))},
        "coupon_template.percent_off.cap_fen",
    ),
    "negative cap": (
        {"coupon_template": _template(percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=-1))},
        "coupon_template.percent_off.cap_fen",
    ),
    "negative min spend": ({"coupon_template": _template(min_spend_fen=-1)}, "coupon_template.min_spend_fen"),
    "window ends before it starts": (
        {
            "coupon_template": _template(
                valid_start_time=TS(seconds=2_000_000_000), valid_end_time=TS(seconds=1_999_999_999)
            )
        },
        "coupon_template.valid_end_time",
    ),
    "negative validity": (
        {"coupon_template": _template(valid_for=duration_pb2.Duration(seconds=-1))},
        "coupon_template.valid_for",
    ),
    "negative stock": ({"coupon_template": _template(total_stock=-1)}, "coupon_template.total_stock"),
    "negative budget": ({"coupon_template": _template(budget_cap_fen=-1)}, "coupon_template.budget_cap_fen"),
    "absurd budget": (
        {"coupon_template": _template(budget_cap_fen=10**13)},
        "coupon_template.budget_cap_fen",
    ),
    "budget below one coupon": (
        {"coupon_template": _template(budget_cap_fen=99)},
        "coupon_template.budget_cap_fen",
    ),
    "per-user limit below 1": (
        {"coupon_template": _template(per_user_limit=-1)},
        "coupon_template.per_user_limit",
    ),
    "currency": ({"coupon_template": _template(currency_code="cny")}, "coupon_template.currency_code"),
    "refund policy": ({"coupon_template": _template(refund_policy=9)}, "coupon_template.refund_policy"),
}


@pytest.fixture
async def counts(rt: Rt) -> Callable[[], Any]:
    def read(tx):  # type: ignore[no-untyped-def]
        return {table: tx.scalar(f"SELECT COUNT(*) FROM {table}") for table in TABLES}

    async def snapshot() -> dict[str, int]:
        return await rt.sql(read, write=False)

    return snapshot


async def _fails(
    call: Any, code: grpc.StatusCode, field: str | None = None, reason: str | None = None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert details.code is code, (details.code, details.message)
    if field is not None and code is INVALID:
        assert field in [f for f, _ in details.field_violations], details.field_violations
    if field is not None and code is NOT_FOUND:
        assert details.resource_info is not None
        assert details.error_info.metadata.get("field", field) == field, details.error_info.metadata
    if reason is not None:
        assert details.reason == reason, details.reason


async def test_template_input_is_validated_and_nothing_written(rt: Rt, counts: Callable[[], Any]) -> None:
    tenant = rt.tenant()
    before = await counts()
    for name, (overrides, field) in TEMPLATE_CASES.items():
        request = api.CreateCouponTemplateRequest(
            parent=f"tenants/{tenant}", coupon_template_id="ok-id", coupon_template=_template()
        )
        for key, value in overrides.items():
            if isinstance(value, str):
                setattr(request, key, value)
            else:
                getattr(request, key).CopyFrom(value)
        try:
            await _fails(rt.stub.CreateCouponTemplate(request), INVALID, field)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    assert await counts() == before


async def test_several_violations_are_reported_together(rt: Rt) -> None:
    request = api.CreateCouponTemplateRequest(
        parent=f"tenants/{rt.tenant()}",
        coupon_template_id="x",
        coupon_template=_template(
            percent_off=coupon_pb2.PercentOff(basis_points=20_000, cap_fen=-3),
            total_stock=-1,
            per_user_limit=-2,
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rt.stub.CreateCouponTemplate(request)
    fields = {f for f, _ in error_details(caught.value).field_violations}
    assert fields == {
        "coupon_template.percent_off.basis_points",
        "coupon_template.percent_off.cap_fen",
        "coupon_template.total_stock",
        "coupon_template.per_user_limit",
    }


async def test_campaign_input_is_validated_and_nothing_written(rt: Rt, counts: Callable[[], Any]) -> None:
    tenant, other = rt.tenant(), rt.tenant()
    pack = (await rt.audience.upload(tenant, rt.audience.users[:50])).name
    foreign_pack = (await rt.audience.upload(other, rt.audience.users[:50])).name
    template = (await rt.template(tenant, "base")).name
    foreign_template = (await rt.template(other, "base")).name
    arm = campaign_pb2.Arm
    rule = campaign_pb2.Rule
    cases: dict[str, tuple[dict[str, Any], grpc.StatusCode, str]] = {
        "no pack": ({"audience_pack": ""}, INVALID, "campaign.audience_pack"),
        "malformed pack": ({"audience_pack": "packs/x"}, INVALID, "campaign.audience_pack"),
        "no template": ({"coupon_template": ""}, INVALID, "campaign.coupon_template"),
        "zero weight": ({"arms": [arm(arm_id="a", weight=0)]}, INVALID, "campaign.arms[0].weight"),
        "negative weight": (
            {"arms": [arm(arm_id="a", weight=1), arm(arm_id="b", weight=-3)]},
            INVALID,
            "campaign.arms[1].weight",
        ),
        "duplicate arm": (
            {"arms": [arm(arm_id="a", weight=1), arm(arm_id="a", weight=1)]},
            INVALID,
            "campaign.arms[1].arm_id",
        ),
        "bad arm id": ({"arms": [arm(arm_id="A B", weight=1)]}, INVALID, "campaign.arms[0].arm_id"),
        "arm named holdout": (
            {"arms": [arm(arm_id="holdout", weight=1)]},
            INVALID,
            "campaign.arms[0].arm_id",
        ),
        "holdout over 50%": ({"holdout_basis_points": 5001}, INVALID, "campaign.holdout_basis_points"),
        "negative holdout": ({"holdout_basis_points": -1}, INVALID, "campaign.holdout_basis_points"),
        "ends before it starts": (
            {"start_time": TS(seconds=2_000_000_100), "end_time": TS(seconds=2_000_000_000)},
            INVALID,
            "campaign.end_time",
        ),
        "ended already": ({"end_time": TS(seconds=1_000_000_000)}, INVALID, "campaign.end_time"),
        "negative loss cap": ({"loss_cap_fen": -1}, INVALID, "campaign.loss_cap_fen"),
        "absurd loss cap": ({"loss_cap_fen": 10**12 + 1}, INVALID, "campaign.loss_cap_fen"),
        "negative rate": ({"delivery_rate_per_second": -1}, INVALID, "campaign.delivery_rate_per_second"),
        "rule without action": (
            {"rules": [rule(rule_id="r", metric="roi", comparison=rule.COMPARISON_LESS, threshold=1)]},
            INVALID,
            "campaign.rules[0].action",
        ),
        "unknown template": (
            {"coupon_template": f"tenants/{tenant}/couponTemplates/nope"},
            NOT_FOUND,
            "campaign.coupon_template",
        ),
        "other tenant's template": (
            {"coupon_template": foreign_template},
            NOT_FOUND,
            "campaign.coupon_template",
        ),
        "unknown arm template": (
            {
                "arms": [
                    arm(arm_id="a", weight=1),
                    arm(arm_id="b", weight=1, coupon_template=f"tenants/{tenant}/couponTemplates/nope"),
                ]
            },
            NOT_FOUND,
            "campaign.arms[1].coupon_template",
        ),
        "unknown pack": (
            {"audience_pack": f"tenants/{tenant}/packs/nope"},
            NOT_FOUND,
            "campaign.audience_pack",
        ),
        "other tenant's pack": ({"audience_pack": foreign_pack}, NOT_FOUND, "campaign.audience_pack"),
    }
    before = await counts()
    for name, (overrides, code, field) in cases.items():
        campaign = campaign_pb2.Campaign(audience_pack=pack, coupon_template=template)
        for key, value in overrides.items():
            if isinstance(value, list):
                getattr(campaign, key).extend(value)
            elif isinstance(value, TS):
                getattr(campaign, key).CopyFrom(value)
            else:
                setattr(campaign, key, value)
        request = api.CreateCampaignRequest(parent=f"tenants/{tenant}", campaign_id="c", campaign=campaign)
        try:
            await _fails(rt.stub.CreateCampaign(request), code, field)
        except AssertionError as error:
            raise AssertionError(f"case {name!r}: {error}") from error
    assert await counts() == before


async def test_other_requests_and_other_tenants(rt: Rt, counts: Callable[[], Any]) -> None:
    tenant, other = rt.tenant(), rt.tenant()
    pack = (await rt.audience.upload(tenant, rt.audience.users[:20])).name
    template = await rt.template(tenant, "base")
    campaign = await rt.campaign(tenant, pack, template.name, "mine")
    coupon = await rt.stub.ClaimCoupon(api.ClaimCouponRequest(coupon_template=template.name, user_id=1))
    foreign = f"tenants/{other}/campaigns/mine"
    before = await counts()
    s = rt.stub

    def redeem(**fields: Any) -> Any:
        values: dict[str, Any] = dict(
            coupon=coupon.name, user_id=1, order_id="o", order_amount_fen=5000, idempotency_key="k"
        )
        values.update(fields)
        return s.RedeemCoupon(api.RedeemCouponRequest(**values))

    # another tenant's campaign is NOT_FOUND whichever way it is asked for
    await _fails(s.GetCampaign(api.GetCampaignRequest(name=foreign)), NOT_FOUND, reason="CAMPAIGN_NOT_FOUND")
    await _fails(
        s.GetCampaign(api.GetCampaignRequest(name=campaign.name), metadata=((AS_TENANT, other),)),
        NOT_FOUND,
    )
    await _fails(s.LaunchCampaign(api.LaunchCampaignRequest(name=foreign)), NOT_FOUND)
    await _fails(s.PauseCampaign(api.PauseCampaignRequest(name=foreign)), NOT_FOUND)
    await _fails(s.CancelCampaign(api.CancelCampaignRequest(name=foreign)), NOT_FOUND)
    await _fails(s.GetCampaignReport(api.GetCampaignReportRequest(campaign=foreign)), NOT_FOUND)
    await _fails(
        s.CopyCampaign(
            api.CopyCampaignRequest(
                name=foreign, campaign_id="copy", audience_pack=f"tenants/{other}/packs/p"
            )
        ),
        NOT_FOUND,
    )
    await _fails(
        s.CopyCampaign(
            api.CopyCampaignRequest(
                name=campaign.name, campaign_id="copy", audience_pack=f"tenants/{other}/packs/p"
            )
        ),
        NOT_FOUND,
        "audience_pack",
    )
    await _fails(
        s.CopyCampaign(api.CopyCampaignRequest(name=campaign.name, campaign_id="Copy!", audience_pack=pack)),
        INVALID,
        "campaign_id",
    )
    await _fails(s.LaunchCampaign(api.LaunchCampaignRequest(name="campaigns/x")), INVALID, "name")
    await _fails(
        s.ClaimCoupon(api.ClaimCouponRequest(coupon_template=template.name, user_id=1, campaign=foreign)),
        NOT_FOUND,
        "campaign",
    )
    await _fails(
        s.ClaimCoupon(api.ClaimCouponRequest(coupon_template=template.name, user_id=2**63)),
        INVALID,
        "user_id",
    )
    await _fails(
        s.ClaimCoupon(
            api.ClaimCouponRequest(coupon_template=f"tenants/{tenant}/couponTemplates/nope", user_id=1)
        ),
        NOT_FOUND,
        "coupon_template",
    )
    # redemption amounts, keys and times
    await _fails(redeem(order_amount_fen=-1), INVALID, "order_amount_fen")
    await _fails(redeem(order_amount_fen=0), INVALID, "order_amount_fen")
    await _fails(redeem(order_amount_fen=10**12 + 1), INVALID, "order_amount_fen")
    await _fails(redeem(idempotency_key=""), INVALID, "idempotency_key")
    await _fails(redeem(idempotency_key="has space"), INVALID, "idempotency_key")
    await _fails(redeem(order_id=""), INVALID, "order_id")
    await _fails(redeem(coupon="coupons/x"), INVALID, "coupon")
    await _fails(redeem(order_time=TS(seconds=4_000_000_000)), INVALID, "order_time")
    await _fails(
        s.RefundRedemption(api.RefundRedemptionRequest(coupon=coupon.name, order_id="o", idempotency_key="")),
        INVALID,
        "idempotency_key",
    )
    await _fails(
        s.ListCampaigns(api.ListCampaignsRequest(parent=f"tenants/{tenant}", page_size=-1)),
        INVALID,
        "page_size",
    )
    await _fails(
        s.ListCampaigns(api.ListCampaignsRequest(parent=f"tenants/{tenant}", filter="owner=me")),
        INVALID,
        "filter",
    )
    await _fails(s.ListCampaigns(api.ListCampaignsRequest(parent="tenants")), INVALID, "parent")

    async def drain(request: api.StreamOffersRequest) -> None:
        async for _ in s.StreamOffers(request):
            pass

    await _fails(drain(api.StreamOffersRequest(parent=f"tenants/{tenant}", cursor="abc")), INVALID, "cursor")
    await _fails(
        drain(api.StreamOffersRequest(parent=f"tenants/{tenant}", campaign=foreign)), NOT_FOUND, "campaign"
    )
    assert await counts() == before


async def test_update_campaign_bad_input(rt: Rt, counts: Callable[[], Any]) -> None:
    from google.protobuf import field_mask_pb2

    tenant, other = rt.tenant(), rt.tenant()
    pack = (await rt.audience.upload(tenant, rt.audience.users[:20])).name
    template = await rt.template(tenant, "base")
    start = TS(seconds=2_000_000_000)
    campaign = await rt.campaign(tenant, pack, template.name, "editable", start_time=start)
    name = campaign.name
    before = await counts()
    s = rt.stub

    def update(*paths: str, rule_firing: Any = None, **fields: Any) -> Any:
        fields.setdefault("name", name)
        request = api.UpdateCampaignRequest(
            campaign=campaign_pb2.Campaign(**fields), update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
        if rule_firing is not None:
            request.rule_firing.CopyFrom(rule_firing)
        return s.UpdateCampaign(request)

    # the mask: unknown, immutable / output-only, nested paths, nothing to update
    await _fails(update("budget"), INVALID, "update_mask.paths[0]")
    await _fails(update("display_name", "audience_pack"), INVALID, "update_mask.paths[1]")
    for immutable in ("coupon_template", "arms", "holdout_basis_points", "start_time", "state", "etag"):
        await _fails(update(immutable), INVALID, "update_mask.paths[0]")
    await _fails(update("end_time.seconds"), INVALID, "update_mask.paths[0]")
    await _fails(update(), INVALID, "update_mask")
    # the values, named like CreateCampaign names them
    await _fails(
        update("delivery_rate_per_second", delivery_rate_per_second=-1),
        INVALID,
        "campaign.delivery_rate_per_second",
    )
    await _fails(
        update("delivery_rate_per_second", delivery_rate_per_second=10**7),
        INVALID,
        "campaign.delivery_rate_per_second",
    )
    await _fails(update("loss_cap_fen", loss_cap_fen=-5), INVALID, "campaign.loss_cap_fen")
    await _fails(update("display_name", display_name="x" * 201), INVALID, "campaign.display_name")
    await _fails(update("end_time", end_time=TS(seconds=1_000_000_000)), INVALID, "campaign.end_time")
    await _fails(update("end_time", end_time=TS(seconds=1_999_999_999)), INVALID, "campaign.end_time")
    bad_boost = campaign_pb2.Rule(
        rule_id="b",
        action=campaign_pb2.Rule.ACTION_BOOST,
        metric="roi",
        comparison=campaign_pb2.Rule.COMPARISON_GREATER,
        threshold=1,
    )
    await _fails(update("rules", rules=[bad_boost]), INVALID, "campaign.rules[0].boost_rate_ceiling")
    nan = campaign_pb2.RuleFiring(
        rule_id="b", action=campaign_pb2.Rule.ACTION_BOOST, metrics={"roi": float("nan")}
    )
    await _fails(
        update("display_name", display_name="ok", rule_firing=nan), INVALID, "rule_firing.metrics['roi']"
    )
    # the name
    await _fails(s.UpdateCampaign(api.UpdateCampaignRequest()), INVALID, "campaign")
    await _fails(update("display_name", name="campaigns/x"), INVALID, "campaign.name")
    # other tenants and unknown campaigns are NOT_FOUND; a stale etag is ABORTED
    await _fails(update("display_name", name=f"tenants/{other}/campaigns/editable"), NOT_FOUND)
    await _fails(update("display_name", name=f"tenants/{tenant}/campaigns/nope"), NOT_FOUND)
    await _fails(
        s.UpdateCampaign(
            api.UpdateCampaignRequest(campaign=campaign_pb2.Campaign(name=name, display_name="x")),
            metadata=((AS_TENANT, other),),
        ),
        NOT_FOUND,
    )
    await _fails(
        update("display_name", display_name="x", etag='W/"999"'),
        grpc.StatusCode.ABORTED,
        reason="ETAG_MISMATCH",
    )
    assert await counts() == before


async def test_tenants_cannot_target_a_pack_below_the_minimum(rt: Rt) -> None:
    """A campaign on a 3-member pack would report on three people: refused to tenants."""
    tenant = rt.tenant()
    users = rt.audience.users[:3]
    pack = await rt.audience.upload(tenant, users)
    template = await rt.template(tenant)
    campaign = await rt.campaign(tenant, pack.name, template.name)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rt.stub.LaunchCampaign(
            api.LaunchCampaignRequest(name=campaign.name), metadata=((AS_TENANT, tenant),)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value).reason == "PACK_TOO_SMALL"
    assert (await rt.get(campaign.name)).state == campaign_pb2.Campaign.STATE_DRAFT  # nothing issued
    # The platform's own jobs may (they see members anyway).
    launched = await rt.launch(campaign.name)
    assert launched.progress.processed == len(users)
