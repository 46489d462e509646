"""Request validation: protos in, validated specs out, or INVALID_ARGUMENT naming every bad field.

Field paths follow the request message (``coupon_template.percent_off.basis_points``,
``campaign.arms[1].weight``) so a caller can point at the exact input. Validation never touches
the database; references (templates, packs, campaigns) are checked by the repository and the
audience client, which answer NOT_FOUND.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.retarget import domain as d
from services.retarget.repository import (
    ArmInput,
    CampaignSpec,
    CampaignUpdate,
    RedeemRequest,
    TemplateSpec,
)
from services.runtime import InvalidArgument, NotFound

MAX_STOCK = 10**9
MAX_PER_USER_LIMIT = 1000
MAX_ARMS = 20
MAX_RULES = 50
MAX_ITEMS = 1000
MAX_WEIGHT = 1_000_000
MAX_RATE = 1_000_000
MAX_TEXT = 200
MAX_KEY = 128
MAX_VALID_FOR_US = 3650 * 86_400 * 1_000_000
#: An order time may lie this far in the future (clock skew), not more.
ORDER_TIME_SKEW_US = 300 * 1_000_000
# Timestamp range of google.protobuf.Timestamp (0001-01-01 .. 9999-12-31).
_MIN_TS, _MAX_TS = -62135596800, 253402300799
_CURRENCY = re.compile(r"[A-Z]{3}")
_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
#: Attribution window of a campaign's orders: default 7 days, at most 90.
DEFAULT_ATTRIBUTION_WINDOW_US = 7 * 86_400_000_000
MAX_ATTRIBUTION_WINDOW_US = 90 * 86_400_000_000

REFUND_POLICIES = {
    coupon_pb2.REFUND_POLICY_UNSPECIFIED: "RELEASE",
    coupon_pb2.REFUND_POLICY_RELEASE: "RELEASE",
    coupon_pb2.REFUND_POLICY_VOID: "VOID",
}

Violations = list[tuple[str, str]]


def _fail(violations: Violations) -> None:
    if violations:
        raise InvalidArgument(violations)


def _fen(violations: Violations, field: str, value: int, *, positive: bool) -> None:
    if positive and value <= 0:
        violations.append((field, "must be greater than 0 fen"))
    elif value < 0:
        violations.append((field, "must not be negative"))
    elif value > d.MAX_FEN:
        violations.append((field, f"must be at most {d.MAX_FEN} fen"))


def _timestamp_us(violations: Violations, field: str, ts: Timestamp) -> int | None:
    if not (_MIN_TS <= ts.seconds <= _MAX_TS) or not (0 <= ts.nanos < 1_000_000_000):
        violations.append((field, "is not a valid timestamp"))
        return None
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _duration_us(violations: Violations, field: str, value: Duration) -> int | None:
    micros = value.seconds * 1_000_000 + value.nanos // 1000
    if micros < 0:
        violations.append((field, "must not be negative"))
        return None
    if micros > MAX_VALID_FOR_US:
        violations.append((field, "must be at most 3650 days"))
        return None
    return micros or None


def _text(violations: Violations, field: str, value: str, limit: int = MAX_TEXT) -> None:
    if len(value) > limit:
        violations.append((field, f"must be at most {limit} characters"))


def _items(violations: Violations, field: str, values: Sequence[int]) -> tuple[int, ...]:
    if len(values) > MAX_ITEMS:
        violations.append((field, f"at most {MAX_ITEMS} items"))
    return tuple(sorted(set(values)))


def _item_costs(violations: Violations, costs: Sequence[campaign_pb2.ItemCost]) -> str:
    """``campaign.item_costs`` -> the JSON the ledger keeps (sorted by item id)."""
    if len(costs) > MAX_ITEMS:
        violations.append(("campaign.item_costs", f"at most {MAX_ITEMS} items"))
    seen: set[int] = set()
    out = []
    for i, cost in enumerate(costs):
        field = f"campaign.item_costs[{i}]"
        if cost.item_id <= 0:
            violations.append((f"{field}.item_id", "must be greater than 0"))
        elif cost.item_id in seen:
            violations.append((f"{field}.item_id", f"duplicate item {cost.item_id}"))
        seen.add(cost.item_id)
        _fen(violations, f"{field}.unit_cost_fen", cost.unit_cost_fen, positive=False)
        out.append({"item_id": cost.item_id, "unit_cost_fen": cost.unit_cost_fen, "hook": cost.hook})
    return json.dumps(sorted(out, key=lambda c: c["item_id"]))


def tenant_of_parent(parent: str, field: str = "parent") -> str:
    tenant = d.parse_parent(parent)
    if tenant is None:
        raise InvalidArgument(field, "must be tenants/{tenant}")
    return tenant


def parse_resource(name: str, collection: str, field: str, pattern: str) -> tuple[str, str]:
    if not name:
        raise InvalidArgument(field, "is required")
    parsed = d.parse_name(name, collection)
    if parsed is None:
        raise InvalidArgument(field, f"must be {pattern}")
    return parsed


def template_ref(name: str, field: str) -> tuple[str, str]:
    return parse_resource(
        name, "couponTemplates", field, "tenants/{tenant}/couponTemplates/{coupon_template}"
    )


def campaign_ref(name: str, field: str = "name") -> tuple[str, str]:
    return parse_resource(name, "campaigns", field, "tenants/{tenant}/campaigns/{campaign}")


def coupon_ref(name: str, field: str = "coupon") -> tuple[str, str]:
    return parse_resource(name, "coupons", field, "tenants/{tenant}/coupons/{coupon}")


def pack_ref(name: str, tenant: str, field: str) -> str:
    """A pack of ``tenant``; another tenant's pack is NOT_FOUND (its existence is not revealed)."""
    owner, _ = parse_resource(name, "packs", field, "tenants/{tenant}/packs/{pack}")
    if owner != tenant:
        raise NotFound(d.PACK_TYPE, name, metadata={"field": field})
    return name


