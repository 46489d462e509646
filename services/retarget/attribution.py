"""Attribution of paid orders and refunds to campaign arms, with per-arm sums kept incrementally.

Rules (services/retarget/README.md, "Attribution"):

* A paid order (a ``pay`` event, or a RedeemCoupon) of user ``u`` at time ``t`` is attributed, for
  each tenant that may see it, to that tenant's **last touch**: the membership of ``u`` in one of
  the tenant's campaigns with the latest ``process_us <= t < process_us + attribution window``
  (``process_us``: when the launch delivered the offer, or assigned a holdout member). Every arm
  and the holdout are touched alike, so the comparison stays fair. A redemption goes to its
  coupon's campaign (by coupon), whatever the window. Platform orders are visible to every tenant
  (each gets its own last touch); a tenant's own conversion events only to that tenant.
* One order counts at most once per tenant (``order_attributions`` is keyed by tenant and order):
  the redemption and the pay event of one order never count twice.
* A refund undoes its order's attribution whenever it arrives, also after the window: refunded
  revenue was never earned. A refund seen before its payment leaves a refunded order row, so the
  payment that follows is not counted.
* Pre-period spend (the CUPED covariate) is read when a member is assigned: paid, unrefunded
  orders in the covariate window before the launch.

Every function runs inside the caller's transaction, so an order, its attribution and the sums
change together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.events.schema import PLATFORM_OWNER, EventType
from services.retarget.db import Row, Tx
from services.retarget.stats import ArmSums


@dataclass(frozen=True)
class OrderFact:
    order_id: str
    user_id: int
    amount_fen: int
    order_us: int
    item_ids: tuple[int, ...] = ()
    refund_us: int | None = None


@dataclass(frozen=True)
class ArmOutcome:
    sums: ArmSums
    orders: int
    refunds: int
    update_us: int
    #: Members per funnel stage (``FUNNEL_STAGES``).
    stages: dict[str, int]


#: Event type -> funnel stage counted per member (the offer's items, within the window).
FUNNEL_STAGES = {
    int(EventType.PRODUCT_VIEW): "viewed",
    int(EventType.CLICK): "clicked",
    int(EventType.ADD_CART): "carted",
    int(EventType.ORDER): "ordered",
}


# --- members -------------------------------------------------------------------------------------


def pre_period_spend(
    tx: Tx, tenant: str, user_ids: Sequence[int], start_us: int, end_us: int
) -> dict[int, int]:
    """Paid, unrefunded spend per user in ``[start_us, end_us)`` over the orders ``tenant`` sees."""
    if not user_ids or end_us <= start_us:
        return {}
    users, params = tx.in_list("user_id", list(user_ids))
    rows = tx.all(
        "SELECT user_id, SUM(amount_fen) AS spend FROM (SELECT DISTINCT order_id, user_id, amount_fen"
        f" FROM orders WHERE tenant IN (?, ?) AND {users} AND order_us >= ? AND order_us < ?"
        " AND refund_us IS NULL) o GROUP BY user_id",
        [tenant, PLATFORM_OWNER, *params, start_us, end_us],
    )
    return {int(row["user_id"]): int(row["spend"] or 0) for row in rows}


def add_members(tx: Tx, campaign_pk: int, members: Iterable[tuple[str, int]], now: int) -> None:
    """Fold newly assigned members ``(arm_id, pre_spend_fen)`` into the arms' sums."""
    per_arm: dict[str, list[float]] = {}
    for arm_id, spend in members:
        sums = per_arm.setdefault(arm_id, [0, 0.0, 0.0])
        sums[0] += 1
        sums[1] += spend
        sums[2] += float(spend) * spend
    for arm_id, (count, sum_x, sum_x2) in sorted(per_arm.items()):
        _ensure_arm(tx, campaign_pk, arm_id)
        tx.execute(
            "UPDATE arm_stats SET members = members + ?, sum_x = sum_x + ?, sum_x2 = sum_x2 + ?,"
            " update_us = ? WHERE campaign_pk = ? AND arm_id = ?",
            (int(count), sum_x, sum_x2, now, campaign_pk, arm_id),
        )


def _ensure_arm(tx: Tx, campaign_pk: int, arm_id: str) -> None:
    tx.execute(
        "INSERT INTO arm_stats (campaign_pk, arm_id) VALUES (?, ?)"
        " ON CONFLICT (campaign_pk, arm_id) DO NOTHING",
        (campaign_pk, arm_id),
    )


