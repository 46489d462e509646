"""Attribution of orders from events: windows, refunds, duplicates, overlapping campaigns, the
coupon path, and the report against an independent polars computation over the same events.

Events go through ``order_feed.apply_messages`` (what the feed commits per fetched group) on the
real ledger (SQLite and PostgreSQL); tests/retarget/test_order_feed.py runs the feed itself over
NATS with two replicas.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pytest
from flashcrowd.retarget.v1 import campaign_pb2, retarget_service_pb2
from google.protobuf import duration_pb2

from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER, EventType
from services.events.sharding import bucket_of
from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.attribution import checkpoint
from services.retarget.order_feed import apply_messages

from .conftest import Rt
from .test_flows import two_arm_campaign

api = retarget_service_pb2
HOUR = 3_600_000_000


def _events(rows: list[tuple[str, int, int, int, int, int]]) -> pl.DataFrame:
    """``(owner, kind, user, order_id, amount_fen, ts_us)`` rows -> an events frame."""
    return pl.DataFrame(
        {
            "event_id": list(range(1, len(rows) + 1)),
            "user_id": [r[2] for r in rows],
            "bucket": [bucket_of(r[2]) for r in rows],
            "ts": [datetime.fromtimestamp(r[5] / 1e6, UTC) for r in rows],
            "event_type": [r[1] for r in rows],
            "item_id": [1001] * len(rows),
            "category_id": [None] * len(rows),
            "campaign_id": [None] * len(rows),
            "video_id": [None] * len(rows),
            "order_id": [r[3] for r in rows],
            "amount_fen": [r[4] for r in rows],
            "owner": [r[0] for r in rows],
        },
        schema=EVENTS_SCHEMA,
    )


async def _apply(rt: Rt, *frames: pl.DataFrame) -> None:
    """Each frame as one stream message past the ledger's checkpoint, in one feed transaction."""
    done, _ = await rt.sql(checkpoint, repo.ORDER_FEED, write=False)
    await rt.sql(apply_messages, [(done + 1 + i, f) for i, f in enumerate(frames)], d.now_us())


async def _members(rt: Rt, tenant: str, campaign: str) -> list[dict[str, Any]]:
    def read(tx):  # type: ignore[no-untyped-def]
        row = repo.get_campaign(tx, tenant, campaign.rsplit("/", 1)[1])
        return tx.all(
            "SELECT user_id, arm_id, coupon_id, process_us FROM campaign_members WHERE campaign_pk = ?"
            " ORDER BY user_id",
            (row["id"],),
        )

    return await rt.sql(read, write=False)


async def _report(rt: Rt, campaign: str) -> dict[str, campaign_pb2.ArmFunnel]:
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign))
    return {a.arm_id: a for a in report.arms}


def _order_ids() -> Any:
    base = int(np.random.default_rng().integers(1, 2**40)) << 20
    return iter(range(base, base + 2**20))