def same_tenant_template(name: str, tenant: str, field: str) -> str:
    owner, template_id = template_ref(name, field)
    if owner != tenant:
        raise NotFound(d.TEMPLATE_TYPE, name, metadata={"field": field})
    return template_id


# --- templates ---------------------------------------------------------------------------------


def template_spec(request: retarget_service_pb2.CreateCouponTemplateRequest) -> TemplateSpec:
    tenant = tenant_of_parent(request.parent)
    violations: Violations = []
    if not d.valid_id(request.coupon_template_id):
        violations.append(("coupon_template_id", "must match [a-z]([a-z0-9-]{0,61}[a-z0-9])?"))
    if not request.HasField("coupon_template"):
        violations.append(("coupon_template", "is required"))
        _fail(violations)
    t = request.coupon_template
    f = "coupon_template"
    _text(violations, f"{f}.display_name", t.display_name)
    kind = t.WhichOneof("discount")
    discount = d.Discount()
    if kind is None:
        violations.append((f"{f}.discount", "one of fixed_amount or percent_off is required"))
    elif kind == "fixed_amount":
        _fen(violations, f"{f}.fixed_amount.amount_fen", t.fixed_amount.amount_fen, positive=True)
        discount = d.Discount(amount_fen=t.fixed_amount.amount_fen)
    else:
        bp = t.percent_off.basis_points
        if not 1 <= bp <= d.BASIS_POINTS:
            violations.append(
                (f"{f}.percent_off.basis_points", "must be between 1 and 10000 (0.01% to 100%)")
            )
        _fen(violations, f"{f}.percent_off.cap_fen", t.percent_off.cap_fen, positive=True)
        discount = d.Discount(basis_points=bp, cap_fen=t.percent_off.cap_fen)
    _fen(violations, f"{f}.min_spend_fen", t.min_spend_fen, positive=False)
    start = (
        _timestamp_us(violations, f"{f}.valid_start_time", t.valid_start_time)
        if t.HasField("valid_start_time")
        else None
    )
    end = (
        _timestamp_us(violations, f"{f}.valid_end_time", t.valid_end_time)
        if t.HasField("valid_end_time")
        else None
    )
    if start is not None and end is not None and end <= start:
        violations.append((f"{f}.valid_end_time", "must be after valid_start_time"))
    valid_for = _duration_us(violations, f"{f}.valid_for", t.valid_for) if t.HasField("valid_for") else None
    items = _items(violations, f"{f}.applicable_item_ids", t.applicable_item_ids)
    if t.total_stock < 0:
        violations.append((f"{f}.total_stock", "must not be negative (0 = unlimited)"))
    elif t.total_stock > MAX_STOCK:
        violations.append((f"{f}.total_stock", f"must be at most {MAX_STOCK}"))
    _fen(violations, f"{f}.budget_cap_fen", t.budget_cap_fen, positive=False)
    if 0 < t.budget_cap_fen < discount.face_value_fen:
        violations.append((f"{f}.budget_cap_fen", "is below the face value of a single coupon"))
    if t.per_user_limit < 0:
        violations.append((f"{f}.per_user_limit", "must be at least 1 (0 = the default 1)"))
    elif t.per_user_limit > MAX_PER_USER_LIMIT:
        violations.append((f"{f}.per_user_limit", f"must be at most {MAX_PER_USER_LIMIT}"))
    if t.refund_policy not in REFUND_POLICIES:
        violations.append((f"{f}.refund_policy", "unknown refund policy"))
    currency = t.currency_code or d.DEFAULT_CURRENCY
    if not _CURRENCY.fullmatch(currency):
        violations.append((f"{f}.currency_code", "must be an ISO 4217 code such as CNY"))
    _fail(violations)
    return TemplateSpec(
        tenant=tenant,
        template_id=request.coupon_template_id,
        display_name=t.display_name,
        discount=discount,
        min_spend_fen=t.min_spend_fen,
        valid_start_us=start,
        valid_end_us=end,
        valid_for_us=valid_for,
        item_ids=items,
        total_stock=t.total_stock,
        budget_cap_fen=t.budget_cap_fen,
        per_user_limit=t.per_user_limit or 1,
        refund_policy=REFUND_POLICIES.get(t.refund_policy, "RELEASE"),
        currency_code=currency,
    )


