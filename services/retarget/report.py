"""Campaign report: funnel, ROI and experiment statistics per arm against the holdout.

Definitions (services/retarget/README.md, "Report"):

* targeted: audience members assigned to the arm (issued, or skipped for stock/budget/limit:
  intent-to-treat, so skips do not flatter an arm); the holdout row counts held-out members;
* delivered: coupons issued to them by the launch (= outbox offers); claimed: coupons taken by
  ClaimCoupon or used at checkout; redeemed: coupons currently redeemed (refunds undo it);
* orders / revenue: paid, unrefunded orders attributed to the arm (services/retarget/attribution.py:
  last touch within the attribution window, by coupon for redemptions), whether paid with the
  coupon or not; that is what makes the holdout comparable;
* coupon cost: discounts of live redemptions; ROI = (revenue - cost) / cost, 0 without cost;
* conversion rate: converters / targeted; uplift = rate(arm) - rate(holdout) with its Newcombe
  interval and the pooled z-test p-value (Holm-adjusted across arms in ``adjusted_p_value``);
* revenue per member difference with a Welch interval, the ROI of the increment, CUPED-adjusted
  differences (pre-period spend as covariate) and always-valid confidence sequences (tuned for the
  campaign's audience size) beside the fixed-horizon figures (services/retarget/stats.py);
* sample ratio: chi-square of the assignment against the configured weights and holdout share;
* funnel stages per arm (viewed, clicked, added to cart, ordered an offered item: members, each
  once) from the event stream;
* economics: GMV, cost of goods (campaign ``item_costs``), coupon cost and margin per item and for
  the activity; the hook items' loss and the break-even hook loss (profit items' margin minus
  coupon cost: a loss cap at or below it keeps the activity ROI-positive).
"""

from __future__ import annotations

import json

from flashcrowd.retarget.v1 import campaign_pb2

from services.retarget import domain as d
from services.retarget import stats
from services.retarget.repository import ArmFacts, CampaignFacts
from services.retarget.stats import two_proportion_p_value

__all__ = ["arm_funnel", "campaign_report", "economics"]


def _estimate(interval: stats.Interval) -> campaign_pb2.Estimate:
    return campaign_pb2.Estimate(value=interval.estimate, low=interval.low, high=interval.high)


def _rate(arm: ArmFacts) -> float:
    return arm.buyers / arm.targeted if arm.targeted else 0.0


def arm_funnel(arm: ArmFacts, holdout: ArmFacts | None, *, planned_n: int = 0) -> campaign_pb2.ArmFunnel:
    funnel = campaign_pb2.ArmFunnel(
        arm_id=arm.arm_id,
        targeted=arm.targeted,
        delivered=arm.delivered,
        claimed=arm.claimed,
        redeemed=arm.redeemed,
        orders=arm.orders,
        revenue_fen=arm.revenue_fen,
        coupon_cost_fen=arm.coupon_cost_fen,
        roi=(arm.revenue_fen - arm.coupon_cost_fen) / arm.coupon_cost_fen if arm.coupon_cost_fen else 0.0,
        conversion_rate=_rate(arm),
        converters=arm.buyers,
        refunded_orders=arm.refunded_orders,
        revenue_per_member_fen=arm.revenue_fen / arm.targeted if arm.targeted else 0.0,
        p_value=1.0,
        revenue_p_value=1.0,
        adjusted_p_value=1.0,
        viewed=arm.stages.get("viewed", 0),
        clicked=arm.stages.get("clicked", 0),
        added_to_cart=arm.stages.get("carted", 0),
        ordered=arm.stages.get("ordered", 0),
    )
    if holdout is None or arm.holdout or not holdout.targeted or not arm.targeted:
        return funnel
    a, h = arm.sums, holdout.sums
    funnel.uplift_vs_holdout = _rate(arm) - _rate(holdout)
    funnel.p_value = two_proportion_p_value(arm.buyers, arm.targeted, holdout.buyers, holdout.targeted)
    funnel.adjusted_p_value = funnel.p_value
    conversion = stats.rate_difference(arm.buyers, arm.targeted, holdout.buyers, holdout.targeted)
    funnel.conversion_difference.CopyFrom(_estimate(conversion))
    revenue = stats.mean_difference(a, h)
    funnel.revenue_difference.CopyFrom(_estimate(revenue.interval))
    funnel.revenue_p_value = revenue.p_value
    funnel.incremental_roi.CopyFrom(
        _estimate(stats.incremental_roi(revenue.interval, arm.targeted, arm.coupon_cost_fen))
    )
    cuped_revenue = stats.cuped(a, h)
    funnel.cuped_revenue_difference.CopyFrom(_estimate(cuped_revenue.interval))
    funnel.cuped_variance_reduction = cuped_revenue.variance_reduction
    funnel.cuped_conversion_difference.CopyFrom(_estimate(stats.cuped(a, h, binary=True).interval))
    n = arm.targeted + holdout.targeted
    planned = max(planned_n, n)
    pa, ph = _rate(arm), _rate(holdout)
    conversion_variance = pa * (1 - pa) / arm.targeted + ph * (1 - ph) / holdout.targeted
    funnel.sequential_conversion_difference.CopyFrom(
        _estimate(stats.confidence_sequence(conversion.estimate, conversion_variance, n, planned_n=planned))
    )
    funnel.sequential_revenue_difference.CopyFrom(
        _estimate(
            stats.confidence_sequence(revenue.interval.estimate, revenue.variance, n, planned_n=planned)
        )
    )
    return funnel