# --- orders --------------------------------------------------------------------------------------


def insert_order(tx: Tx, tenant: str, order: OrderFact, *, coupon_id: str | None = None) -> bool:
    """Store an order fact of ``tenant`` (an event owner, or a redemption's tenant); False when that
    tenant already has the order id (a duplicate changes nothing)."""
    return bool(
        tx.execute(
            "INSERT INTO orders (tenant, order_id, user_id, amount_fen, order_us, item_ids, coupon_id,"
            " refund_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, order_id) DO NOTHING",
            (
                tenant,
                order.order_id,
                order.user_id,
                order.amount_fen,
                order.order_us,
                json.dumps(list(order.item_ids)),
                coupon_id,
                order.refund_us,
            ),
        )
    )


def record_orders(tx: Tx, owner: str, orders: Sequence[OrderFact], now: int) -> int:
    """Store paid orders seen by ``owner`` (``PLATFORM_OWNER`` or a tenant) and attribute the new
    ones; an order id already stored for that owner is a duplicate and changes nothing."""
    attributed = 0
    for order in orders:
        if insert_order(tx, owner, order) and order.refund_us is None:
            attributed += attribute_order(tx, owner, order, now=now)
    return attributed


#: What the last-touch rule and the sums read of a membership.
_TOUCH_COLUMNS = (
    "m.campaign_pk, m.arm_id, m.user_id, m.process_us, m.pre_spend_fen, k.tenant, k.offer_item_ids,"
    " k.attribution_window_us"
)


def _memberships(tx: Tx, user_ids: Iterable[int]) -> dict[int, list[Row]]:
    """Every campaign membership of the users, newest touch first."""
    users, params = tx.in_list("m.user_id", sorted(set(user_ids)))
    out: dict[int, list[Row]] = {}
    for row in tx.all(
        f"SELECT {_TOUCH_COLUMNS} FROM campaign_members m JOIN campaigns k ON k.id = m.campaign_pk"
        f" WHERE {users} ORDER BY m.process_us DESC, m.campaign_pk DESC",
        params,
    ):
        out.setdefault(int(row["user_id"]), []).append(row)
    return out


def _last_touches(memberships: Iterable[Row], owner: str, ts_us: int) -> dict[str, Row]:
    """Per tenant that may see an event of ``owner``, the newest membership whose attribution
    window holds ``ts_us`` (``memberships`` newest first): the one rule for orders and funnel."""
    chosen: dict[str, Row] = {}
    for m in memberships:
        if owner != PLATFORM_OWNER and m["tenant"] != owner:
            continue
        if m["process_us"] <= ts_us < m["process_us"] + m["attribution_window_us"]:
            chosen.setdefault(m["tenant"], m)
    return chosen


def attribute_order(
    tx: Tx, owner: str, order: OrderFact, *, now: int, coupon_campaign_pk: int | None = None
) -> int:
    """Attribute one paid order to each visible tenant's last touch; returns attributions made."""
    memberships = _memberships(tx, [order.user_id]).get(order.user_id, [])
    chosen = _last_touches(memberships, owner, order.order_us)
    if coupon_campaign_pk is not None:  # a redemption counts for its coupon's campaign
        by_coupon = next((m for m in memberships if m["campaign_pk"] == coupon_campaign_pk), None)
        if by_coupon is not None:
            chosen[by_coupon["tenant"]] = by_coupon
    made = 0
    # An order's money counts for its first item (pay events carry exactly one).
    item = order.item_ids[0] if order.item_ids else None
    for tenant, touch in sorted(chosen.items()):
        inserted = tx.execute(
            "INSERT INTO order_attributions (tenant, order_id, campaign_pk, arm_id, user_id, amount_fen,"
            " item_id, order_us, attribute_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (tenant, order_id) DO NOTHING",
            (
                tenant,
                order.order_id,
                touch["campaign_pk"],
                touch["arm_id"],
                order.user_id,
                order.amount_fen,
                item,
                order.order_us,
                now,
            ),
        )
        if inserted:
            _fold(
                tx,
                touch["campaign_pk"],
                touch["arm_id"],
                order.user_id,
                touch["pre_spend_fen"],
                order.amount_fen,
                1,
                now,
                item_id=item,
            )
            made += 1
    return made


