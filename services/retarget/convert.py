"""Ledger rows to protos (and page tokens)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any

from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2
from google.longrunning import operations_pb2
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2

from services.retarget import domain as d
from services.retarget import stats
from services.runtime import InvalidArgument

Row = dict[str, Any]

_CAMPAIGN_STATES = {
    d.DRAFT: campaign_pb2.Campaign.STATE_DRAFT,
    d.RUNNING: campaign_pb2.Campaign.STATE_RUNNING,
    d.PAUSED: campaign_pb2.Campaign.STATE_PAUSED,
    d.COMPLETED: campaign_pb2.Campaign.STATE_COMPLETED,
    d.CANCELLED: campaign_pb2.Campaign.STATE_CANCELLED,
}
_COUPON_STATES = {
    d.ISSUED: coupon_pb2.Coupon.STATE_ISSUED,
    d.REDEEMED: coupon_pb2.Coupon.STATE_REDEEMED,
    d.VOID: coupon_pb2.Coupon.STATE_VOID,
}
STATE_FILTERS = {
    **{name: name for name in _CAMPAIGN_STATES},
    **{f"STATE_{name}": name for name in _CAMPAIGN_STATES},
}


def timestamp(us: int | None) -> Timestamp | None:
    if us is None:
        return None
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def duration(us: int | None) -> Duration | None:
    if not us:
        return None
    return Duration(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _set_time(message: Any, field: str, us: int | None) -> None:
    value = timestamp(us)
    if value is not None:
        getattr(message, field).CopyFrom(value)


def template_proto(row: Row) -> coupon_pb2.CouponTemplate:
    template = coupon_pb2.CouponTemplate(
        name=d.template_name(row["tenant"], row["template_id"]),
        display_name=row["display_name"],
        min_spend_fen=row["min_spend_fen"],
        applicable_item_ids=json.loads(row["item_ids"]),
        total_stock=row["total_stock"],
        budget_cap_fen=row["budget_cap_fen"],
        per_user_limit=row["per_user_limit"],
        refund_policy=(
            coupon_pb2.REFUND_POLICY_VOID
            if row["refund_policy"] == "VOID"
            else coupon_pb2.REFUND_POLICY_RELEASE
        ),
        currency_code=row["currency_code"],
        issued_count=row["issued_count"],
        issued_value_fen=row["issued_value_fen"],
    )
    if row["discount_kind"] == "PERCENT":
        template.percent_off.basis_points = row["basis_points"]
        template.percent_off.cap_fen = row["cap_fen"]
    else:
        template.fixed_amount.amount_fen = row["amount_fen"]
    _set_time(template, "valid_start_time", row["valid_start_us"])
    _set_time(template, "valid_end_time", row["valid_end_us"])
    valid_for = duration(row["valid_for_us"])
    if valid_for is not None:
        template.valid_for.CopyFrom(valid_for)
    _set_time(template, "create_time", row["create_us"])
    return template


def progress_proto(row: Row) -> campaign_pb2.LaunchProgress:
    stop_reason = row["stop_reason"]
    if row["launch_error"]:
        stop_reason = f"LAUNCH_FAILED: {row['launch_error']}"
    return campaign_pb2.LaunchProgress(
        audience_size=row["audience_size"],
        processed=row["processed"],
        issued=row["issued"],
        held_out=row["held_out"],
        skipped=row["skipped"],
        stop_reason=stop_reason,
    )


def power_plan(row: Row, arms: list[dict[str, Any]]) -> campaign_pb2.PowerPlan:
    """First arm against the holdout at the audience's size (the launch's, else the pack's at creation)."""
    size = int(row["audience_size"] or row["planned_size"] or 0)
    total = sum(arm["weight"] for arm in arms)
    first = d.arm_share_bp(arms[0]["weight"], total, row["holdout_bp"]) if arms else 0.0
    arm_members = int(size * first / d.BASIS_POINTS)
    holdout_members = int(size * row["holdout_bp"] / d.BASIS_POINTS)
    mde = stats.minimum_detectable_effect(float(row["expected_rate"]), arm_members, holdout_members)
    return campaign_pb2.PowerPlan(
        arm_members=arm_members,
        holdout_members=holdout_members,
        minimum_detectable_effect=mde if math.isfinite(mde) else 0.0,
    )


