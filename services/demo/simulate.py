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
* a purchase with a claimed coupon is redeemed (RedeemCoupon, idempotency key per order);
  ``refund_share`` of redeemed orders are refunded (RefundRedemption);
* every purchase, with a coupon or not, is also the platform's ``pay`` event (and a refund its
  ``refund`` event), handed to ``publish`` as an events frame: the demo sends it through
  ``IngestEvents`` and the retarget order feed attributes it, the way real orders reach a report
  (the holdout's conversions only ever arrive that way). The pay event of a redeemed order
  carries the redemption's order id, so it counts once.

Draws come from one generator seeded by ``seed``, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from flashcrowd.retarget.v1 import retarget_service_pb2, retarget_service_pb2_grpc

from services.events.dataset import EventDataset
from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER, EventType
from services.events.sharding import bucket_of
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
    publish: Callable[[pl.DataFrame], Awaitable[None]],
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
    payments: list[tuple[int, int, int]] = []  # (user, order id, event type) of every pay / refund
    base_order = zlib.crc32(campaign.encode()) << 32  # order ids of this campaign: base | user id
    window = asyncio.Semaphore(concurrency)

    async def redeem(member: dict[str, Any], refund: bool) -> None:
        coupon = d.coupon_name(tenant, member["coupon_id"])
        order_id = str(base_order | member["user_id"])
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
        payments.append((member["user_id"], base_order | member["user_id"], EventType.PAY))
        if claimed:
            refund = u_refund < model.refund_share
            redemptions.append((member, refund))
            summary.redeemed += 1
            summary.refunded += int(refund)
            if refund:
                payments.append((member["user_id"], base_order | member["user_id"], EventType.REFUND))
        elif member["holdout"]:
            summary.holdout_orders += 1
        else:
            summary.orders_without_coupon += 1
    await asyncio.gather(*claims)
    await asyncio.gather(*(redeem(member, refund) for member, refund in redemptions))
    if payments:
        await publish(_payment_events(payments, base_order, item_id, item_price_fen, item_category_id, now))
    return summary


def _payment_events(
    payments: list[tuple[int, int, int]], base: int, item_id: int, price_fen: int, category_id: int, now: int
) -> pl.DataFrame:
    """The platform's pay / refund events of the simulated orders (a refund a minute after its pay)."""
    users = [user for user, _, _ in payments]
    # Outside the generator's ids (< 2**56): a tag byte, the campaign's hash, then the index.
    ids = (0xD0 << 56) | (((base >> 32) & 0xFFFFFF) << 32)
    kinds = [int(kind) for _, _, kind in payments]
    return (
        pl.DataFrame(
            {
                "event_id": [ids | i for i in range(len(payments))],
                "user_id": users,
                "bucket": [bucket_of(user) for user in users],
                "ts": [now + (60_000_000 if kind == EventType.REFUND else 0) for kind in kinds],
                "event_type": kinds,
                "item_id": [item_id] * len(payments),
                "category_id": [category_id] * len(payments),
                "campaign_id": [None] * len(payments),
                "video_id": [None] * len(payments),
                "order_id": [order for _, order, _ in payments],
                "amount_fen": [price_fen] * len(payments),
                "owner": [PLATFORM_OWNER] * len(payments),
            },
            schema_overrides={"ts": pl.Int64},
        )
        .with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        .cast(EVENTS_SCHEMA)
    )