def record_refund(tx: Tx, owner: str, order: OrderFact, refund_us: int, now: int) -> int:
    """Mark ``owner``'s order refunded and undo its attributions; returns attributions undone."""
    changed = tx.execute(
        "UPDATE orders SET refund_us = ? WHERE tenant = ? AND order_id = ? AND refund_us IS NULL",
        (refund_us, owner, order.order_id),
    )
    if not changed:
        # Unknown order: remember the refund so that its payment, arriving later, is not counted.
        placeholder = OrderFact(order.order_id, order.user_id, order.amount_fen, refund_us, (), refund_us)
        insert_order(tx, owner, placeholder)
    return undo_attributions(tx, owner, order.order_id, refund_us, now)


def undo_attributions(tx: Tx, owner: str, order_id: str, refund_us: int, now: int) -> int:
    query = "SELECT * FROM order_attributions WHERE order_id = ? AND refund_us IS NULL"
    params: list[Any] = [order_id]
    if owner != PLATFORM_OWNER:
        query += " AND tenant = ?"
        params.append(owner)
    undone = 0
    for row in tx.all(query, params):
        if tx.execute(
            "UPDATE order_attributions SET refund_us = ? WHERE tenant = ? AND order_id = ?"
            " AND refund_us IS NULL",
            (refund_us, row["tenant"], order_id),
        ):
            spend = tx.scalar(
                "SELECT pre_spend_fen FROM campaign_members WHERE campaign_pk = ? AND user_id = ?",
                (row["campaign_pk"], row["user_id"]),
            )
            _fold(
                tx,
                row["campaign_pk"],
                row["arm_id"],
                row["user_id"],
                int(spend or 0),
                row["amount_fen"],
                -1,
                now,
                item_id=row["item_id"],
            )
            undone += 1
    return undone


def _fold(
    tx: Tx,
    campaign_pk: int,
    arm_id: str,
    user_id: int,
    spend: int,
    amount: int,
    sign: int,
    now: int,
    *,
    item_id: int | None,
) -> None:
    """Add (``sign`` 1) or remove (-1) one order of ``amount`` fen to a member's, its arm's and its
    item's sums."""
    _ensure_arm(tx, campaign_pk, arm_id)
    if item_id is not None:
        tx.execute(
            "INSERT INTO item_stats (campaign_pk, item_id) VALUES (?, ?) ON CONFLICT (campaign_pk, item_id)"
            " DO NOTHING",
            (campaign_pk, item_id),
        )
        tx.execute(
            "UPDATE item_stats SET units = units + ?, gmv_fen = gmv_fen + ?"
            " WHERE campaign_pk = ? AND item_id = ?",
            (sign, sign * amount, campaign_pk, item_id),
        )
    prior = tx.one(
        "SELECT orders, revenue_fen FROM arm_converters WHERE campaign_pk = ? AND user_id = ?"
        + tx.for_update,
        (campaign_pk, user_id),
    )
    old_orders, old_revenue = (int(prior["orders"]), int(prior["revenue_fen"])) if prior else (0, 0)
    new_orders, new_revenue = old_orders + sign, old_revenue + sign * amount
    if prior is None:
        tx.execute(
            "INSERT INTO arm_converters (campaign_pk, user_id, arm_id, orders, revenue_fen)"
            " VALUES (?, ?, ?, ?, ?)",
            (campaign_pk, user_id, arm_id, new_orders, new_revenue),
        )
    else:
        tx.execute(
            "UPDATE arm_converters SET orders = ?, revenue_fen = ? WHERE campaign_pk = ? AND user_id = ?",
            (new_orders, new_revenue, campaign_pk, user_id),
        )
    converted = int(new_orders > 0) - int(old_orders > 0)
    tx.execute(
        "UPDATE arm_stats SET converted = converted + ?, orders = orders + ?, refunds = refunds + ?,"
        " revenue_fen = revenue_fen + ?, sum_y2 = sum_y2 + ?, sum_xy = sum_xy + ?, sum_xb = sum_xb + ?,"
        " update_us = ? WHERE campaign_pk = ? AND arm_id = ?",
        (
            converted,
            sign,
            1 if sign < 0 else 0,
            sign * amount,
            float(new_revenue) ** 2 - float(old_revenue) ** 2,
            float(spend) * sign * amount,
            float(spend) * converted,
            now,
            campaign_pk,
            arm_id,
        ),
    )


# --- reading -------------------------------------------------------------------------------------