async def test_windows_refunds_duplicates_owners_and_the_coupon_path(rt: Rt) -> None:
    tenant, other = rt.tenant(), rt.tenant()
    users = rt.audience.users[1000:1600]
    window = duration_pb2.Duration(seconds=3600)
    campaign, _, _ = await two_arm_campaign(
        rt, tenant, users, holdout_basis_points=2000, attribution_window=window
    )
    assert campaign.attribution_window.seconds == 3600
    await rt.launch(campaign.name)
    members = await _members(rt, tenant, campaign.name)
    treated = [m for m in members if m["arm_id"] != d.HOLDOUT_ARM]
    held = [m for m in members if m["arm_id"] == d.HOLDOUT_ARM]
    ids = _order_ids()
    a, b, c, e, f, g = treated[:6]
    h = held[0]
    o = {name: next(ids) for name in ("in", "late", "early", "dup", "refund", "other", "hold", "coupon")}
    pay, refund = int(EventType.PAY), int(EventType.REFUND)
    first = _events(
        [
            (PLATFORM_OWNER, pay, a["user_id"], o["in"], 5000, a["process_us"] + HOUR // 2),
            (PLATFORM_OWNER, pay, b["user_id"], o["late"], 5000, b["process_us"] + 2 * HOUR),
            (PLATFORM_OWNER, pay, c["user_id"], o["early"], 5000, c["process_us"] - 1),
            (PLATFORM_OWNER, pay, e["user_id"], o["dup"], 7000, e["process_us"] + 10),
            (PLATFORM_OWNER, pay, f["user_id"], o["refund"], 9000, f["process_us"] + 10),
            (other, pay, g["user_id"], o["other"], 9000, g["process_us"] + 10),  # another tenant's event
            (PLATFORM_OWNER, pay, h["user_id"], o["hold"], 4000, h["process_us"] + 10),
        ]
    )
    again = _events([(PLATFORM_OWNER, pay, e["user_id"], o["dup"], 7000, e["process_us"] + 10)])
    # the refund arrives after the window has closed: it still undoes the order
    late_refund = _events(
        [(PLATFORM_OWNER, refund, f["user_id"], o["refund"], 9000, f["process_us"] + 3 * HOUR)]
    )
    await _apply(rt, first, again, late_refund)
    await _apply(rt, again)  # a later message repeating the payment changes nothing either
    by_arm = await _report(rt, campaign.name)
    treated_orders = sum(by_arm[arm].orders for arm in ("ten", "pct"))
    treated_revenue = sum(by_arm[arm].revenue_fen for arm in ("ten", "pct"))
    assert treated_orders == 2 and treated_revenue == 12_000  # "in" and "dup", once
    assert sum(by_arm[arm].refunded_orders for arm in ("ten", "pct")) == 1
    assert by_arm["holdout"].orders == 1 and by_arm["holdout"].revenue_fen == 4000
    assert by_arm["holdout"].converters == 1

    # A redemption and the pay event of the same order count once.
    coupon = d.coupon_name(tenant, a["coupon_id"])
    await rt.stub.RedeemCoupon(
        api.RedeemCouponRequest(
            coupon=coupon,
            user_id=a["user_id"],
            order_id=str(o["coupon"]),
            order_amount_fen=20_000,
            item_ids=[1001],
            idempotency_key=f"k-{o['coupon']}",
        )
    )
    await _apply(rt, _events([(PLATFORM_OWNER, pay, a["user_id"], o["coupon"], 20_000, d.now_us())]))
    after = await _report(rt, campaign.name)
    arm = a["arm_id"]
    assert after[arm].orders == by_arm[arm].orders + 1
    assert after[arm].revenue_fen == by_arm[arm].revenue_fen + 20_000
    assert after[arm].converters == by_arm[arm].converters  # a converted already


async def test_last_touch_across_overlapping_campaigns_of_a_tenant(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[2000:2400]
    first, _, _ = await two_arm_campaign(rt, tenant, users)
    await rt.launch(first.name)
    pack = await rt.audience.upload(tenant, users[:200])
    template = await rt.template(tenant)
    second = await rt.campaign(tenant, pack.name, template.name)
    await rt.launch(second.name)
    both = {m["user_id"]: m for m in await _members(rt, tenant, second.name)}
    only_first = [m for m in await _members(rt, tenant, first.name) if m["user_id"] not in both]
    ids = _order_ids()
    pay = int(EventType.PAY)
    rows = [
        (PLATFORM_OWNER, pay, u, next(ids), 1000, m["process_us"] + 5) for u, m in list(both.items())[:30]
    ]
    rows += [
        (PLATFORM_OWNER, pay, m["user_id"], next(ids), 1000, m["process_us"] + 5) for m in only_first[:20]
    ]
    await _apply(rt, _events(rows))
    assert sum(a.orders for a in (await _report(rt, second.name)).values()) == 30  # the later touch wins
    assert sum(a.orders for a in (await _report(rt, first.name)).values()) == 20


@pytest.mark.parametrize("seed", [1, 2])
async def test_report_equals_an_independent_polars_computation(rt: Rt, seed: int) -> None:
    """Random payments and refunds around the window; polars recomputes every arm's figures."""
    tenant = rt.tenant()
    users = rt.audience.users[seed * 1000 : seed * 1000 + 800]
    campaign, _, _ = await two_arm_campaign(
        rt, tenant, users, holdout_basis_points=3000, attribution_window=duration_pb2.Duration(seconds=3600)
    )
    await rt.launch(campaign.name)
    members = pl.DataFrame(await _members(rt, tenant, campaign.name)).select(
        "user_id", "arm_id", "process_us"
    )
    rng = np.random.default_rng(seed)
    ids = _order_ids()
    rows = []
    for user, process_us in zip(members["user_id"], members["process_us"], strict=True):
        for _ in range(int(rng.poisson(0.6))):
            order, ts = next(ids), int(process_us + rng.integers(-HOUR // 2, 2 * HOUR))
            amount = int(rng.integers(100, 50_000))
            rows.append((PLATFORM_OWNER, int(EventType.PAY), int(user), order, amount, ts))
            if rng.random() < 0.15:
                rows.append(
                    (
                        PLATFORM_OWNER,
                        int(EventType.REFUND),
                        int(user),
                        order,
                        amount,
                        ts + int(rng.integers(1, 4 * HOUR)),
                    )
                )
    events = _events(rows)
    order = rng.permutation(events.height)  # refunds may arrive before their payment
    refunds_first = events[order]
    chunks = [refunds_first[i : i + 97] for i in range(0, events.height, 97)]
    await _apply(rt, *chunks)

    pays = events.filter(pl.col("event_type") == int(EventType.PAY))
    refunded = events.filter(pl.col("event_type") == int(EventType.REFUND))["order_id"]
    # A refund seen before its payment keeps the payment out; after it, undoes it: either way out.
    kept = (
        pays.filter(~pl.col("order_id").is_in(refunded.implode()))
        .with_columns(pl.col("ts").dt.epoch("us").alias("ts_us"))
        .join(members, on="user_id")
        .filter((pl.col("ts_us") >= pl.col("process_us")) & (pl.col("ts_us") < pl.col("process_us") + HOUR))
    )
    expected = kept.group_by("arm_id").agg(
        pl.len().alias("orders"),
        pl.col("amount_fen").sum().alias("revenue"),
        pl.col("user_id").n_unique().alias("buyers"),
    )
    by_arm = await _report(rt, campaign.name)
    sizes = members.group_by("arm_id").len()
    for arm_id, targeted in sizes.iter_rows():
        assert by_arm[arm_id].targeted == targeted
    for arm_id, orders, revenue, buyers in expected.iter_rows():
        funnel = by_arm[arm_id]
        assert (funnel.orders, funnel.revenue_fen, funnel.converters) == (orders, revenue, buyers), arm_id
        assert funnel.conversion_rate == pytest.approx(buyers / funnel.targeted)
    assert sum(by_arm[a].orders for a in by_arm) == kept.height


async def test_a_skewed_split_is_flagged_as_a_sample_ratio_mismatch(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[4000:8000]
    campaign, _, _ = await two_arm_campaign(rt, tenant, users, holdout_basis_points=2000)
    await rt.launch(campaign.name)
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    assert not report.sample_ratio.mismatch and report.sample_ratio.p_value > 0.001

    def skew(tx):  # type: ignore[no-untyped-def]
        # The split the members got no longer matches the configured weights (as when an assigner
        # ignores them): 1:1 assigned, 3:1 configured.
        row = repo.get_campaign(tx, tenant, campaign.name.rsplit("/", 1)[1])
        arms = json.loads(row["arms"])
        arms[0]["weight"] = 3
        tx.execute("UPDATE campaigns SET arms = ? WHERE id = ?", (json.dumps(arms), row["id"]))

    await rt.sql(skew)
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    assert report.sample_ratio.mismatch and report.sample_ratio.p_value < 0.001


async def test_bad_attribution_windows_are_refused_naming_the_field(rt: Rt) -> None:
    import grpc

    from services.runtime import error_details

    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:200])
    template = await rt.template(tenant)
    for seconds in (0, -5, 91 * 86_400):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rt.campaign(
                tenant, pack.name, template.name, attribution_window=duration_pb2.Duration(seconds=seconds)
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(raised.value).field_violations] == ["campaign.attribution_window"]


async def test_funnel_stages_count_members_once_for_offered_items_in_the_window(rt: Rt) -> None:
    tenant = rt.tenant()
    campaign, _, _ = await two_arm_campaign(
        rt,
        tenant,
        rt.audience.users[9000:9400],
        holdout_basis_points=2000,
        attribution_window=duration_pb2.Duration(seconds=3600),
    )  # offers items 1001 and 1002
    await rt.launch(campaign.name)
    members = await _members(rt, tenant, campaign.name)
    a, b, c = [m for m in members if m["arm_id"] == "ten"][:3]
    view, click, cart, order = (
        int(t) for t in (EventType.PRODUCT_VIEW, EventType.CLICK, EventType.ADD_CART, EventType.ORDER)
    )

    def event(m, kind, item, after_us):  # type: ignore[no-untyped-def]
        return (PLATFORM_OWNER, kind, m["user_id"], 0, 0, m["process_us"] + after_us, item)

    rows = [
        event(a, view, 1001, 10),
        event(a, view, 1002, 20),  # a second view: still one member
        event(a, click, 1001, 30),
        event(a, cart, 1001, 40),
        event(a, order, 1001, 50),
        event(b, view, 7777, 10),  # not an offered item
        event(c, view, 1001, 2 * HOUR),  # after the window
        event(c, click, 1002, -5),  # before the offer
    ]
    frame = _events([r[:6] for r in rows]).with_columns(
        pl.Series("item_id", [r[6] for r in rows], dtype=pl.UInt32),
        pl.lit(None, dtype=pl.UInt64).alias("order_id"),
    )
    await _apply(rt, frame, frame)
    ten = (await _report(rt, campaign.name))["ten"]
    assert (ten.viewed, ten.clicked, ten.added_to_cart, ten.ordered) == (1, 1, 1, 1)


async def test_economics_of_hook_and_profit_items_and_the_break_even_loss(rt: Rt) -> None:
    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[9400:9800])
    template = await rt.template(tenant)
    costs = [
        campaign_pb2.ItemCost(item_id=1001, unit_cost_fen=6_000, hook=True),  # sold at 29.90 for a 60.00 cost
        campaign_pb2.ItemCost(item_id=1002, unit_cost_fen=8_000),  # the jacket: 199.00 for 80.00
    ]
    campaign = await rt.campaign(
        tenant, pack.name, template.name, item_costs=costs, expected_conversion_rate=0.05
    )
    assert [c.item_id for c in campaign.item_costs] == [1001, 1002] and campaign.power_plan.arm_members > 0
    await rt.launch(campaign.name)
    members = await _members(rt, tenant, campaign.name)
    ids = _order_ids()
    pay = int(EventType.PAY)
    rows = [(PLATFORM_OWNER, pay, m["user_id"], next(ids), 2_990, m["process_us"] + 5) for m in members[:10]]
    rows += [
        (PLATFORM_OWNER, pay, m["user_id"], next(ids), 19_900, m["process_us"] + 5) for m in members[10:14]
    ]
    rows += [
        (PLATFORM_OWNER, pay, m["user_id"], next(ids), 5_000, m["process_us"] + 5) for m in members[14:15]
    ]
    items = [1001] * 10 + [1002] * 4 + [4242]
    await _apply(rt, _events(rows).with_columns(pl.Series("item_id", items, dtype=pl.UInt32)))
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    money = report.economics
    assert [(i.item_id, i.hook, i.units, i.gmv_fen, i.cost_of_goods_fen) for i in money.items] == [
        (1001, True, 10, 29_900, 60_000),
        (1002, False, 4, 79_600, 32_000),
    ]
    assert money.gmv_fen == 29_900 + 79_600 + 5_000 and money.orders_without_cost == 1
    assert money.cost_of_goods_fen == 92_000 and money.hook_loss_fen == 30_100
    assert money.margin_fen == money.gmv_fen - 92_000 - money.coupon_cost_fen
    assert money.break_even_hook_loss_fen == 47_600 - money.coupon_cost_fen


async def test_the_power_plan_shrinks_with_a_larger_holdout(rt: Rt) -> None:
    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:2000])
    template = await rt.template(tenant)
    plans = []
    for holdout in (500, 2000, 5000):
        campaign = await rt.campaign(
            tenant, pack.name, template.name, holdout_basis_points=holdout, expected_conversion_rate=0.03
        )
        plans.append(campaign.power_plan)
    assert plans[0].holdout_members == 100 and plans[1].holdout_members == 400
    assert (
        plans[0].minimum_detectable_effect
        > plans[1].minimum_detectable_effect
        > plans[2].minimum_detectable_effect
        > 0
    )
    unknown = await rt.campaign(tenant, pack.name, template.name, holdout_basis_points=1000)
    assert unknown.power_plan.minimum_detectable_effect == 0


async def test_bad_item_costs_and_rates_are_refused_naming_the_field(rt: Rt) -> None:
    import grpc

    from services.runtime import error_details

    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:200])
    template = await rt.template(tenant)
    cases = [
        (
            {"item_costs": [campaign_pb2.ItemCost(item_id=0, unit_cost_fen=5)]},
            "campaign.item_costs[0].item_id",
        ),
        (
            {"item_costs": [campaign_pb2.ItemCost(item_id=3, unit_cost_fen=-1)]},
            "campaign.item_costs[0].unit_cost_fen",
        ),
        (
            {"item_costs": [campaign_pb2.ItemCost(item_id=3), campaign_pb2.ItemCost(item_id=3)]},
            "campaign.item_costs[1].item_id",
        ),
        ({"expected_conversion_rate": 1.0}, "campaign.expected_conversion_rate"),
        ({"expected_conversion_rate": float("nan")}, "campaign.expected_conversion_rate"),
    ]
    for fields, name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rt.campaign(tenant, pack.name, template.name, **fields)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in error_details(raised.value).field_violations] == [name]