# --- campaigns ---------------------------------------------------------------------------------


def _rules(violations: Violations, tenant: str, rules: Sequence[campaign_pb2.Rule]) -> str:
    """Rules are stored with the campaign (evaluated by a later release); check their shape."""
    if len(rules) > MAX_RULES:
        violations.append(("campaign.rules", f"at most {MAX_RULES} rules"))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        f = f"campaign.rules[{i}]"
        if not d.valid_arm_id(rule.rule_id):
            violations.append((f"{f}.rule_id", "must match [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"))
        elif rule.rule_id in seen:
            violations.append((f"{f}.rule_id", f"duplicate rule id {rule.rule_id!r}"))
        seen.add(rule.rule_id)
        if rule.action not in (
            campaign_pb2.Rule.ACTION_STOP,
            campaign_pb2.Rule.ACTION_BOOST,
            campaign_pb2.Rule.ACTION_COPY,
        ):
            violations.append((f"{f}.action", "is required"))
        if not rule.metric or len(rule.metric) > 64:
            violations.append((f"{f}.metric", "is required (at most 64 characters)"))
        if rule.comparison == campaign_pb2.Rule.COMPARISON_UNSPECIFIED or rule.comparison not in (
            campaign_pb2.Rule.COMPARISON_LESS,
            campaign_pb2.Rule.COMPARISON_LESS_OR_EQUAL,
            campaign_pb2.Rule.COMPARISON_GREATER,
            campaign_pb2.Rule.COMPARISON_GREATER_OR_EQUAL,
        ):
            violations.append((f"{f}.comparison", "is required"))
        if not math.isfinite(rule.threshold):
            violations.append((f"{f}.threshold", "must be a finite number"))
        for name in ("sustain", "cooldown"):
            if rule.HasField(name):
                _duration_us(violations, f"{f}.{name}", getattr(rule, name))
        if rule.action == campaign_pb2.Rule.ACTION_BOOST and rule.boost_rate_ceiling <= 0:
            violations.append((f"{f}.boost_rate_ceiling", "must be greater than 0 for BOOST"))
        if rule.action == campaign_pb2.Rule.ACTION_COPY:
            parsed = d.parse_name(rule.copy_to_pack, "packs")
            if parsed is None or parsed[0] != tenant:
                violations.append((f"{f}.copy_to_pack", "must be a pack of the campaign's tenant for COPY"))
    return json.dumps([json_format.MessageToDict(rule, preserving_proto_field_name=True) for rule in rules])