def arm_outcomes(tx: Tx, campaign_pk: int) -> dict[str, ArmOutcome]:
    """The arms' sums (one row per arm: no member or order is scanned)."""
    out: dict[str, ArmOutcome] = {}
    for row in tx.all("SELECT * FROM arm_stats WHERE campaign_pk = ?", (campaign_pk,)):
        sums = ArmSums(
            n=int(row["members"]),
            converted=int(row["converted"]),
            sum_y=float(row["revenue_fen"]),
            sum_y2=float(row["sum_y2"]),
            sum_x=float(row["sum_x"]),
            sum_x2=float(row["sum_x2"]),
            sum_xy=float(row["sum_xy"]),
            sum_xb=float(row["sum_xb"]),
        )
        stages = {stage: int(row[stage]) for stage in FUNNEL_STAGES.values()}
        out[row["arm_id"]] = ArmOutcome(
            sums, int(row["orders"]), int(row["refunds"]), int(row["update_us"]), stages
        )
    return out


def item_outcomes(tx: Tx, campaign_pk: int) -> list[tuple[int, int, int]]:
    """``(item_id, units, gmv_fen)`` of the campaign's attributed, unrefunded orders."""
    rows = tx.all("SELECT item_id, units, gmv_fen FROM item_stats WHERE campaign_pk = ?", (campaign_pk,))
    return [(int(r["item_id"]), int(r["units"]), int(r["gmv_fen"])) for r in rows]


# --- funnel --------------------------------------------------------------------------------------


def record_funnel(tx: Tx, events: Sequence[tuple[str, int, int, int | None, int]], now: int) -> int:
    """Count funnel stages ``(owner, event type, user, item, ts_us)`` for the members they touch:
    the event's last touch per visible tenant (as for orders), an offered item (any item when the
    campaign offers none), each stage once per member. Returns the stages newly reached."""
    if not events:
        return 0
    memberships = _memberships(tx, (e[2] for e in events))
    reached = 0
    offered: dict[int, set[int]] = {}
    for owner, kind, user, item, ts_us in events:
        for m in _last_touches(memberships.get(user, ()), owner, ts_us).values():
            items = offered.setdefault(m["campaign_pk"], set(json.loads(m["offer_item_ids"])))
            if items and item not in items:
                continue
            stage = FUNNEL_STAGES[kind]
            if tx.execute(
                "INSERT INTO funnel_members (campaign_pk, user_id, stage) VALUES (?, ?, ?)"
                " ON CONFLICT (campaign_pk, user_id, stage) DO NOTHING",
                (m["campaign_pk"], user, stage),
            ):
                tx.execute(
                    f"UPDATE arm_stats SET {stage} = {stage} + 1, update_us = ?"
                    " WHERE campaign_pk = ? AND arm_id = ?",
                    (now, m["campaign_pk"], m["arm_id"]),
                )
                reached += 1
    return reached


# --- feed checkpoints ----------------------------------------------------------------------------


def checkpoint(tx: Tx, name: str, *, lock: bool = False) -> tuple[int, int]:
    """``(seq, event_us)`` a stream consumer has applied (0s when new); ``lock`` holds it until commit."""
    if lock:
        tx.execute(
            "INSERT INTO feed_checkpoints (name, seq, event_us, update_us) VALUES (?, 0, 0, 0)"
            " ON CONFLICT (name) DO NOTHING",
            (name,),
        )
    row = tx.one(
        "SELECT seq, event_us FROM feed_checkpoints WHERE name = ?" + (tx.for_update if lock else ""), (name,)
    )
    return (int(row["seq"]), int(row["event_us"])) if row else (0, 0)


def advance(tx: Tx, name: str, seq: int, event_us: int, now: int) -> None:
    tx.execute(
        "UPDATE feed_checkpoints SET seq = ?, event_us = CASE WHEN event_us > ? THEN event_us ELSE ? END,"
        " update_us = ? WHERE name = ?",
        (seq, event_us, event_us, now, name),
    )


__all__ = [
    "FUNNEL_STAGES",
    "ArmOutcome",
    "OrderFact",
    "add_members",
    "advance",
    "arm_outcomes",
    "attribute_order",
    "checkpoint",
    "insert_order",
    "item_outcomes",
    "pre_period_spend",
    "record_funnel",
    "record_orders",
    "record_refund",
    "undo_attributions",
]
