"""Campaign report: funnel, ROI and significance per arm against the holdout.

Definitions (services/retarget/README.md, "Report"):

* targeted: audience members assigned to the arm (issued, or skipped for stock/budget/limit:
  intent-to-treat, so skips do not flatter an arm); the holdout row counts held-out members;
* delivered: coupons issued to them by the launch (= outbox offers); claimed: coupons taken by
  ClaimCoupon or used at checkout; redeemed: coupons currently redeemed (refunds undo it);
* orders / revenue: unrefunded orders of the arm's members placed between launch and end time,
  whether paid with the coupon or not (that is what makes the holdout comparable);
* coupon cost: discounts of live redemptions; ROI = (revenue - cost) / cost, 0 without cost;
* conversion rate: converting members / targeted (a proportion, so that the two-proportion
  z-test applies; ``orders`` keeps the order count); uplift = rate(arm) - rate(holdout);
  p-value: two-sided pooled two-proportion z-test, 1.0 when either group is empty or degenerate.
"""

from __future__ import annotations

import math

from flashcrowd.retarget.v1 import campaign_pb2

from services.retarget import domain as d
from services.retarget.repository import ArmFacts, CampaignFacts


def two_proportion_p_value(x1: int, n1: int, x0: int, n0: int) -> float:
    """Two-sided p-value of H0: p1 == p0 (pooled standard error)."""
    if n1 <= 0 or n0 <= 0:
        return 1.0
    pooled = (x1 + x0) / (n1 + n0)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n0)
    if variance <= 0.0:
        return 1.0
    z = (x1 / n1 - x0 / n0) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2.0))


def _rate(arm: ArmFacts) -> float:
    return arm.buyers / arm.targeted if arm.targeted else 0.0


def arm_funnel(arm: ArmFacts, holdout: ArmFacts | None) -> campaign_pb2.ArmFunnel:
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
    )
    if holdout is not None and not arm.holdout:
        funnel.uplift_vs_holdout = _rate(arm) - _rate(holdout) if holdout.targeted else 0.0
        funnel.p_value = two_proportion_p_value(arm.buyers, arm.targeted, holdout.buyers, holdout.targeted)
    else:
        funnel.p_value = 1.0
    return funnel


def campaign_report(facts: CampaignFacts, name: str) -> campaign_pb2.CampaignReport:
    holdout = facts.arms.get(d.HOLDOUT_ARM)
    report = campaign_pb2.CampaignReport(campaign=name, projected_loss_fen=facts.projected_loss_fen)
    treated = [arm for arm_id, arm in facts.arms.items() if arm_id != d.HOLDOUT_ARM]
    for arm in treated:
        report.arms.append(arm_funnel(arm, holdout))
    if holdout is not None:
        report.arms.append(arm_funnel(holdout, None))
    report.revenue_fen = sum(arm.revenue_fen for arm in treated) + facts.unassigned.revenue_fen
    report.coupon_cost_fen = sum(arm.coupon_cost_fen for arm in treated) + facts.unassigned.coupon_cost_fen
    return report
