"""Main flows over real gRPC, on SQLite and on PostgreSQL, with audiences resolved by a real
audience server: templates, campaigns, launch (LRO), offers, claims, redemptions, refunds,
lifecycle, caps and the report."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import grpc.aio
import numpy as np
import pytest
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.retarget import attribution
from services.retarget import domain as d
from services.retarget import repository as repo
from services.runtime import error_details

from .conftest import Rt

api = retarget_service_pb2
Campaign = campaign_pb2.Campaign
Coupon = coupon_pb2.Coupon


async def expect_error(call, code: grpc.StatusCode, reason: str | None = None):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = error_details(caught.value)
    assert details.code is code, (details.code, details.message)
    if reason is not None:
        assert details.reason == reason, (details.reason, details.message)
    return details


async def invariants_clean(rt: Rt) -> None:
    counts = await rt.sql(repo.ledger_invariants, write=False)
    assert all(value == 0 for value in counts.values()), counts


async def two_arm_campaign(rt: Rt, tenant: str, users: list[int], **fields) -> tuple[Campaign, str, str]:  # type: ignore[no-untyped-def]
    pack = await rt.audience.upload(tenant, users)
    ten = await rt.template(tenant, "ten-off", fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=10))
    pct = await rt.template(
        tenant, "pct-off", percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=3000)
    )
    campaign = await rt.campaign(
        tenant,
        pack.name,
        ten.name,
        arms=[
            campaign_pb2.Arm(arm_id="ten", weight=1),
            campaign_pb2.Arm(arm_id="pct", weight=1, coupon_template=pct.name),
        ],
        offer_item_ids=[1001, 1002],
        **fields,
    )
    return campaign, ten.name, pct.name


# --- templates ---------------------------------------------------------------------------------


async def test_templates_round_trip_and_pages(rt: Rt) -> None:
    tenant = rt.tenant()
    start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 60)
    end = timestamp_pb2.Timestamp(seconds=int(time.time()) + 86_400)
    created = await rt.template(
        tenant,
        "fan-price",
        display_name="thanks for joining, fan price",
        percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=2000),
        min_spend_fen=5000,
        valid_start_time=start,
        valid_end_time=end,
        valid_for=duration_pb2.Duration(seconds=3600),
        applicable_item_ids=[7, 3, 7],
        total_stock=500,
        budget_cap_fen=1_000_000,
        per_user_limit=2,
        refund_policy=coupon_pb2.REFUND_POLICY_VOID,
    )
    assert created.name == f"tenants/{tenant}/couponTemplates/fan-price"
    assert created.percent_off.basis_points == 1500 and created.percent_off.cap_fen == 2000
    assert list(created.applicable_item_ids) == [3, 7]
    assert created.currency_code == "CNY" and created.refund_policy == coupon_pb2.REFUND_POLICY_VOID
    assert created.valid_start_time == start and created.valid_end_time == end
    assert created.valid_for.seconds == 3600 and created.issued_count == 0
    fetched = await rt.stub.GetCouponTemplate(api.GetCouponTemplateRequest(name=created.name))
    assert fetched == created
    await expect_error(
        rt.template(tenant, "fan-price"), grpc.StatusCode.ALREADY_EXISTS, "COUPON_TEMPLATE_ALREADY_EXISTS"
    )
    for i in range(4):
        await rt.template(tenant, f"more-{i}")
    names, token = [], ""
    while True:
        page = await rt.stub.ListCouponTemplates(
            api.ListCouponTemplatesRequest(parent=f"tenants/{tenant}", page_size=2, page_token=token)
        )
        names += [t.name for t in page.coupon_templates]
        token = page.next_page_token
        if not token:
            break
    assert len(names) == 5 == len(set(names))
    # a token is bound to its query
    first = await rt.stub.ListCouponTemplates(
        api.ListCouponTemplatesRequest(parent=f"tenants/{tenant}", page_size=1)
    )
    details = await expect_error(
        rt.stub.ListCouponTemplates(
            api.ListCouponTemplatesRequest(parent=f"tenants/{rt.tenant()}", page_token=first.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.field_violations[0][0] == "page_token"


# --- launch ------------------------------------------------------------------------------------


async def test_launch_issues_once_per_member_with_arms_and_holdout(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[:3000]
    campaign, _, _ = await two_arm_campaign(rt, tenant, users, holdout_basis_points=1000)
    assert campaign.state == Campaign.STATE_DRAFT
    operation = await rt.stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name))
    assert operation.name == f"{campaign.name}/operations/launch"
    done = await rt.ops.WaitOperation(
        operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=60))
    )
    assert done.done and not done.HasField("error")
    finished = Campaign()
    done.response.Unpack(finished)
    progress = finished.progress
    assert finished.state == Campaign.STATE_COMPLETED
    assert progress.audience_size == progress.processed == 3000
    assert (
        progress.issued + progress.held_out == 3000 and progress.skipped == 0 and progress.stop_reason == ""
    )
    assert 200 < progress.held_out < 400  # 10% holdout

    # assignment is the deterministic hash, recomputable from the campaign's seed
    def members(tx):  # type: ignore[no-untyped-def]
        row = repo.get_campaign(tx, tenant, campaign.name.rsplit("/", 1)[1])
        rows = tx.all(
            "SELECT user_id, arm_id, holdout FROM campaign_members WHERE campaign_pk = ? ORDER BY user_id",
            (row["id"],),
        )
        return row, rows

    row, rows = await rt.sql(members, write=False)
    arm_index, holdout = d.assign_arms(np.asarray(users), row["hash_seed"], 1000, [1, 1])
    expected = ["holdout" if h else ("ten", "pct")[a] for a, h in zip(arm_index, holdout, strict=True)]
    assert [r["arm_id"] for r in rows] == expected
    split = Counter(expected)
    assert abs(split["ten"] - split["pct"]) < 250

    # launching again is the same operation and issues nothing more
    again = await rt.stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name))
    assert again.done and again.name == operation.name
    assert (await rt.get(campaign.name)).progress.issued == progress.issued

    # offers: one per issued coupon, resumable from any cursor
    offers = [o async for o in rt.stub.StreamOffers(api.StreamOffersRequest(parent=f"tenants/{tenant}"))]
    assert len(offers) == progress.issued == len({o.user_id for o in offers})
    assert {o.user_id for o in offers} == {u for u, e in zip(users, expected, strict=True) if e != "holdout"}
    assert all(list(o.item_ids) == [1001, 1002] and o.campaign == campaign.name for o in offers)
    middle = offers[len(offers) // 2].cursor
    rest = [
        o
        async for o in rt.stub.StreamOffers(
            api.StreamOffersRequest(parent=f"tenants/{tenant}", cursor=middle)
        )
    ]
    assert [o.cursor for o in rest] == [o.cursor for o in offers[len(offers) // 2 + 1 :]]

    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    by_arm = {a.arm_id: a for a in report.arms}
    assert [a.arm_id for a in report.arms] == ["ten", "pct", "holdout"]
    assert by_arm["ten"].targeted == by_arm["ten"].delivered == split["ten"]
    assert by_arm["holdout"].targeted == split["holdout"] and by_arm["holdout"].delivered == 0
    # worst case loss: every outstanding coupon used at face value (10 fen, or the 3000 fen cap)
    assert report.projected_loss_fen == split["ten"] * 10 + split["pct"] * 3000
    await invariants_clean(rt)


async def test_launch_of_a_spec_pack_clickers_not_buyers(rt: Rt) -> None:
    """The seed story's audience: clicked a live-room item in the sale hour and did not pay."""
    tenant = rt.tenant()
    sale = rt.audience.world["sale"]
    window = {"absolute": {"startTime": sale["start"], "endTime": sale["end"]}}
    spec = {
        "exclude": {
            "base": {
                "shortcut": {
                    "kind": "KIND_CLICKERS",
                    "window": window,
                    "filter": {"itemIds": sale["live_item_ids"]},
                }
            },
            "subtract": [{"shortcut": {"kind": "KIND_PURCHASERS", "window": window}}],
        }
    }
    pack = await rt.audience.spec_pack(tenant, spec)
    assert pack.size > 100
    template = await rt.template(tenant, fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=10))
    campaign = await rt.campaign(tenant, pack.name, template.name)
    finished = await rt.launch(campaign.name)
    assert finished.state == Campaign.STATE_COMPLETED
    assert finished.progress.processed == finished.progress.issued == pack.size
    assert [a.arm_id for a in finished.arms] == ["control"]
    await invariants_clean(rt)