def _rate(violations: Violations, rate: int) -> None:
    if rate < 0:
        violations.append(("campaign.delivery_rate_per_second", "must not be negative (0 = unlimited)"))
    elif rate > MAX_RATE:
        violations.append(("campaign.delivery_rate_per_second", f"must be at most {MAX_RATE}"))


def campaign_spec(request: retarget_service_pb2.CreateCampaignRequest, now: int) -> CampaignSpec:
    tenant = tenant_of_parent(request.parent)
    violations: Violations = []
    if not d.valid_id(request.campaign_id):
        violations.append(("campaign_id", "must match [a-z]([a-z0-9-]{0,61}[a-z0-9])?"))
    if not request.HasField("campaign"):
        violations.append(("campaign", "is required"))
        _fail(violations)
    c = request.campaign
    _text(violations, "campaign.display_name", c.display_name)
    if not c.audience_pack:
        violations.append(("campaign.audience_pack", "is required"))
    elif d.parse_name(c.audience_pack, "packs") is None:
        violations.append(("campaign.audience_pack", "must be tenants/{tenant}/packs/{pack}"))
    if not c.coupon_template:
        violations.append(("campaign.coupon_template", "is required"))
    elif d.parse_name(c.coupon_template, "couponTemplates") is None:
        violations.append(
            ("campaign.coupon_template", "must be tenants/{tenant}/couponTemplates/{coupon_template}")
        )
    items = _items(violations, "campaign.offer_item_ids", c.offer_item_ids)
    if len(c.arms) > MAX_ARMS:
        violations.append(("campaign.arms", f"at most {MAX_ARMS} arms"))
    seen: set[str] = set()
    arm_specs: list[tuple[str, int, str, str]] = []
    for i, arm in enumerate(c.arms):
        f = f"campaign.arms[{i}]"
        if not d.valid_arm_id(arm.arm_id):
            violations.append(
                (f"{f}.arm_id", "must match [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])? and not be 'holdout'")
            )
        elif arm.arm_id in seen:
            violations.append((f"{f}.arm_id", f"duplicate arm id {arm.arm_id!r}"))
        seen.add(arm.arm_id)
        if arm.weight <= 0:
            violations.append((f"{f}.weight", "must be greater than 0"))
        elif arm.weight > MAX_WEIGHT:
            violations.append((f"{f}.weight", f"must be at most {MAX_WEIGHT}"))
        if arm.coupon_template and d.parse_name(arm.coupon_template, "couponTemplates") is None:
            violations.append(
                (f"{f}.coupon_template", "must be tenants/{tenant}/couponTemplates/{coupon_template}")
            )
        arm_specs.append((arm.arm_id, arm.weight, arm.coupon_template, f))
    if not 0 <= c.holdout_basis_points <= d.MAX_HOLDOUT_BP:
        violations.append(("campaign.holdout_basis_points", "must be between 0 and 5000 (at most 50%)"))
    start = (
        _timestamp_us(violations, "campaign.start_time", c.start_time) if c.HasField("start_time") else None
    )
    end = _timestamp_us(violations, "campaign.end_time", c.end_time) if c.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        violations.append(("campaign.end_time", "must be after start_time"))
    elif end is not None and end <= now:
        violations.append(("campaign.end_time", "must be in the future"))
    _fen(violations, "campaign.loss_cap_fen", c.loss_cap_fen, positive=False)
    _rate(violations, c.delivery_rate_per_second)
    window_us = DEFAULT_ATTRIBUTION_WINDOW_US
    if c.HasField("attribution_window"):
        window_us = c.attribution_window.ToMicroseconds()
        if not 0 < window_us <= MAX_ATTRIBUTION_WINDOW_US:
            violations.append(("campaign.attribution_window", "must be more than 0 and at most 90 days"))
    item_costs = _item_costs(violations, c.item_costs)
    if not 0.0 <= c.expected_conversion_rate < 1.0 or math.isnan(c.expected_conversion_rate):
        violations.append(
            ("campaign.expected_conversion_rate", "must be at least 0 and below 1 (0 = unknown)")
        )
    rules_json = _rules(violations, tenant, c.rules)
    _fail(violations)
    # References to other tenants' resources are NOT_FOUND, like any unknown resource.
    audience_pack = pack_ref(c.audience_pack, tenant, "campaign.audience_pack")
    template_id = same_tenant_template(c.coupon_template, tenant, "campaign.coupon_template")
    arms = tuple(
        ArmInput(arm_id, weight, same_tenant_template(ref, tenant, f"{f}.coupon_template") if ref else "", f)
        for arm_id, weight, ref, f in arm_specs
    )
    return CampaignSpec(
        tenant=tenant,
        campaign_id=request.campaign_id,
        display_name=c.display_name,
        audience_pack=audience_pack,
        offer_item_ids=items,
        template_id=template_id,
        arms=arms,
        holdout_bp=c.holdout_basis_points,
        start_us=start,
        end_us=end,
        loss_cap_fen=c.loss_cap_fen,
        delivery_rate=c.delivery_rate_per_second,
        rules_json=rules_json,
        attribution_window_us=window_us,
        item_costs_json=item_costs,
        expected_rate=c.expected_conversion_rate,
    )


