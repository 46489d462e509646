"""How a retargeted audience responds, from the generator's behaviour model (for the demo).

Each member's latent segment (the world's hidden truth table) sets their rates
(``services.events.world.SEGMENTS``): how often they are active, how likely a cart becomes an
order, their affinity to the offered item's category, whether they are coupon users, and how
strongly price moves them. Over ``days`` after the launch:

* a treated member opens the offer with ``p_open = 0.25 + 0.5 p_day`` and then claims the coupon
  with ``0.3 + 0.6 coupon_user`` (ClaimCoupon with the campaign: the delivered coupon is claimed);
* everyone (holdout included) buys the offered item with a baseline probability
  ``p0 = min(0.5, days x p_day x p_cart x p_order x affinity / 4)``; a claimed coupon worth ``r``
  of the price multiplies the odds by ``exp(10 x price_sensitivity x r)``, so 15% off moves
  bargain hunters a lot and 10 fen moves nobody;
* a purchase with a claimed coupon is redeemed (RedeemCoupon, idempotency key per order), one
  without is recorded as an order fact (``repository.record_orders``: the ingestion path that
  lets the report count the holdout's conversions); ``refund_share`` of redeemed orders are
  refunded (RefundRedemption).

Draws come from one generator seeded by ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from flashcrowd.retarget.v1 import retarget_service_pb2, retarget_service_pb2_grpc

from services.events.dataset import EventDataset
from services.events.world import SEGMENTS
from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.db import Database

api = retarget_service_pb2


@dataclass(frozen=True)
class ResponseModel:
    days: float = 3.0
    refund_share: float = 0.05
    #: Odds multiplier per unit of price sensitivity and discount share of the price.
    discount_elasticity: float = 10.0


@dataclass
class SimulationSummary:
    members: int = 0
    opened: int = 0
    claimed: int = 0
    redeemed: int = 0
    refunded: int = 0
    orders_without_coupon: int = 0
    holdout_orders: int = 0


def _members(
    tx: repo.Tx, tenant: str, campaign_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, dict[str, Any]]]:
    campaign = repo.get_campaign(tx, tenant, campaign_id)
    members = tx.all(
        "SELECT user_id, arm_id, holdout, coupon_id FROM campaign_members WHERE campaign_pk = ?"
        " ORDER BY user_id",
        (campaign["id"],),
    )
    templates = {row["id"]: row for row in repo.campaign_templates(tx, campaign)}
    return campaign, members, templates


async def simulate_responses(
    *,
    stub: retarget_service_pb2_grpc.RetargetServiceStub,
    database: Database,
    dataset: EventDataset,
    campaign: str,
    item_id: int,
    item_price_fen: int,
    item_category_id: int,
    model: ResponseModel | None = None,
    seed: int = 0,
    order_time_us: int | None = None,
    concurrency: int = 64,
) -> SimulationSummary:
    """Play the audience's response to a launched ``campaign`` through the service's own RPCs."""
    model = model or ResponseModel()
    parsed = d.parse_name(campaign, "campaigns")
    if parsed is None:
        raise ValueError(f"not a campaign name: {campaign}")
    tenant, campaign_id = parsed
    row, members, templates = await database.run(_members, tenant, campaign_id, write=False)
    arms = {arm["arm_id"]: templates[arm["template_pk"]] for arm in json.loads(row["arms"])}
    users = [m["user_id"] for m in members]
    truth = dataset.scan_truth(["user_id", "segment"]).filter(pl.col("user_id").is_in(users)).collect()
    segment_of = dict(zip(truth["user_id"].to_list(), truth["segment"].to_list(), strict=True))
    by_code = {s.code: s for s in SEGMENTS}
    rng = np.random.default_rng(seed)
    draws = rng.random((len(members), 4)).tolist()
    now = order_time_us or d.now_us()
    summary = SimulationSummary(members=len(members))
    orders: list[repo.OrderFact] = []
    window = asyncio.Semaphore(concurrency)

    async def redeem(member: dict[str, Any], refund: bool) -> None:
        coupon = d.coupon_name(tenant, member["coupon_id"])
        order_id = f"sim-{campaign_id}-{member['user_id']}"
        async with window:
            await stub.RedeemCoupon(
                api.RedeemCouponRequest(
                    coupon=coupon,
                    user_id=member["user_id"],
                    order_id=order_id,
                    order_amount_fen=item_price_fen,
                    item_ids=[item_id],
                    idempotency_key=f"redeem-{order_id}",
                )
            )
            if refund:
                await stub.RefundRedemption(
                    api.RefundRedemptionRequest(
                        coupon=coupon, order_id=order_id, idempotency_key=f"refund-{order_id}"
                    )
                )

    async def claim(member: dict[str, Any], template_name: str) -> None:
        async with window:
            await stub.ClaimCoupon(
                api.ClaimCouponRequest(
                    coupon_template=template_name,
                    user_id=member["user_id"],
                    campaign=campaign,
                    request_id=f"sim-claim-{campaign_id}-{member['user_id']}",
                )
            )

    claims, redemptions = [], []
    for member, (u_open, u_claim, u_buy, u_refund) in zip(members, draws, strict=True):
        segment = by_code.get(segment_of.get(member["user_id"], 0))
        if segment is None:
            continue
        affinity = segment.categories.get(item_category_id, 0.3)
        p0 = min(0.5, model.days * segment.p_day * segment.p_cart * segment.p_order * affinity / 4)
        claimed = False
        if not member["holdout"] and member["coupon_id"]:
            opened = u_open < 0.25 + 0.5 * segment.p_day
            claimed = opened and u_claim < 0.3 + 0.6 * segment.coupon_user
            summary.opened += int(opened)
        p_buy = p0
        template = arms.get(member["arm_id"])
        if claimed and template is not None:
            share = repo.discount_of(template).apply(item_price_fen) / item_price_fen
            odds = p0 / (1 - p0) * math.exp(model.discount_elasticity * segment.price_sensitivity * share)
            p_buy = odds / (1 + odds)
            summary.claimed += 1
            claims.append(claim(member, d.template_name(tenant, template["template_id"])))
        if u_buy >= p_buy:
            continue
        if claimed:
            refund = u_refund < model.refund_share
            redemptions.append((member, refund))
            summary.redeemed += 1
            summary.refunded += int(refund)
        else:
            orders.append(
                repo.OrderFact(
                    f"sim-{campaign_id}-{member['user_id']}",
                    member["user_id"],
                    item_price_fen,
                    now,
                    (item_id,),
                )
            )
            if member["holdout"]:
                summary.holdout_orders += 1
            else:
                summary.orders_without_coupon += 1
    await asyncio.gather(*claims)
    await asyncio.gather(*(redeem(member, refund) for member, refund in redemptions))
    if orders:
        await database.run(repo.record_orders, tenant, orders)
    return summary