async def test_caps_stop_issuing_and_every_member_is_processed(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[3000:3600]
    pack = await rt.audience.upload(tenant, users)
    stock = await rt.template(tenant, total_stock=100)
    budget = await rt.template(
        tenant, fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=500), budget_cap_fen=20_000
    )
    plenty = await rt.template(tenant, fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=1000))
    # someone already holds the plenty coupon: the per-user limit skips them at launch
    await rt.stub.ClaimCoupon(api.ClaimCouponRequest(coupon_template=plenty.name, user_id=users[0]))

    by_stock = await rt.launch((await rt.campaign(tenant, pack.name, stock.name)).name)
    assert by_stock.progress.issued == 100 and by_stock.progress.skipped == 500
    assert by_stock.progress.stop_reason.startswith("OUT_OF_STOCK")
    by_budget = await rt.launch((await rt.campaign(tenant, pack.name, budget.name)).name)
    assert by_budget.progress.issued == 40 and by_budget.progress.stop_reason.startswith("BUDGET_EXHAUSTED")
    by_loss = await rt.launch((await rt.campaign(tenant, pack.name, plenty.name, loss_cap_fen=55_500)).name)
    assert by_loss.progress.issued == 55 and by_loss.progress.stop_reason.startswith("LOSS_CAP")
    for finished in (by_stock, by_budget, by_loss):
        assert finished.state == Campaign.STATE_COMPLETED and finished.progress.processed == 600
    limited = await rt.launch((await rt.campaign(tenant, pack.name, plenty.name)).name)
    # users[0] and the 55 loss-capped recipients already hold their one coupon of this template
    assert (
        limited.progress.issued == 544
        and limited.progress.skipped == 56
        and limited.progress.stop_reason == ""
    )
    for name, issued in ((stock.name, 100), (budget.name, 40)):
        template = await rt.stub.GetCouponTemplate(api.GetCouponTemplateRequest(name=name))
        assert template.issued_count == issued
    await invariants_clean(rt)