def campaign_proto(row: Row) -> campaign_pb2.Campaign:
    tenant = row["tenant"]
    arms = json.loads(row["arms"])
    campaign = campaign_pb2.Campaign(
        name=d.campaign_name(tenant, row["campaign_id"]),
        display_name=row["display_name"],
        audience_pack=row["audience_pack"],
        offer_item_ids=json.loads(row["offer_item_ids"]),
        arms=[
            campaign_pb2.Arm(
                arm_id=arm["arm_id"],
                weight=arm["weight"],
                coupon_template=d.template_name(tenant, arm["template_id"]),
            )
            for arm in arms
        ],
        holdout_basis_points=row["holdout_bp"],
        loss_cap_fen=row["loss_cap_fen"],
        delivery_rate_per_second=row["delivery_rate"],
        state=_CAMPAIGN_STATES[row["state"]],
        progress=progress_proto(row),
        etag=f'W/"{row["version"]}"',
    )
    campaign.coupon_template = d.template_name(tenant, row["template_id"])
    campaign.attribution_window.FromMicroseconds(int(row["attribution_window_us"]))
    for cost in json.loads(row["item_costs"]):
        campaign.item_costs.add(**cost)
    campaign.expected_conversion_rate = row["expected_rate"]
    campaign.power_plan.CopyFrom(power_plan(row, arms))
    for rule in json.loads(row["rules"]):
        json_format.ParseDict(rule, campaign.rules.add())
    _set_time(campaign, "start_time", row["start_us"])
    _set_time(campaign, "end_time", row["end_us"])
    _set_time(campaign, "create_time", row["create_us"])
    _set_time(campaign, "update_time", row["update_us"])
    return campaign


def rule_firing_proto(entry: dict[str, Any]) -> campaign_pb2.RuleFiring:
    """A ``rule_firing`` audit entry (repository.rule_firings) as the report shows it."""
    action = entry.get("action") or "ACTION_UNSPECIFIED"
    actions = campaign_pb2.Rule.Action
    firing = campaign_pb2.RuleFiring(
        rule_id=entry.get("rule_id", ""),
        action=action if action in actions.keys() else "ACTION_UNSPECIFIED",  # noqa: SIM118
        metrics={name: float(value) for name, value in (entry.get("metrics") or {}).items()},
        outcome=entry.get("outcome", ""),
    )
    _set_time(firing, "fire_time", entry.get("fire_time_us") or entry["create_us"])
    return firing


def coupon_proto(row: Row, now: int) -> coupon_pb2.Coupon:
    """From a coupon row (with template_id / campaign_id joined) or a stored snapshot."""
    tenant = row["tenant"]
    state = _COUPON_STATES[row["state"]]
    if state == coupon_pb2.Coupon.STATE_ISSUED and row["expire_us"] is not None and row["expire_us"] <= now:
        state = coupon_pb2.Coupon.STATE_EXPIRED
    coupon = coupon_pb2.Coupon(
        name=d.coupon_name(tenant, row["coupon_id"]),
        coupon_template=d.template_name(tenant, row["template_id"]),
        campaign=d.campaign_name(tenant, row["campaign_id"]) if row.get("campaign_id") else "",
        arm=row["arm_id"] or "",
        user_id=row["user_id"],
        state=state,
        face_value_fen=row["face_value_fen"],
        order_id=row["order_id"] or "",
        discount_fen=row["discount_fen"] or 0,
    )
    _set_time(coupon, "issue_time", row["issue_us"])
    _set_time(coupon, "expire_time", row["expire_us"])
    return coupon


def redeem_response(
    result: dict[str, Any], replayed: bool, now: int
) -> retarget_service_pb2.RedeemCouponResponse:
    return retarget_service_pb2.RedeemCouponResponse(
        coupon=coupon_proto(result["coupon"], now),
        discount_fen=result["discount_fen"],
        payable_fen=result["payable_fen"],
        replayed=replayed,
    )


def launch_operation(row: Row) -> operations_pb2.Operation:
    operation = operations_pb2.Operation(name=d.launch_operation_name(row["tenant"], row["campaign_id"]))
    operation.metadata.Pack(progress_proto(row))
    state = row["state"]
    if state == d.COMPLETED:
        operation.done = True
        operation.response.Pack(campaign_proto(row))
    elif state == d.CANCELLED:
        operation.done = True
        operation.error.CopyFrom(status_pb2.Status(code=code_pb2.CANCELLED, message="campaign was cancelled"))
    elif state == d.PAUSED and row["launch_error"]:
        operation.done = True
        operation.error.CopyFrom(
            status_pb2.Status(
                code=code_pb2.ABORTED,
                message=f"launch paused: {row['launch_error']}; ResumeCampaign retries it",
            )
        )
    return operation


# --- page tokens -------------------------------------------------------------------------------


def _query_digest(query: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(query: dict[str, Any], key: Any) -> str:
    payload = json.dumps({"q": _query_digest(query), "k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, query: dict[str, Any]) -> Any:
    """The key after which the next page starts; INVALID_ARGUMENT for a token of another query."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if payload["q"] != _query_digest(query):
            raise ValueError("token of another query")
        return payload["k"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page_token", "is invalid or was issued for a different request") from None