def economics(facts: CampaignFacts, coupon_cost_fen: int) -> campaign_pb2.ActivityEconomics:
    """GMV, cost of goods and margin per item and for the activity (hook and profit items)."""
    costs = {c["item_id"]: c for c in json.loads(facts.campaign["item_costs"])}
    out = campaign_pb2.ActivityEconomics(coupon_cost_fen=coupon_cost_fen)
    hook_loss = profit_margin = 0
    rows = []
    for item_id, units, gmv in facts.items:
        cost = costs.get(item_id)
        if cost is None:
            out.gmv_fen += gmv
            out.orders_without_cost += units
            continue
        cogs = units * int(cost["unit_cost_fen"])
        rows.append(
            campaign_pb2.ItemEconomics(
                item_id=item_id,
                hook=cost["hook"],
                units=units,
                gmv_fen=gmv,
                cost_of_goods_fen=cogs,
                margin_fen=gmv - cogs,
            )
        )
        out.gmv_fen += gmv
        out.cost_of_goods_fen += cogs
        if cost["hook"]:
            hook_loss += max(0, cogs - gmv)
        else:
            profit_margin += gmv - cogs
    out.items.extend(sorted(rows, key=lambda r: (not r.hook, r.item_id)))
    out.margin_fen = out.gmv_fen - out.cost_of_goods_fen - coupon_cost_fen
    spent = out.cost_of_goods_fen + coupon_cost_fen
    out.roi = out.margin_fen / spent if spent else 0.0
    out.hook_loss_fen = hook_loss
    out.break_even_hook_loss_fen = profit_margin - coupon_cost_fen
    return out


def campaign_report(facts: CampaignFacts, name: str) -> campaign_pb2.CampaignReport:
    campaign = facts.campaign
    holdout = facts.arms.get(d.HOLDOUT_ARM)
    report = campaign_pb2.CampaignReport(campaign=name, projected_loss_fen=facts.projected_loss_fen)
    treated = [arm for arm_id, arm in facts.arms.items() if arm_id != d.HOLDOUT_ARM]
    planned = int(campaign["audience_size"] or 0)
    funnels = [arm_funnel(arm, holdout, planned_n=planned) for arm in treated]
    compared = [
        i for i, arm in enumerate(treated) if holdout is not None and holdout.targeted and arm.targeted
    ]
    for i, adjusted in zip(compared, stats.holm([funnels[i].p_value for i in compared]), strict=True):
        funnels[i].adjusted_p_value = adjusted
    report.arms.extend(funnels)
    if holdout is not None:
        report.arms.append(arm_funnel(holdout, None))
    report.revenue_fen = sum(arm.revenue_fen for arm in treated) + facts.unassigned.revenue_fen
    report.coupon_cost_fen = sum(arm.coupon_cost_fen for arm in treated) + facts.unassigned.coupon_cost_fen
    groups = [*treated, *([holdout] if holdout is not None and holdout.share_bp > 0 else [])]
    ratio = stats.sample_ratio([g.targeted for g in groups], [g.share_bp for g in groups])
    report.sample_ratio.CopyFrom(
        campaign_pb2.SampleRatioCheck(chi_square=ratio.chi2, p_value=ratio.p_value, mismatch=ratio.mismatch)
    )
    if facts.attributed_through_us:
        report.attributed_through.FromMicroseconds(facts.attributed_through_us)
    report.attribution_window.FromMicroseconds(int(campaign["attribution_window_us"]))
    report.covariate_window.FromMicroseconds(int(campaign["covariate_window_us"]))
    report.economics.CopyFrom(economics(facts, report.coupon_cost_fen))
    if holdout is not None and treated and treated[0].targeted and holdout.targeted:
        mde = stats.minimum_detectable_effect(_rate(holdout), treated[0].targeted, holdout.targeted)
        report.minimum_detectable_effect = mde if mde != float("inf") else 0.0
    return report