#: UpdateCampaign: mask path -> campaigns column. Every other Campaign field is immutable (fixed at
#: creation, or output only).
MUTABLE_CAMPAIGN_FIELDS = {
    "display_name": "display_name",
    "delivery_rate_per_second": "delivery_rate",
    "loss_cap_fen": "loss_cap_fen",
    "end_time": "end_us",
    "rules": "rules",
}
MAX_FIRING_METRICS = 64


def _populated(c: campaign_pb2.Campaign, path: str) -> bool:
    if path == "end_time":
        return c.HasField("end_time")
    if path == "rules":
        return len(c.rules) > 0
    return bool(getattr(c, path))


def campaign_update(request: retarget_service_pb2.UpdateCampaignRequest, now: int) -> CampaignUpdate:
    """AIP-134: the mask names the fields to change (``*`` = all mutable ones; empty = the mutable
    fields set in ``campaign``); unknown, immutable or nested paths are INVALID_ARGUMENT."""
    if not request.HasField("campaign"):
        raise InvalidArgument("campaign", "is required")
    c = request.campaign
    tenant, campaign_id = campaign_ref(c.name, "campaign.name")
    violations: Violations = []
    known = {f.name for f in campaign_pb2.Campaign.DESCRIPTOR.fields}
    paths: list[str] = []
    if request.HasField("update_mask") and request.update_mask.paths:
        for i, path in enumerate(request.update_mask.paths):
            f = f"update_mask.paths[{i}]"
            if path == "*":
                paths.extend(MUTABLE_CAMPAIGN_FIELDS)
            elif path in MUTABLE_CAMPAIGN_FIELDS:
                paths.append(path)
            elif path.split(".")[0] in MUTABLE_CAMPAIGN_FIELDS:
                violations.append((f, f"{path!r}: update {path.split('.')[0]!r} as a whole"))
            elif path.split(".")[0] in known:
                violations.append((f, f"{path!r} is immutable or output only"))
            else:
                violations.append((f, f"{path!r} is not a Campaign field"))
    else:
        paths = [path for path in MUTABLE_CAMPAIGN_FIELDS if _populated(c, path)]
        if not paths:
            violations.append(("update_mask", "names no field, and campaign sets no mutable field"))
    _fail(violations)
    values: dict[str, Any] = {}
    for path in dict.fromkeys(paths):
        if path == "display_name":
            _text(violations, "campaign.display_name", c.display_name)
            values["display_name"] = c.display_name
        elif path == "delivery_rate_per_second":
            _rate(violations, c.delivery_rate_per_second)
            values["delivery_rate"] = c.delivery_rate_per_second
        elif path == "loss_cap_fen":
            _fen(violations, "campaign.loss_cap_fen", c.loss_cap_fen, positive=False)
            values["loss_cap_fen"] = c.loss_cap_fen
        elif path == "end_time":
            end = None
            if c.HasField("end_time"):
                end = _timestamp_us(violations, "campaign.end_time", c.end_time)
                if end is not None and end <= now:
                    violations.append(("campaign.end_time", "must be in the future"))
            values["end_us"] = end
        elif path == "rules":
            values["rules"] = _rules(violations, tenant, c.rules)
    firing = rule_firing(violations, request, now)
    _fail(violations)
    return CampaignUpdate(tenant, campaign_id, c.etag, values, firing)


