"""The after-sale step of the demo: retarget clickers who did not buy, two coupon arms and a holdout.

Everything goes through the retarget service's RPCs over gRPC: coupon templates, the campaign on
the ``clickers-not-buyers`` pack (resolved by retarget calling the audience service), the launch
as a long-running operation, the audience's response played from the generator's behaviour model
(``services.demo.simulate``: claims, redemptions and refunds through the same RPCs), and the
funnel/ROI report per arm against the holdout.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import polars as pl
from flashcrowd.retarget.v1 import (
    campaign_pb2,
    coupon_pb2,
    retarget_service_pb2,
    retarget_service_pb2_grpc,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from services.demo import render
from services.events.dataset import EventDataset
from services.runtime.assertion import platform_channel

api = retarget_service_pb2

# The seed story's two arms: a token "10 fen off" (¥0.10) against 15% off capped at ¥60.
ARMS = (
    ("fen-10", "thanks for joining: 10 fen off", coupon_pb2.FixedAmountOff(amount_fen=10), None),
    ("pct-15", "fan price: 15% off (cap ¥60)", None, coupon_pb2.PercentOff(basis_points=1500, cap_fen=6000)),
)
HOLDOUT_BASIS_POINTS = 1000


async def start_retarget(demo: Any) -> None:
    """Start the retarget service in-process (SQLite ledger in the work dir) on a free port."""
    from services.retarget.config import RetargetSettings
    from services.retarget.server import create_retarget_server
    from services.runtime import load_settings

    settings = load_settings(
        RetargetSettings,
        database_url=f"sqlite:///{demo.opt.workdir / 'retarget.db'}",
        audience_target=demo.audience_target,
        port=0,
        grace_seconds=0.5,
        log_json=False,
    )
    server, port, app = await create_retarget_server(settings)
    demo._servers.append((server, app))
    demo.retarget_app = app
    demo.retarget_target = f"127.0.0.1:{port}"
    render.note(f"retarget  {demo.retarget_target}  (RetargetService, Operations; SQLite ledger)")


async def _ingest_and_attribute(demo: Any, events: pl.DataFrame) -> None:
    """Send the simulated pay / refund events through IngestEvents (as a platform service), then
    wait until the retarget order feed has attributed everything on the stream."""
    from flashcrowd.audience.v1 import event_service_pb2_grpc

    from services.demo.realtime import ingest_requests

    channel = platform_channel(demo.audience_target, "demo")
    try:
        call = event_service_pb2_grpc.EventServiceStub(channel).IngestEvents()
        for request in ingest_requests(events, 0, 1000):
            await call.write(request)
            response = await call.read()
            if response.rejected:
                raise RuntimeError(f"IngestEvents rejected simulated events: {response.rejected[0]}")
        await call.done_writing()
    finally:
        await channel.close()
    feed = demo.retarget_app.order_feed
    if feed is None:
        raise RuntimeError("the retarget service runs without an order feed: set FLASHCROWD_BUS_URL")
    last = await feed.bus.last_seq()  # the stream the feed follows, through its own connection
    deadline = asyncio.get_running_loop().time() + 60
    while feed.seq < last:
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the order feed is at {feed.seq} of {last} after 60 s")
        await asyncio.sleep(0.05)


async def retarget_step(demo: Any, *, tenant: str, audience_pack: str, title: str) -> None:
    sale = demo.world["sale"]
    item_id, price = sale["retarget_item_id"], sale["retarget_price_fen"]
    render.section(title, "clickers who did not buy get a coupon for the jacket")
    channel = platform_channel(demo.retarget_target, "demo")
    try:
        stub = retarget_service_pb2_grpc.RetargetServiceStub(channel)
        ops = operations_pb2_grpc.OperationsStub(channel)
        arms = []
        for arm_id, display, fixed, percent in ARMS:
            template = coupon_pb2.CouponTemplate(
                display_name=display,
                min_spend_fen=price // 2,
                valid_for=duration_pb2.Duration(seconds=7 * 86400),
                applicable_item_ids=[item_id],
                total_stock=5000,
                budget_cap_fen=5000 * 6000,
                per_user_limit=1,
                refund_policy=coupon_pb2.REFUND_POLICY_RELEASE,
                currency_code="CNY",
            )
            if fixed is not None:
                template.fixed_amount.CopyFrom(fixed)
            elif percent is not None:
                template.percent_off.CopyFrom(percent)
            created = await stub.CreateCouponTemplate(
                api.CreateCouponTemplateRequest(
                    parent=tenant, coupon_template_id=f"jacket-{arm_id}", coupon_template=template
                )
            )
            arms.append(campaign_pb2.Arm(arm_id=arm_id, weight=1, coupon_template=created.name))
        campaign = await stub.CreateCampaign(
            api.CreateCampaignRequest(
                parent=tenant,
                campaign_id="after-sale-jacket",
                campaign=campaign_pb2.Campaign(
                    display_name="after the sale: jacket for clickers who did not buy",
                    audience_pack=audience_pack,
                    offer_item_ids=[item_id],
                    coupon_template=arms[0].coupon_template,
                    arms=arms,
                    holdout_basis_points=HOLDOUT_BASIS_POINTS,
                    loss_cap_fen=10_000_000,
                ),
            )
        )
        op = await stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name))
        while not op.done:
            op = await ops.WaitOperation(
                operations_pb2.WaitOperationRequest(name=op.name, timeout=duration_pb2.Duration(seconds=30))
            )
        if op.HasField("error"):
            raise RuntimeError(f"launch failed: {op.error.message}")
        launched = await stub.GetCampaign(api.GetCampaignRequest(name=campaign.name))
        p = launched.progress
        render.note(
            f"launched {campaign.name}: {p.audience_size:,} members, {p.issued:,} coupons issued, "
            f"{p.held_out:,} held out ({HOLDOUT_BASIS_POINTS / 100:.0f}%), {p.skipped:,} skipped"
        )

        from services.demo.simulate import simulate_responses

        summary = await simulate_responses(
            publish=functools.partial(_ingest_and_attribute, demo),
            stub=stub,
            database=demo.retarget_app.db,
            dataset=EventDataset(demo.store),
            campaign=campaign.name,
            item_id=item_id,
            item_price_fen=price,
            item_category_id=sale["hook_category_id"],
            seed=demo.opt.seed,
        )
        render.note(
            f"simulated 3 days of responses: {summary.opened:,} opened, {summary.claimed:,} claimed, "
            f"{summary.redeemed:,} redeemed ({summary.refunded:,} refunded), "
            f"{summary.orders_without_coupon + summary.holdout_orders:,} orders without a coupon"
        )
        report = await stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
        render.table(
            "funnel and ROI per arm (GetCampaignReport)",
            ["arm", "targeted", "delivered", "claimed", "redeemed", "orders", "revenue", "cost", "ROI",
             "CVR", "uplift, 95% CI", "p"],
            [
                (
                    a.arm_id, a.targeted, a.delivered, a.claimed, a.redeemed, a.orders,
                    f"{a.revenue_fen // 100:,}", f"{a.coupon_cost_fen // 100:,}", f"{a.roi:.1f}",
                    f"{a.conversion_rate:.1%}",
                    "" if a.arm_id == "holdout" else (
                        f"{a.uplift_vs_holdout * 100:+.1f} [{a.conversion_difference.low * 100:+.1f},"
                        f"{a.conversion_difference.high * 100:+.1f}]"
                    ),
                    "" if a.arm_id == "holdout" else f"{a.adjusted_p_value:.2g}",
                )
                for a in report.arms
            ],
        )  # fmt: skip
        through = (
            report.attributed_through.ToDatetime().strftime("%Y-%m-%d %H:%M")
            if report.attributed_through.seconds
            else "-"
        )
        render.note(
            f"revenue and cost in yuan; total revenue {render.yuan(report.revenue_fen)}, "
            f"coupon cost {render.yuan(report.coupon_cost_fen)}; orders arrive as pay / refund events "
            f"(IngestEvents) and are attributed by the order feed (through {through} event time, "
            f"{report.attribution_window.seconds // 86400}-day window); uplift = conversion-rate "
            f"difference against the holdout in points (Newcombe interval), p = two-proportion z-test, "
            "Holm-adjusted; "
            f"sample-ratio check p = {report.sample_ratio.p_value:.2f}"
            f"{' MISMATCH' if report.sample_ratio.mismatch else ' (split as configured)'}"
        )
    finally:
        await channel.close()