# --- claims, redemptions, refunds --------------------------------------------------------------


async def _member_coupon(rt: Rt, tenant: str, campaign: Campaign, arm: str) -> tuple[int, str]:
    def find(tx):  # type: ignore[no-untyped-def]
        row = repo.get_campaign(tx, tenant, campaign.name.rsplit("/", 1)[1])
        return tx.one(
            "SELECT user_id, coupon_id FROM campaign_members WHERE campaign_pk = ? AND arm_id = ?"
            " ORDER BY user_id LIMIT 1",
            (row["id"], arm),
        )

    member = await rt.sql(find, write=False)
    return member["user_id"], d.coupon_name(tenant, member["coupon_id"])


async def test_claim_redeem_replay_refund(rt: Rt) -> None:
    tenant = rt.tenant()
    campaign, _ten, pct = await two_arm_campaign(rt, tenant, rt.audience.users[4000:4400])
    await rt.launch(campaign.name)
    user, coupon = await _member_coupon(rt, tenant, campaign, "pct")

    # a member claims the coupon delivered to them: no stock moves, a retry returns it again
    claim = api.ClaimCouponRequest(
        coupon_template=pct, user_id=user, campaign=campaign.name, request_id="claim-1"
    )
    claimed = await rt.stub.ClaimCoupon(claim)
    assert claimed.name == coupon and claimed.arm == "pct" and claimed.state == Coupon.STATE_ISSUED
    assert (await rt.stub.ClaimCoupon(claim)).name == coupon
    await expect_error(
        rt.stub.ClaimCoupon(
            api.ClaimCouponRequest(coupon_template=pct, user_id=user, campaign=campaign.name)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PER_USER_LIMIT",
    )

    # 15% of 8,999 fen floors to 1,349
    request = api.RedeemCouponRequest(
        coupon=coupon,
        user_id=user,
        order_id="o-1",
        order_amount_fen=8999,
        item_ids=[1001],
        idempotency_key="k-1",
    )
    first = await rt.stub.RedeemCoupon(request)
    assert (first.discount_fen, first.payable_fen, first.replayed) == (1349, 7650, False)
    assert first.coupon.state == Coupon.STATE_REDEEMED and first.coupon.order_id == "o-1"
    replay = await rt.stub.RedeemCoupon(request)
    assert replay.replayed and (replay.discount_fen, replay.payable_fen, replay.coupon) == (
        first.discount_fen,
        first.payable_fen,
        first.coupon,
    )
    changed = api.RedeemCouponRequest()
    changed.CopyFrom(request)
    changed.order_amount_fen = 9000
    details = await expect_error(
        rt.stub.RedeemCoupon(changed), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"
    )
    assert "k-1" in details.message and details.error_info.metadata["field"] == "idempotency_key"
    other_key = api.RedeemCouponRequest()
    other_key.CopyFrom(request)
    other_key.idempotency_key, other_key.order_id = "k-2", "o-2"
    await expect_error(
        rt.stub.RedeemCoupon(other_key), grpc.StatusCode.FAILED_PRECONDITION, "COUPON_ALREADY_REDEEMED"
    )

    # refund under RELEASE: usable again; the refund is idempotent too
    refund = api.RefundRedemptionRequest(coupon=coupon, order_id="o-1", idempotency_key="r-1")
    released = await rt.stub.RefundRedemption(refund)
    assert released.state == Coupon.STATE_ISSUED and released.order_id == ""
    assert (await rt.stub.RefundRedemption(refund)) == released
    await expect_error(
        rt.stub.RefundRedemption(
            api.RefundRedemptionRequest(coupon=coupon, order_id="o-1", idempotency_key="r-2")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COUPON_NOT_REDEEMED",
    )
    again = await rt.stub.RedeemCoupon(other_key)
    assert not again.replayed and again.coupon.order_id == "o-2"
    # the first key still replays its first result
    assert (await rt.stub.RedeemCoupon(request)).replayed

    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    by_arm = {a.arm_id: a for a in report.arms}
    assert by_arm["pct"].claimed == 1 and by_arm["pct"].redeemed == 1
    assert by_arm["pct"].orders == 1 and by_arm["pct"].revenue_fen == 8999  # the refunded order is gone
    assert by_arm["pct"].coupon_cost_fen == 1349 and report.coupon_cost_fen == 1349
    await invariants_clean(rt)


async def test_refund_under_void_policy(rt: Rt) -> None:
    tenant = rt.tenant()
    template = await rt.template(tenant, refund_policy=coupon_pb2.REFUND_POLICY_VOID, min_spend_fen=2000)
    coupon = await rt.stub.ClaimCoupon(api.ClaimCouponRequest(coupon_template=template.name, user_id=5))
    redeemed = await rt.stub.RedeemCoupon(
        api.RedeemCouponRequest(
            coupon=coupon.name, user_id=5, order_id="o", order_amount_fen=2000, idempotency_key="k"
        )
    )
    assert (redeemed.discount_fen, redeemed.payable_fen) == (1000, 1000)
    voided = await rt.stub.RefundRedemption(
        api.RefundRedemptionRequest(coupon=coupon.name, order_id="o", idempotency_key="r")
    )
    assert voided.state == Coupon.STATE_VOID
    await expect_error(
        rt.stub.RedeemCoupon(
            api.RedeemCouponRequest(
                coupon=coupon.name, user_id=5, order_id="o2", order_amount_fen=3000, idempotency_key="k2"
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COUPON_VOID",
    )


async def test_redemption_refusals_and_money_math(rt: Rt) -> None:
    tenant = rt.tenant()
    now = int(time.time())

    async def coupon_of(user: int, **fields) -> str:  # type: ignore[no-untyped-def]
        template = await rt.template(tenant, **fields)
        return (
            await rt.stub.ClaimCoupon(api.ClaimCouponRequest(coupon_template=template.name, user_id=user))
        ).name

    def redeem(coupon: str, user: int, amount: int, key: str, items=(), order_time=None):  # type: ignore[no-untyped-def]
        request = api.RedeemCouponRequest(
            coupon=coupon,
            user_id=user,
            order_id=f"o-{key}",
            order_amount_fen=amount,
            item_ids=items,
            idempotency_key=key,
        )
        if order_time is not None:
            request.order_time.CopyFrom(timestamp_pb2.Timestamp(seconds=order_time))
        return rt.stub.RedeemCoupon(request)

    short = await coupon_of(1, valid_for=duration_pb2.Duration(seconds=1))
    await expect_error(
        redeem(short, 1, 5000, "exp", order_time=now + 3),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COUPON_EXPIRED",
    )
    minimum = await coupon_of(2, min_spend_fen=10_000)
    details = await expect_error(
        redeem(minimum, 2, 9_999, "min"), grpc.StatusCode.FAILED_PRECONDITION, "MIN_SPEND_NOT_MET"
    )
    assert details.precondition_failure.violations[0].type == "MIN_SPEND_NOT_MET"
    items = await coupon_of(3, applicable_item_ids=[42])
    await expect_error(
        redeem(items, 3, 5000, "item", items=[41]), grpc.StatusCode.FAILED_PRECONDITION, "ITEM_NOT_APPLICABLE"
    )
    assert (await redeem(items, 3, 5000, "item-ok", items=[41, 42])).discount_fen == 1000
    # someone else's coupon, or a coupon named under another tenant, is NOT_FOUND
    mine = await coupon_of(4)
    await expect_error(redeem(mine, 99, 5000, "foreign"), grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND")
    elsewhere = mine.replace(f"tenants/{tenant}/", f"tenants/{rt.tenant()}/")
    await expect_error(redeem(elsewhere, 4, 5000, "tenant"), grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND")
    # money: floor of the percentage, the cap, never more than the order
    floor = await coupon_of(6, percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=10_000))
    assert (await redeem(floor, 6, 999, "floor")).discount_fen == 149
    capped = await coupon_of(7, percent_off=coupon_pb2.PercentOff(basis_points=5000, cap_fen=100))
    assert (await redeem(capped, 7, 10_000, "cap")).discount_fen == 100
    whole = await coupon_of(8, fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=1000))
    response = await redeem(whole, 8, 600, "whole")
    assert (response.discount_fen, response.payable_fen) == (600, 0)
    free = await coupon_of(9, percent_off=coupon_pb2.PercentOff(basis_points=10_000, cap_fen=50_000))
    assert (await redeem(free, 9, 12_345, "free")).payable_fen == 0


async def test_limited_stock_claims(rt: Rt) -> None:
    tenant = rt.tenant()
    template = await rt.template(tenant, total_stock=5, per_user_limit=2)

    def claim(user: int, request_id: str = ""):  # type: ignore[no-untyped-def]
        return rt.stub.ClaimCoupon(
            api.ClaimCouponRequest(coupon_template=template.name, user_id=user, request_id=request_id)
        )

    a1, a2 = await claim(1, "a1"), await claim(1, "a2")
    assert a1.name != a2.name
    await expect_error(claim(1, "a3"), grpc.StatusCode.RESOURCE_EXHAUSTED, "PER_USER_LIMIT")
    for user in (2, 3, 4):
        await claim(user)
    details = await expect_error(claim(5, "late"), grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_STOCK")
    assert details.quota_failure.violations[0].subject == template.name
    # after the sell-out, a retried claim still gets its coupon back; a reused id is refused
    assert (await claim(1, "a1")).name == a1.name
    await expect_error(claim(2, "a1"), grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    fetched = await rt.stub.GetCouponTemplate(api.GetCouponTemplateRequest(name=template.name))
    assert fetched.issued_count == 5 and fetched.issued_value_fen == 5000
    await invariants_clean(rt)


# --- lifecycle ---------------------------------------------------------------------------------


async def test_pause_resume_cancel_copy_and_list(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[5000:5300]
    campaign, ten, _ = await two_arm_campaign(rt, tenant, users)
    with_claims = api.ClaimCouponRequest(coupon_template=ten, user_id=10**9, campaign=campaign.name)
    await expect_error(
        rt.stub.ClaimCoupon(with_claims), grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_NOT_LAUNCHED"
    )
    await rt.launch(campaign.name)
    paused = await rt.stub.PauseCampaign(api.PauseCampaignRequest(name=campaign.name, reason="stock check"))
    assert paused.state == Campaign.STATE_PAUSED
    await expect_error(
        rt.stub.ClaimCoupon(with_claims), grpc.StatusCode.FAILED_PRECONDITION, "CAMPAIGN_PAUSED"
    )
    await expect_error(
        rt.stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAMPAIGN_STATE_CONFLICT",
    )
    resumed = await rt.stub.ResumeCampaign(api.ResumeCampaignRequest(name=campaign.name))
    assert resumed.state == Campaign.STATE_COMPLETED  # the launch had finished
    outsider = await rt.stub.ClaimCoupon(with_claims)  # not in the audience: takes one from stock
    assert outsider.arm == "" and outsider.campaign == campaign.name

    copy = await rt.stub.CopyCampaign(
        api.CopyCampaignRequest(name=campaign.name, campaign_id="copy-1", audience_pack=resumed.audience_pack)
    )
    assert copy.state == Campaign.STATE_DRAFT and copy.name == f"tenants/{tenant}/campaigns/copy-1"
    assert [(a.arm_id, a.weight, a.coupon_template) for a in copy.arms] == [
        (a.arm_id, a.weight, a.coupon_template) for a in resumed.arms
    ]
    cancelled = await rt.stub.CancelCampaign(api.CancelCampaignRequest(name=campaign.name))
    assert cancelled.state == Campaign.STATE_CANCELLED
    user, coupon = await _member_coupon(rt, tenant, campaign, "ten")
    await expect_error(
        rt.stub.RedeemCoupon(
            api.RedeemCouponRequest(
                coupon=coupon, user_id=user, order_id="o", order_amount_fen=100, idempotency_key="k"
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "COUPON_VOID",
    )
    await expect_error(
        rt.stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAMPAIGN_STATE_CONFLICT",
    )
    operation = await rt.ops.GetOperation(
        operations_pb2.GetOperationRequest(name=f"{campaign.name}/operations/launch")
    )
    assert operation.done and operation.error.code == grpc.StatusCode.CANCELLED.value[0]

    third = await rt.campaign(tenant, resumed.audience_pack, ten)
    listed = await rt.stub.ListCampaigns(api.ListCampaignsRequest(parent=f"tenants/{tenant}", page_size=2))
    assert [c.name for c in listed.campaigns] == [third.name, copy.name]  # newest first
    rest = await rt.stub.ListCampaigns(
        api.ListCampaignsRequest(parent=f"tenants/{tenant}", page_size=2, page_token=listed.next_page_token)
    )
    assert [c.name for c in rest.campaigns] == [campaign.name] and not rest.next_page_token
    drafts = await rt.stub.ListCampaigns(
        api.ListCampaignsRequest(parent=f"tenants/{tenant}", filter="state=DRAFT")
    )
    assert {c.name for c in drafts.campaigns} == {third.name, copy.name}

    def audit(tx):  # type: ignore[no-untyped-def]
        return [row["action"] for row in repo.audit_entries(tx, tenant, campaign.name)]

    assert await rt.sql(audit, write=False) == ["create", "launch", "complete", "pause", "resume", "cancel"]
    await invariants_clean(rt)


async def test_stream_offers_follow_mode(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[6000:7000]
    campaign, _, _ = await two_arm_campaign(rt, tenant, users)
    received: list[api.Offer] = []

    async def follow() -> None:
        call = rt.stub.StreamOffers(
            api.StreamOffersRequest(parent=f"tenants/{tenant}", campaign=campaign.name, follow=True)
        )
        async for offer in call:
            received.append(offer)
            if len(received) == len(users):
                call.cancel()
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # the stream is open and waiting before anything is issued
    await rt.launch(campaign.name)
    await asyncio.wait_for(follower, 30)
    assert sorted(o.user_id for o in received) == sorted(users)
    assert [int(o.cursor) for o in received] == sorted(int(o.cursor) for o in received)


async def test_report_uplift_against_holdout(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[8000:12000]
    campaign, _, _ = await two_arm_campaign(rt, tenant, users, holdout_basis_points=2000)
    finished = await rt.launch(campaign.name)

    def members(tx):  # type: ignore[no-untyped-def]
        row = repo.get_campaign(tx, tenant, campaign.name.rsplit("/", 1)[1])
        return tx.all(
            "SELECT user_id, arm_id, coupon_id FROM campaign_members WHERE campaign_pk = ? ORDER BY user_id",
            (row["id"],),
        )

    rows = await rt.sql(members, write=False)
    rate = {"ten": 5, "pct": 4, "holdout": 20}  # every 5th / 4th / 20th member buys
    orders, redeemed = [], []
    base = int(time.time() * 1_000_000)
    for i, row in enumerate(rows):
        if i % rate[row["arm_id"]] == 0:
            if row["coupon_id"]:
                redeemed.append(row)
            else:
                orders.append(attribution.OrderFact(f"h-{row['user_id']}", row["user_id"], 10_000, base))
    await rt.sql(attribution.record_orders, tenant, orders, base)
    for row in redeemed:
        await rt.stub.RedeemCoupon(
            api.RedeemCouponRequest(
                coupon=d.coupon_name(tenant, row["coupon_id"]),
                user_id=row["user_id"],
                order_id=f"r-{row['user_id']}",
                order_amount_fen=10_000,
                idempotency_key=f"r-{row['user_id']}",
            )
        )
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    by_arm = {a.arm_id: a for a in report.arms}
    holdout = by_arm["holdout"]
    assert holdout.targeted == finished.progress.held_out and holdout.orders == len(orders)
    for arm_id, cost in (("ten", 10), ("pct", 1500)):
        arm = by_arm[arm_id]
        assert arm.redeemed == arm.orders and arm.revenue_fen == arm.orders * 10_000
        assert arm.coupon_cost_fen == arm.orders * cost
        assert arm.roi == pytest.approx((arm.revenue_fen - arm.coupon_cost_fen) / arm.coupon_cost_fen)
        assert arm.conversion_rate == pytest.approx(arm.orders / arm.targeted)
        assert arm.uplift_vs_holdout == pytest.approx(arm.conversion_rate - holdout.conversion_rate)
        assert arm.uplift_vs_holdout > 0.1 and arm.p_value < 1e-6
    assert report.revenue_fen == by_arm["ten"].revenue_fen + by_arm["pct"].revenue_fen
    assert holdout.p_value == 1.0
    assert report.projected_loss_fen >= report.coupon_cost_fen


async def test_simulated_responses_feed_the_report(rt: Rt) -> None:
    """The demo's simulation (generator behaviour model) through the service's own RPCs; its pay
    and refund events through what the order feed commits (the demo sends them via IngestEvents)."""
    from services.demo.simulate import simulate_responses
    from services.events.dataset import EventDataset
    from services.retarget.attribution import checkpoint
    from services.retarget.order_feed import apply_messages
    from services.storage import LocalObjectStore

    async def publish(events) -> None:  # type: ignore[no-untyped-def]
        done, _ = await rt.sql(checkpoint, repo.ORDER_FEED, write=False)
        await rt.sql(apply_messages, [(done + 1, events)], d.now_us())

    tenant = rt.tenant()
    campaign, _, _ = await two_arm_campaign(
        rt, tenant, rt.audience.users[12000:18000], holdout_basis_points=2000
    )
    await rt.launch(campaign.name)
    sale = rt.audience.world["sale"]
    dataset = EventDataset(LocalObjectStore(rt.audience.store_url))
    summary = await simulate_responses(
        publish=publish,
        stub=rt.stub,
        database=rt.app.db,
        dataset=dataset,
        campaign=campaign.name,
        item_id=sale["retarget_item_id"],
        item_price_fen=sale["retarget_price_fen"],
        item_category_id=1,
        seed=3,
    )
    assert (
        summary.members == 6000
        and summary.claimed > 0
        and summary.redeemed > 0
        and summary.holdout_orders > 0
    )
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    by_arm = {a.arm_id: a for a in report.arms}
    assert sum(a.claimed for a in report.arms) == summary.claimed
    assert sum(a.redeemed for a in report.arms) == summary.redeemed - summary.refunded
    assert by_arm["holdout"].orders == summary.holdout_orders
    treated_orders = by_arm["ten"].orders + by_arm["pct"].orders
    assert treated_orders == summary.redeemed - summary.refunded + summary.orders_without_coupon
    assert report.coupon_cost_fen == sum(a.coupon_cost_fen for a in report.arms)
    assert 0.0 <= by_arm["pct"].p_value <= 1.0
    await invariants_clean(rt)


async def test_paced_launch_and_a_launch_that_fails_loudly(rt: Rt) -> None:
    """delivery_rate_per_second paces issuing; a pack gone while paused fails the resumed launch
    with the reason in the progress and the operation, and ResumeCampaign can retry it."""
    from flashcrowd.audience.v1 import audience_service_pb2

    tenant = rt.tenant()
    users = rt.audience.users[18000:19500]
    pack = await rt.audience.upload(tenant, users)
    template = await rt.template(tenant)
    campaign = await rt.campaign(tenant, pack.name, template.name, delivery_rate_per_second=500)
    started = time.monotonic()
    await rt.launch(campaign.name, wait=False)
    await asyncio.sleep(1.0)
    paused = await rt.stub.PauseCampaign(api.PauseCampaignRequest(name=campaign.name, reason="check"))
    elapsed = time.monotonic() - started
    assert 0 < paused.progress.issued <= 500 * elapsed + 500  # one batch of slack
    assert paused.progress.issued < len(users)
    await rt.audience.stub.DeletePack(audience_service_pb2.DeletePackRequest(name=pack.name))
    await rt.stub.ResumeCampaign(api.ResumeCampaignRequest(name=campaign.name))
    failed = await rt.wait_state(campaign.name, (Campaign.STATE_PAUSED,), timeout=30)
    assert failed.progress.stop_reason.startswith("LAUNCH_FAILED: PACK_NOT_FOUND"), failed.progress
    operation = await rt.ops.GetOperation(
        operations_pb2.GetOperationRequest(name=f"{campaign.name}/operations/launch")
    )
    assert operation.done and operation.error.code == grpc.StatusCode.ABORTED.value[0]
    assert "PACK_NOT_FOUND" in operation.error.message
    assert (await rt.get(campaign.name)).progress.issued == failed.progress.issued  # nothing more issued
    await invariants_clean(rt)


async def test_a_dead_owners_launch_is_taken_over_when_its_lease_expires(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[19500:20000]
    pack = await rt.audience.upload(tenant, users)
    template = await rt.template(tenant)
    campaign = await rt.campaign(tenant, pack.name, template.name)
    campaign_id = campaign.name.rsplit("/", 1)[1]

    def orphan(tx):  # type: ignore[no-untyped-def]
        """A launch started by a process on another host that died right away."""
        now = d.now_us()
        row, _ = repo.start_launch(tx, tenant, campaign_id, pack.version, pack.size, now)
        assert repo.acquire_lease(tx, row["id"], "other-host", now, 1_500_000) is not None
        return row["id"]

    pk = await rt.sql(orphan)
    started = time.monotonic()
    rt.app.launcher.ensure(pk)  # what a restarting server does for every RUNNING campaign
    finished = await rt.wait_state(campaign.name, (Campaign.STATE_COMPLETED,), timeout=30)
    assert time.monotonic() - started >= 1.0  # it waited for the lease to expire
    assert finished.progress.processed == finished.progress.issued == len(users)
    await invariants_clean(rt)