def rule_firing(violations: Violations, request: Any, now: int) -> dict[str, Any] | None:
    """The ``rule_firing`` of an action request (the rules engine's audit entry), as stored."""
    if not request.HasField("rule_firing"):
        return None
    firing = request.rule_firing
    f = "rule_firing"
    if not d.valid_arm_id(firing.rule_id):
        violations.append((f"{f}.rule_id", "must match [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"))
    actions = (campaign_pb2.Rule.ACTION_STOP, campaign_pb2.Rule.ACTION_BOOST, campaign_pb2.Rule.ACTION_COPY)
    if firing.action not in actions:
        violations.append((f"{f}.action", "is required"))
    if len(firing.metrics) > MAX_FIRING_METRICS:
        violations.append((f"{f}.metrics", f"at most {MAX_FIRING_METRICS} metrics"))
    for name, value in firing.metrics.items():
        if len(name) > 64 or not math.isfinite(value):
            violations.append((f"{f}.metrics[{name[:64]!r}]", "name at most 64 characters, value finite"))
    fire_us = now
    if firing.HasField("fire_time"):
        fire_us = _timestamp_us(violations, f"{f}.fire_time", firing.fire_time) or now
    return {
        "rule_id": firing.rule_id,
        "action": campaign_pb2.Rule.Action.Name(firing.action) if firing.action in actions else "",
        "fire_time_us": fire_us,
        "metrics": dict(sorted(firing.metrics.items())),
    }


# --- claims, redemptions, refunds --------------------------------------------------------------


def user_id(value: int, field: str = "user_id") -> int:
    if value > d.MAX_USER_ID:
        raise InvalidArgument(field, f"must be at most {d.MAX_USER_ID}")
    return value


def key(violations: Violations, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            violations.append((field, "is required"))
    elif not _KEY.fullmatch(value):
        violations.append((field, f"must be 1-{MAX_KEY} printable ASCII characters without spaces"))


def redeem_request(request: retarget_service_pb2.RedeemCouponRequest, now: int) -> RedeemRequest:
    tenant, coupon_id = coupon_ref(request.coupon)
    violations: Violations = []
    if request.user_id > d.MAX_USER_ID:
        violations.append(("user_id", f"must be at most {d.MAX_USER_ID}"))
    key(violations, "order_id", request.order_id, required=True)
    key(violations, "idempotency_key", request.idempotency_key, required=True)
    _fen(violations, "order_amount_fen", request.order_amount_fen, positive=True)
    items = _items(violations, "item_ids", request.item_ids)
    order_us = None
    if request.HasField("order_time"):
        order_us = _timestamp_us(violations, "order_time", request.order_time)
        if order_us is not None and order_us > now + ORDER_TIME_SKEW_US:
            violations.append(("order_time", "must not be in the future"))
    _fail(violations)
    return RedeemRequest(
        tenant=tenant,
        coupon_id=coupon_id,
        user_id=request.user_id,
        order_id=request.order_id,
        order_amount_fen=request.order_amount_fen,
        item_ids=items,
        idempotency_key=request.idempotency_key,
        order_us=order_us,
    )


def page_size(value: int, default: int = 50, maximum: int = 1000) -> int:
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(value or default, maximum)
