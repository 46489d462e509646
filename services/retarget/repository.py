"""The ledger: every read and write of the retarget service, one code path for both databases.

Each public function takes an open ``Tx`` first and runs inside that one transaction (call it
through ``Database.run``/``Database.call``). Failures raise the runtime's domain errors, which roll
the transaction back: nothing is written by a refused request.

Locking strategy (PostgreSQL, READ COMMITTED; SQLite serialises all writers anyway):

* **Stock and budget** live as counters on the template row. A claim moves them with one
  conditional ``UPDATE ... WHERE issued_count < total_stock AND issued_value + face <= cap``: the
  row lock it takes serialises concurrent claimers, and PostgreSQL re-evaluates the condition on
  the newest row version after waiting, so no interleaving oversells. CHECK constraints on the
  table refuse an oversell even if this code were wrong.
* **Lock order** is always template row(s) (ascending id), then coupon rows, then the outbox
  advisory lock. Every coupon insert happens while its template row is locked, so counting a
  user's coupons under that lock is exact; the per-user limit is then enforced structurally by
  ``UNIQUE (template_pk, user_id, seq)`` with ``seq <= per_user_limit``.
* **Redemptions** lock the coupon row (``FOR UPDATE``) and re-read the idempotency key after
  taking it, so a concurrent retry with the same key replays instead of seeing "already redeemed".
* **Launch batches** lock the campaign row and compare-and-set the launch cursor: a batch from a
  stale or concurrent launcher changes nothing. ``campaign_members (campaign, user)`` and the
  partial unique index ``coupons (campaign, user) WHERE source = 'LAUNCH'`` make a second coupon
  for anyone impossible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.retarget import attribution
from services.retarget import domain as d
from services.retarget.attribution import OrderFact
from services.retarget.db import Row, Tx
from services.retarget.stats import ArmSums
from services.runtime import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

#: pg_advisory_xact_lock key of outbox writers ("outbox" as an int64).
OUTBOX_LOCK_KEY = 0x6F7574626F78

# --- specs (validated input) -------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateSpec:
    tenant: str
    template_id: str
    display_name: str
    discount: d.Discount
    min_spend_fen: int
    valid_start_us: int | None
    valid_end_us: int | None
    valid_for_us: int | None
    item_ids: tuple[int, ...]
    total_stock: int
    budget_cap_fen: int
    per_user_limit: int
    refund_policy: str
    currency_code: str


@dataclass(frozen=True)
class ArmInput:
    arm_id: str
    weight: int
    #: Template id in the campaign's tenant; "" = the campaign's default template.
    template_id: str
    #: Request field path, for error messages.
    field: str


@dataclass(frozen=True)
class CampaignSpec:
    tenant: str
    campaign_id: str
    display_name: str
    audience_pack: str
    offer_item_ids: tuple[int, ...]
    template_id: str
    arms: tuple[ArmInput, ...]
    holdout_bp: int
    start_us: int | None
    end_us: int | None
    loss_cap_fen: int
    delivery_rate: int
    rules_json: str
    attribution_window_us: int = 7 * 86_400_000_000
    #: JSON list of {"item_id", "unit_cost_fen", "hook"} (validation.py sorts it by item id).
    item_costs_json: str = "[]"
    #: Expected conversion rate without the offer (0 = unknown) and the pack's size at creation:
    #: the inputs of the power readout.
    expected_rate: float = 0.0
    planned_size: int = 0


@dataclass(frozen=True)
class CampaignUpdate:
    tenant: str
    campaign_id: str
    #: The caller's etag ("" = unconditional).
    etag: str
    #: campaigns column -> new value (only the fields of the update mask).
    values: dict[str, Any]
    #: The rules engine's firing carried out by this update (validation.rule_firing), or None.
    firing: dict[str, Any] | None = None


# --- small helpers -----------------------------------------------------------------------------


def audit(tx: Tx, tenant: str, subject: str, action: str, detail: dict[str, Any], now: int) -> None:
    tx.execute(
        "INSERT INTO audit_log (tenant, subject, action, detail, create_us) VALUES (?, ?, ?, ?, ?)",
        (tenant, subject, action, json.dumps(detail, sort_keys=True), now),
    )


def audit_entries(tx: Tx, tenant: str, subject: str) -> list[Row]:
    return tx.all(
        "SELECT action, detail, create_us FROM audit_log WHERE tenant = ? AND subject = ? ORDER BY id",
        (tenant, subject),
    )


#: audit_log action of a rule firing (detail: rule_id, action, fire_time_us, metrics, outcome).
RULE_FIRING = "rule_firing"
#: At most this many firings (the newest) are listed in a report.
MAX_REPORTED_FIRINGS = 100


def record_firing(tx: Tx, campaign: Row, firing: dict[str, Any] | None, outcome: str, now: int) -> None:
    """Audit a rule firing on ``campaign`` with what the service did about it."""
    if firing is None:
        return
    name = d.campaign_name(campaign["tenant"], campaign["campaign_id"])
    # A retried action carries the same firing (rule id and fire time): it is audited once.
    for known in rule_firings(tx, campaign["tenant"], name):
        if known.get("rule_id") == firing["rule_id"] and known.get("fire_time_us") == firing["fire_time_us"]:
            return
    audit(tx, campaign["tenant"], name, RULE_FIRING, {**firing, "outcome": outcome}, now)


def rule_firings(
    tx: Tx, tenant: str, subject: str, limit: int = MAX_REPORTED_FIRINGS
) -> list[dict[str, Any]]:
    """The newest ``limit`` firings recorded on a campaign, newest (fire time) first."""
    rows = tx.all(
        "SELECT detail, create_us FROM audit_log WHERE tenant = ? AND subject = ? AND action = ?"
        " ORDER BY id DESC LIMIT ?",
        (tenant, subject, RULE_FIRING, limit),
    )
    firings = [{"create_us": row["create_us"], **json.loads(row["detail"])} for row in rows]
    return sorted(firings, key=lambda f: f.get("fire_time_us") or f["create_us"], reverse=True)


def expire_us_for(template: Row, issue_us: int) -> int | None:
    ends = []
    if template["valid_end_us"] is not None:
        ends.append(template["valid_end_us"])
    if template["valid_for_us"]:
        ends.append(issue_us + template["valid_for_us"])
    return min(ends) if ends else None


def discount_of(template: Row) -> d.Discount:
    return d.Discount(
        amount_fen=template["amount_fen"], basis_points=template["basis_points"], cap_fen=template["cap_fen"]
    )


# --- coupon templates --------------------------------------------------------------------------

TEMPLATE_COLUMNS = (
    "tenant, template_id, display_name, discount_kind, amount_fen, basis_points, cap_fen, face_value_fen,"
    " min_spend_fen, valid_start_us, valid_end_us, valid_for_us, item_ids, total_stock, budget_cap_fen,"
    " per_user_limit, refund_policy, currency_code, create_us"
)


def create_template(tx: Tx, spec: TemplateSpec, now: int) -> Row:
    name = d.template_name(spec.tenant, spec.template_id)
    if tx.one(
        "SELECT id FROM coupon_templates WHERE tenant = ? AND template_id = ?",
        (spec.tenant, spec.template_id),
    ):
        raise AlreadyExists(d.TEMPLATE_TYPE, name)
    discount = spec.discount
    row = tx.one(
        f"INSERT INTO coupon_templates ({TEMPLATE_COLUMNS}) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        (
            spec.tenant,
            spec.template_id,
            spec.display_name,
            "PERCENT" if discount.is_percent else "FIXED",
            discount.amount_fen,
            discount.basis_points,
            discount.cap_fen,
            discount.face_value_fen,
            spec.min_spend_fen,
            spec.valid_start_us,
            spec.valid_end_us,
            spec.valid_for_us,
            json.dumps(list(spec.item_ids)),
            spec.total_stock,
            spec.budget_cap_fen,
            spec.per_user_limit,
            spec.refund_policy,
            spec.currency_code,
            now,
        ),
    )
    assert row is not None
    audit(tx, spec.tenant, name, "create", {"face_value_fen": discount.face_value_fen}, now)
    return row


def get_template(tx: Tx, tenant: str, template_id: str, *, field: str = "name") -> Row:
    row = tx.one("SELECT * FROM coupon_templates WHERE tenant = ? AND template_id = ?", (tenant, template_id))
    if row is None:
        raise NotFound(d.TEMPLATE_TYPE, d.template_name(tenant, template_id), metadata={"field": field})
    return row


def template_by_pk(tx: Tx, pk: int) -> Row:
    row = tx.one("SELECT * FROM coupon_templates WHERE id = ?", (pk,))
    assert row is not None, pk
    return row


def list_templates(tx: Tx, tenant: str, after_pk: int, limit: int) -> list[Row]:
    return tx.all(
        "SELECT * FROM coupon_templates WHERE tenant = ? AND id > ? ORDER BY id LIMIT ?",
        (tenant, after_pk, limit),
    )


# --- campaigns ---------------------------------------------------------------------------------


def _resolve_arms(tx: Tx, spec: CampaignSpec, default: Row) -> list[dict[str, Any]]:
    inputs = spec.arms or (ArmInput(d.DEFAULT_ARM, 1, "", "campaign.arms"),)
    arms = []
    for arm in inputs:
        template = default
        if arm.template_id and arm.template_id != default["template_id"]:
            template = get_template(tx, spec.tenant, arm.template_id, field=f"{arm.field}.coupon_template")
        if template["currency_code"] != default["currency_code"]:
            raise InvalidArgument(
                f"{arm.field}.coupon_template",
                f"currency {template['currency_code']} differs from the campaign's"
                f" {default['currency_code']}",
            )
        arms.append(
            {
                "arm_id": arm.arm_id,
                "weight": arm.weight,
                "template_pk": template["id"],
                "template_id": template["template_id"],
            }
        )
    return arms


def create_campaign(tx: Tx, spec: CampaignSpec, now: int) -> Row:
    name = d.campaign_name(spec.tenant, spec.campaign_id)
    if tx.one(
        "SELECT id FROM campaigns WHERE tenant = ? AND campaign_id = ?", (spec.tenant, spec.campaign_id)
    ):
        raise AlreadyExists(d.CAMPAIGN_TYPE, name)
    default = get_template(tx, spec.tenant, spec.template_id, field="campaign.coupon_template")
    arms = _resolve_arms(tx, spec, default)
    row = tx.one(
        "INSERT INTO campaigns (tenant, campaign_id, display_name, audience_pack, offer_item_ids,"
        " template_pk,"
        " template_id, arms, holdout_bp, start_us, end_us, loss_cap_fen, delivery_rate, rules,"
        " hash_seed, state, create_us, update_us, attribution_window_us, item_costs, expected_rate,"
        " planned_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " RETURNING *",
        (
            spec.tenant,
            spec.campaign_id,
            spec.display_name,
            spec.audience_pack,
            json.dumps(list(spec.offer_item_ids)),
            default["id"],
            default["template_id"],
            json.dumps(arms),
            spec.holdout_bp,
            spec.start_us,
            spec.end_us,
            spec.loss_cap_fen,
            spec.delivery_rate,
            spec.rules_json,
            d.campaign_seed(spec.tenant, spec.campaign_id, now),
            d.DRAFT,
            now,
            now,
            spec.attribution_window_us,
            spec.item_costs_json,
            spec.expected_rate,
            spec.planned_size,
        ),
    )
    assert row is not None
    audit(tx, spec.tenant, name, "create", {"audience_pack": spec.audience_pack, "arms": arms}, now)
    return row


def get_campaign(tx: Tx, tenant: str, campaign_id: str, *, field: str = "name", lock: bool = False) -> Row:
    row = tx.one(
        "SELECT * FROM campaigns WHERE tenant = ? AND campaign_id = ?" + (tx.for_update if lock else ""),
        (tenant, campaign_id),
    )
    if row is None:
        raise NotFound(d.CAMPAIGN_TYPE, d.campaign_name(tenant, campaign_id), metadata={"field": field})
    return row


def campaign_by_pk(tx: Tx, pk: int, *, lock: bool = False) -> Row | None:
    return tx.one("SELECT * FROM campaigns WHERE id = ?" + (tx.for_update if lock else ""), (pk,))


def list_campaigns(
    tx: Tx,
    tenant: str | None,
    state: str | None,
    after: tuple[int, int] | None,
    limit: int,
    *,
    launched: bool = False,
) -> list[Row]:
    """Newest first; ``after`` is the (create_us, id) of the previous page's last row; every
    tenant's when ``tenant`` is None; ``launched``: only campaigns with a launch operation (every
    state but DRAFT)."""
    query = "SELECT * FROM campaigns WHERE " + ("tenant = ?" if tenant is not None else "1 = 1")
    params: list[Any] = [tenant] if tenant is not None else []
    if state:
        query += " AND state = ?"
        params.append(state)
    if launched:
        query += " AND state <> ?"
        params.append(d.DRAFT)
    if after is not None:
        query += " AND (create_us < ? OR (create_us = ? AND id < ?))"
        params += [after[0], after[0], after[1]]
    query += " ORDER BY create_us DESC, id DESC LIMIT ?"
    params.append(limit)
    return tx.all(query, params)


def campaign_templates(tx: Tx, campaign: Row) -> list[Row]:
    pks = sorted({arm["template_pk"] for arm in json.loads(campaign["arms"])} | {campaign["template_pk"]})
    fragment, params = tx.in_list("id", pks)
    return tx.all(f"SELECT * FROM coupon_templates WHERE {fragment} ORDER BY id", params)


def _transition(
    tx: Tx, campaign: Row, state: str, now: int, action: str, detail: dict[str, Any], **columns: Any
) -> Row:
    sets = ["state = ?", "update_us = ?", "version = version + 1"]
    params: list[Any] = [state, now]
    for column, value in columns.items():
        sets.append(f"{column} = ?")
        params.append(value)
    row = tx.one(
        f"UPDATE campaigns SET {', '.join(sets)} WHERE id = ? RETURNING *", [*params, campaign["id"]]
    )
    assert row is not None
    audit(
        tx,
        campaign["tenant"],
        d.campaign_name(campaign["tenant"], campaign["campaign_id"]),
        action,
        {"from": campaign["state"], "to": state, **detail},
        now,
    )
    return row


def state_conflict(campaign: Row, wanted: str) -> FailedPrecondition:
    name = d.campaign_name(campaign["tenant"], campaign["campaign_id"])
    return FailedPrecondition(
        d.CAMPAIGN_STATE,
        f"cannot {wanted} campaign {name} in state {campaign['state']}",
        [("STATE", name, f"campaign is {campaign['state']}")],
        metadata={"state": campaign["state"], "campaign": name},
    )


def start_launch(
    tx: Tx, tenant: str, campaign_id: str, pack_version: int, audience_size: int, now: int
) -> tuple[Row, bool]:
    """DRAFT -> RUNNING with the pack version pinned; ``(row, started)``. Idempotent for a
    campaign already RUNNING or COMPLETED (the same launch operation is returned)."""
    campaign = get_campaign(tx, tenant, campaign_id, lock=True)
    if campaign["state"] in (d.RUNNING, d.COMPLETED):
        return campaign, False
    if campaign["state"] != d.DRAFT:
        raise state_conflict(campaign, "launch")
    row = _transition(
        tx,
        campaign,
        d.RUNNING,
        now,
        "launch",
        {"pack_version": pack_version, "audience_size": audience_size},
        pack_version=pack_version,
        audience_size=audience_size,
        launch_us=now,
        launch_page_token="",
        launch_page_offset=0,
    )
    return row, True


def pause_campaign(
    tx: Tx, tenant: str, campaign_id: str, reason: str, now: int, firing: dict[str, Any] | None = None
) -> Row:
    campaign = get_campaign(tx, tenant, campaign_id, lock=True)
    if campaign["state"] == d.PAUSED:
        record_firing(tx, campaign, firing, "no-op: already paused", now)
        return campaign
    if campaign["state"] not in (d.RUNNING, d.COMPLETED):
        raise state_conflict(campaign, "pause")
    row = _transition(tx, campaign, d.PAUSED, now, "pause", {"reason": reason}, launch_owner="")
    record_firing(tx, campaign, firing, f"paused (was {campaign['state']})", now)
    return row


def etag_of(campaign: Row) -> str:
    return f'W/"{campaign["version"]}"'


def update_campaign(tx: Tx, update: CampaignUpdate, now: int) -> Row:
    """AIP-134 update of the mutable fields; a running launch applies them from its next batch."""
    campaign = get_campaign(tx, update.tenant, update.campaign_id, field="campaign.name", lock=True)
    name = d.campaign_name(update.tenant, update.campaign_id)
    if update.etag and update.etag not in (etag_of(campaign), f'"{campaign["version"]}"'):
        raise Aborted(
            f"campaign {name} changed since etag {update.etag}; read it again (etag {etag_of(campaign)})",
            reason="ETAG_MISMATCH",
            metadata={"field": "campaign.etag", "etag": etag_of(campaign)},
        )
    if campaign["state"] not in (d.DRAFT, d.RUNNING, d.PAUSED):
        raise state_conflict(campaign, "update")
    end_us = update.values.get("end_us")
    if end_us is not None and campaign["start_us"] is not None and end_us <= campaign["start_us"]:
        raise InvalidArgument("campaign.end_time", "must be after start_time")
    changes = {col: value for col, value in update.values.items() if campaign[col] != value}
    if not changes:
        record_firing(tx, campaign, update.firing, "no-op: no field changed", now)
        return campaign
    sets = ", ".join(f"{col} = ?" for col in changes)
    row = tx.one(
        f"UPDATE campaigns SET {sets}, update_us = ?, version = version + 1 WHERE id = ? RETURNING *",
        [*changes.values(), now, campaign["id"]],
    )
    assert row is not None
    detail = {
        col: {"from": campaign[col], "to": value} if col != "rules" else {"rules": len(json.loads(value))}
        for col, value in changes.items()
    }
    audit(tx, update.tenant, name, "update", {"fields": detail}, now)
    described = ", ".join(
        f"{col} {campaign[col]} -> {value}" for col, value in changes.items() if col != "rules"
    )
    record_firing(tx, campaign, update.firing, f"updated: {described or 'rules'}", now)
    return row


def resume_campaign(tx: Tx, tenant: str, campaign_id: str, now: int) -> Row:
    campaign = get_campaign(tx, tenant, campaign_id, lock=True)
    if campaign["state"] in (d.RUNNING, d.COMPLETED):
        return campaign
    if campaign["state"] != d.PAUSED:
        raise state_conflict(campaign, "resume")
    # A finished launch goes straight back to COMPLETED; otherwise the launcher picks it up.
    state = d.COMPLETED if campaign["launch_exhausted"] else d.RUNNING
    return _transition(tx, campaign, state, now, "resume", {}, launch_error="")


def cancel_campaign(tx: Tx, tenant: str, campaign_id: str, now: int) -> tuple[Row, int]:
    """Cancel and void every unredeemed coupon of the campaign; ``(row, voided)``."""
    campaign = get_campaign(tx, tenant, campaign_id, lock=True)
    if campaign["state"] == d.CANCELLED:
        return campaign, 0
    voided = 0
    for source in ("LAUNCH", "CLAIM"):  # one statement per partial index
        voided += tx.execute(
            "UPDATE coupons SET state = ?, update_us = ? WHERE campaign_pk = ? AND source = ? AND state = ?",
            (d.VOID, now, campaign["id"], source, d.ISSUED),
        )
    row = _transition(tx, campaign, d.CANCELLED, now, "cancel", {"voided": voided}, launch_owner="")
    return row, voided


def copy_campaign(
    tx: Tx,
    tenant: str,
    campaign_id: str,
    new_id: str,
    audience_pack: str,
    now: int,
    firing: dict[str, Any] | None = None,
) -> Row:
    source = get_campaign(tx, tenant, campaign_id)
    default = template_by_pk(tx, source["template_pk"])
    arms = json.loads(source["arms"])
    spec = CampaignSpec(
        tenant=tenant,
        campaign_id=new_id,
        display_name=source["display_name"],
        audience_pack=audience_pack,
        offer_item_ids=tuple(json.loads(source["offer_item_ids"])),
        template_id=default["template_id"],
        arms=tuple(ArmInput(a["arm_id"], a["weight"], a["template_id"], "campaign.arms") for a in arms),
        holdout_bp=source["holdout_bp"],
        start_us=source["start_us"],
        end_us=source["end_us"],
        loss_cap_fen=source["loss_cap_fen"],
        delivery_rate=source["delivery_rate"],
        rules_json=source["rules"],
        attribution_window_us=source["attribution_window_us"],
        item_costs_json=source["item_costs"],
        expected_rate=source["expected_rate"],
        planned_size=source["planned_size"],
    )
    row = create_campaign(tx, spec, now)
    audit(
        tx,
        tenant,
        d.campaign_name(tenant, new_id),
        "copy",
        {"from": d.campaign_name(tenant, campaign_id)},
        now,
    )
    record_firing(tx, source, firing, f"copied to {d.campaign_name(tenant, new_id)} on {audience_pack}", now)
    return row


# --- coupons: reads ----------------------------------------------------------------------------

COUPON_SELECT = (
    "SELECT c.*, t.template_id AS template_id, k.campaign_id AS campaign_id FROM coupons c"
    " JOIN coupon_templates t ON t.id = c.template_pk LEFT JOIN campaigns k ON k.id = c.campaign_pk"
)


def coupon_by_id(tx: Tx, coupon_id: str) -> Row:
    row = tx.one(COUPON_SELECT + " WHERE c.coupon_id = ?", (coupon_id,))
    assert row is not None, coupon_id
    return row


def coupon_snapshot(row: Row) -> dict[str, Any]:
    """The JSON-able view of a coupon stored with an idempotent result."""
    keys = (
        "coupon_id",
        "tenant",
        "template_id",
        "campaign_id",
        "arm_id",
        "user_id",
        "state",
        "face_value_fen",
        "issue_us",
        "expire_us",
        "order_id",
        "discount_fen",
    )
    return {key: row[key] for key in keys}


def user_coupons(tx: Tx, tenant: str, user_id: int) -> list[Row]:
    return tx.all(
        COUPON_SELECT + " WHERE c.tenant = ? AND c.user_id = ? ORDER BY c.issue_us", (tenant, user_id)
    )


# --- claims ------------------------------------------------------------------------------------


def exhausted_error(template: Row, reason: str) -> ResourceExhausted:
    name = d.template_name(template["tenant"], template["template_id"])
    if reason == d.OUT_OF_STOCK:
        description = f"all {template['total_stock']} coupons are taken"
    elif reason == d.BUDGET_EXHAUSTED:
        description = f"budget of {template['budget_cap_fen']} fen is spent"
    else:
        description = f"at most {template['per_user_limit']} per user"
    return ResourceExhausted(
        f"{name}: {description}",
        reason=reason,
        violations=[(name, description)],
        metadata={"couponTemplate": name},
    )


def _check_campaign_open(campaign: Row, now: int) -> None:
    name = d.campaign_name(campaign["tenant"], campaign["campaign_id"])
    state = campaign["state"]
    reasons = {
        d.DRAFT: d.CAMPAIGN_NOT_LAUNCHED,
        d.PAUSED: d.CAMPAIGN_PAUSED,
        d.CANCELLED: d.CAMPAIGN_CANCELLED,
    }
    if state in reasons:
        raise FailedPrecondition(
            reasons[state],
            f"campaign {name} is {state}",
            [("STATE", name, f"campaign is {state}")],
            metadata={"campaign": name, "state": state},
        )
    if campaign["end_us"] is not None and now >= campaign["end_us"]:
        raise FailedPrecondition(d.CAMPAIGN_ENDED, f"campaign {name} has ended", metadata={"campaign": name})
    if campaign["start_us"] is not None and now < campaign["start_us"]:
        raise FailedPrecondition(
            d.CAMPAIGN_NOT_STARTED, f"campaign {name} has not started", metadata={"campaign": name}
        )


def find_claim(
    tx: Tx, *, tenant: str, template_id: str, user_id: int, campaign_id: str, request_id: str
) -> Row | None:
    """The coupon an earlier claim with ``request_id`` returned; ALREADY_EXISTS if that claim was
    for another template, user or campaign."""
    prior = tx.one(COUPON_SELECT + " WHERE c.tenant = ? AND c.claim_request_id = ?", (tenant, request_id))
    if prior is None:
        return None
    if (prior["template_id"], prior["user_id"], prior["campaign_id"] or "") != (
        template_id,
        user_id,
        campaign_id,
    ):
        raise AlreadyExists(
            "flashcrowd.dev/RequestId",
            request_id,
            reason=d.IDEMPOTENCY_KEY_REUSED,
            message=f"request_id {request_id!r} was used for a different claim",
            metadata={"field": "request_id"},
        )
    return prior


def claim_coupon(
    tx: Tx,
    *,
    tenant: str,
    template_id: str,
    user_id: int,
    campaign_id: str,
    request_id: str,
    now: int,
) -> tuple[Row, bool]:
    """Claim one coupon for a user; ``(coupon, replayed)``.

    A campaign member who was delivered a coupon of this template claims that coupon (no stock
    moves); everyone else takes one from stock with the conditional counter update.
    """
    template = get_template(tx, tenant, template_id, field="coupon_template")
    t_name = d.template_name(tenant, template_id)
    if request_id:
        prior = find_claim(
            tx,
            tenant=tenant,
            template_id=template_id,
            user_id=user_id,
            campaign_id=campaign_id,
            request_id=request_id,
        )
        if prior is not None:
            return prior, True
    campaign: Row | None = None
    arm_id = ""
    if campaign_id:
        campaign = get_campaign(tx, tenant, campaign_id, field="campaign")
        _check_campaign_open(campaign, now)
        offered = {arm["template_pk"] for arm in json.loads(campaign["arms"])}
        if template["id"] not in offered:
            raise InvalidArgument("coupon_template", f"{t_name} is not offered by campaign {campaign_id}")
        member = tx.one(
            "SELECT arm_id, holdout, coupon_id FROM campaign_members WHERE campaign_pk = ? AND user_id = ?",
            (campaign["id"], user_id),
        )
        if member is not None:
            if member["holdout"]:
                raise FailedPrecondition(
                    d.USER_IN_HOLDOUT,
                    f"user {user_id} is in the holdout of campaign {campaign_id}",
                    metadata={"campaign": d.campaign_name(tenant, campaign_id)},
                )
            arm_id = member["arm_id"]
            if member["coupon_id"]:
                delivered = tx.one(
                    "UPDATE coupons SET claim_us = ?, claim_request_id = ?, update_us = ?"
                    " WHERE coupon_id = ? AND template_pk = ? AND claim_us IS NULL RETURNING coupon_id",
                    (now, request_id or None, now, member["coupon_id"], template["id"]),
                )
                if delivered is not None:
                    return coupon_by_id(tx, member["coupon_id"]), False
    if template["valid_end_us"] is not None and now >= template["valid_end_us"]:
        raise FailedPrecondition(
            d.TEMPLATE_EXPIRED, f"{t_name} is no longer valid", metadata={"couponTemplate": t_name}
        )
    # Counts never decrease, so a user already at the limit is refused without taking the lock.
    held = tx.scalar(
        "SELECT COUNT(*) AS n FROM coupons WHERE template_pk = ? AND user_id = ?", (template["id"], user_id)
    )
    if held >= template["per_user_limit"]:
        raise exhausted_error(template, d.PER_USER_LIMIT)
    # The one conditional update that makes overselling impossible (and takes the row lock).
    moved = tx.one(
        "UPDATE coupon_templates SET issued_count = issued_count + 1,"
        " issued_value_fen = issued_value_fen + face_value_fen"
        " WHERE id = ? AND (total_stock = 0 OR issued_count < total_stock)"
        " AND (budget_cap_fen = 0 OR issued_value_fen + face_value_fen <= budget_cap_fen)"
        " RETURNING issued_count",
        (template["id"],),
    )
    if moved is None:
        fresh = template_by_pk(tx, template["id"])
        stock_gone = fresh["total_stock"] and fresh["issued_count"] >= fresh["total_stock"]
        raise exhausted_error(fresh, d.OUT_OF_STOCK if stock_gone else d.BUDGET_EXHAUSTED)
    # Only the insert and the commit run under the lock. ``held`` was read before it: if the same
    # user claimed concurrently, UNIQUE (template_pk, user_id, seq) refuses this row, the whole
    # transaction (counter included) rolls back, and the retry counts again and answers
    # PER_USER_LIMIT. The limit is structural: seq never exceeds per_user_limit.
    row = tx.one(
        "INSERT INTO coupons (coupon_id, tenant, template_pk, campaign_pk, arm_id, user_id, seq,"
        " source, state, face_value_fen, issue_us, expire_us, claim_us, claim_request_id, update_us)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'CLAIM', 'ISSUED', ?, ?, ?, ?, ?, ?) RETURNING *",
        (
            d.new_coupon_id(),
            tenant,
            template["id"],
            campaign["id"] if campaign else None,
            arm_id,
            user_id,
            held + 1,
            template["face_value_fen"],
            now,
            expire_us_for(template, now),
            now,
            request_id or None,
            now,
        ),
    )
    assert row is not None
    return {**row, "template_id": template_id, "campaign_id": campaign_id or None}, False


# --- redemption and refund ---------------------------------------------------------------------


def _key_reused(key: str, what: str) -> AlreadyExists:
    return AlreadyExists(
        "flashcrowd.dev/IdempotencyKey",
        key,
        reason=d.IDEMPOTENCY_KEY_REUSED,
        message=f"idempotency_key {key!r} was already used for a different {what}",
        metadata={"field": "idempotency_key"},
    )


def _coupon_refused(reason: str, name: str, description: str) -> FailedPrecondition:
    return FailedPrecondition(
        reason, f"{name}: {description}", [(reason, name, description)], metadata={"coupon": name}
    )


@dataclass(frozen=True)
class RedeemRequest:
    tenant: str
    coupon_id: str
    user_id: int
    order_id: str
    order_amount_fen: int
    item_ids: tuple[int, ...]
    idempotency_key: str
    order_us: int | None

    def digest(self) -> str:
        return d.request_hash(
            "redeem",
            self.coupon_id,
            self.user_id,
            self.order_id,
            self.order_amount_fen,
            sorted(set(self.item_ids)),
            self.order_us if self.order_us is not None else "",
        )


#: An order may be placed this long before the coupon's issue time (clock skew between systems).
ISSUE_SKEW_US = 300 * 1_000_000


def redeem_coupon(tx: Tx, request: RedeemRequest, now: int) -> tuple[dict[str, Any], bool]:
    """Redeem exactly once per idempotency key; ``(result, replayed)``."""
    digest = request.digest()
    find_prior = "SELECT request_hash, result FROM redemptions WHERE tenant = ? AND idempotency_key = ?"

    def replay(prior: Row) -> tuple[dict[str, Any], bool]:
        if prior["request_hash"] != digest:
            raise _key_reused(request.idempotency_key, "redemption")
        return json.loads(prior["result"]), True

    prior = tx.one(find_prior, (request.tenant, request.idempotency_key))
    if prior is not None:
        return replay(prior)
    name = d.coupon_name(request.tenant, request.coupon_id)
    coupon = tx.one(
        "SELECT * FROM coupons WHERE tenant = ? AND coupon_id = ?" + tx.for_update,
        (request.tenant, request.coupon_id),
    )
    if coupon is None or coupon["user_id"] != request.user_id:
        # Another user's coupon is as unknown to this user as a missing one.
        raise NotFound(d.COUPON_TYPE, name, metadata={"field": "coupon"})
    # Re-read under the coupon lock: a concurrent retry with this key may have just committed.
    prior = tx.one(find_prior, (request.tenant, request.idempotency_key))
    if prior is not None:
        return replay(prior)
    template = template_by_pk(tx, coupon["template_pk"])
    order_us = request.order_us if request.order_us is not None else now
    if coupon["state"] == d.REDEEMED:
        raise _coupon_refused(
            d.COUPON_ALREADY_REDEEMED, name, f"already redeemed on order {coupon['order_id']}"
        )
    if coupon["state"] == d.VOID:
        raise _coupon_refused(d.COUPON_VOID, name, "coupon is void")
    if coupon["expire_us"] is not None and order_us >= coupon["expire_us"]:
        raise _coupon_refused(d.COUPON_EXPIRED, name, "coupon expired before the order")
    not_before = max(template["valid_start_us"] or 0, coupon["issue_us"] - ISSUE_SKEW_US)
    if order_us < not_before:
        raise _coupon_refused(d.COUPON_NOT_YET_VALID, name, "coupon was not yet valid at the order time")
    if request.order_amount_fen < template["min_spend_fen"]:
        raise _coupon_refused(
            d.MIN_SPEND_NOT_MET,
            name,
            f"order amount {request.order_amount_fen} fen is below the minimum spend"
            f" {template['min_spend_fen']}",
        )
    applicable = set(json.loads(template["item_ids"]))
    if applicable and not applicable.intersection(request.item_ids):
        raise _coupon_refused(d.ITEM_NOT_APPLICABLE, name, "no item of the order is covered by the coupon")
    discount = discount_of(template).apply(request.order_amount_fen)
    payable = request.order_amount_fen - discount
    changed = tx.execute(
        "UPDATE coupons SET state = 'REDEEMED', order_id = ?, discount_fen = ?,"
        " claim_us = COALESCE(claim_us, ?), update_us = ? WHERE coupon_id = ? AND state = 'ISSUED'",
        (request.order_id, discount, now, now, request.coupon_id),
    )
    if changed != 1:  # impossible under the row lock; refuse rather than double-redeem
        raise _coupon_refused(d.COUPON_ALREADY_REDEEMED, name, "coupon changed concurrently")
    after = coupon_by_id(tx, request.coupon_id)
    result = {"coupon": coupon_snapshot(after), "discount_fen": discount, "payable_fen": payable}
    tx.execute(
        "INSERT INTO redemptions (tenant, idempotency_key, request_hash, coupon_id, campaign_pk,"
        " arm_id, user_id,"
        " order_id, order_amount_fen, discount_fen, payable_fen, order_us, state, result, create_us)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'REDEEMED', ?, ?)",
        (
            request.tenant,
            request.idempotency_key,
            digest,
            request.coupon_id,
            coupon["campaign_pk"],
            coupon["arm_id"],
            request.user_id,
            request.order_id,
            request.order_amount_fen,
            discount,
            payable,
            order_us,
            json.dumps(result),
            now,
        ),
    )
    items = tuple(sorted(set(request.item_ids)))
    order = OrderFact(request.order_id, request.user_id, request.order_amount_fen, order_us, items)
    if attribution.insert_order(tx, request.tenant, order, coupon_id=request.coupon_id):
        attribution.attribute_order(
            tx, request.tenant, order, now=now, coupon_campaign_pk=coupon["campaign_pk"]
        )
    return result, False


def refund_redemption(
    tx: Tx, *, tenant: str, coupon_id: str, order_id: str, idempotency_key: str, now: int
) -> tuple[dict[str, Any], bool]:
    """Release or void the coupon of a refunded order per the template's policy; idempotent."""
    digest = d.request_hash("refund", coupon_id, order_id)
    find_prior = "SELECT request_hash, result FROM refunds WHERE tenant = ? AND idempotency_key = ?"

    def replay(prior: Row) -> tuple[dict[str, Any], bool]:
        if prior["request_hash"] != digest:
            raise _key_reused(idempotency_key, "refund")
        return json.loads(prior["result"]), True

    prior = tx.one(find_prior, (tenant, idempotency_key))
    if prior is not None:
        return replay(prior)
    name = d.coupon_name(tenant, coupon_id)
    coupon = tx.one(
        "SELECT * FROM coupons WHERE tenant = ? AND coupon_id = ?" + tx.for_update, (tenant, coupon_id)
    )
    if coupon is None:
        raise NotFound(d.COUPON_TYPE, name, metadata={"field": "coupon"})
    prior = tx.one(find_prior, (tenant, idempotency_key))
    if prior is not None:
        return replay(prior)
    redemption = tx.one(
        "SELECT id FROM redemptions WHERE coupon_id = ? AND order_id = ? AND state = 'REDEEMED'",
        (coupon_id, order_id),
    )
    if redemption is None:
        raise _coupon_refused(d.COUPON_NOT_REDEEMED, name, f"not redeemed on order {order_id}")
    template = template_by_pk(tx, coupon["template_pk"])
    if template["refund_policy"] == "VOID":
        tx.execute("UPDATE coupons SET state = 'VOID', update_us = ? WHERE coupon_id = ?", (now, coupon_id))
    else:
        tx.execute(
            "UPDATE coupons SET state = 'ISSUED', order_id = NULL, discount_fen = 0, update_us = ?"
            " WHERE coupon_id = ?",
            (now, coupon_id),
        )
    tx.execute(
        "UPDATE redemptions SET state = 'REFUNDED', refund_us = ? WHERE id = ?", (now, redemption["id"])
    )
    tx.execute(
        "UPDATE orders SET refund_us = ? WHERE tenant = ? AND order_id = ? AND refund_us IS NULL",
        (now, tenant, order_id),
    )
    attribution.undo_attributions(tx, tenant, order_id, now, now)
    after = coupon_by_id(tx, coupon_id)
    result = {"coupon": coupon_snapshot(after), "policy": template["refund_policy"]}
    tx.execute(
        "INSERT INTO refunds (tenant, idempotency_key, request_hash, redemption_id, coupon_id,"
        " result, create_us)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (tenant, idempotency_key, digest, redemption["id"], coupon_id, json.dumps(result), now),
    )
    audit(tx, tenant, name, "refund", {"order_id": order_id, "policy": template["refund_policy"]}, now)
    return result, False


# --- launch ------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    #: "ok", "stopped" (campaign no longer RUNNING) or "stale" (cursor or lease moved elsewhere).
    status: str
    state: str = ""
    processed: int = 0
    issued: int = 0
    held_out: int = 0
    skipped: int = 0
    completed: bool = False
    stop_reason: str = ""
    skipped_existing: int = 0
    #: The campaign's pacing as of this batch (UpdateCampaign may change them mid-launch).
    delivery_rate: int = 0
    end_us: int | None = None


def acquire_lease(tx: Tx, campaign_pk: int, owner: str, now: int, lease_us: int) -> Row | None:
    """Take (or renew) the launch lease of a RUNNING campaign; None when another owner holds it."""
    return tx.one(
        "UPDATE campaigns SET launch_owner = ?, launch_lease_until_us = ?"
        " WHERE id = ? AND state = 'RUNNING' AND (launch_owner = '' OR launch_owner = ?"
        " OR launch_lease_until_us < ?) RETURNING *",
        (owner, now + lease_us, campaign_pk, owner, now),
    )


def running_campaigns(tx: Tx) -> list[int]:
    return [row["id"] for row in tx.all("SELECT id FROM campaigns WHERE state = 'RUNNING' ORDER BY id")]


def fail_launch(tx: Tx, campaign_pk: int, owner: str, error: str, now: int) -> Row | None:
    """Pause a launch that cannot go on (audience gone, pack version expired), with the reason."""
    campaign = campaign_by_pk(tx, campaign_pk, lock=True)
    if campaign is None or campaign["state"] != d.RUNNING or campaign["launch_owner"] not in ("", owner):
        return campaign
    return _transition(
        tx, campaign, d.PAUSED, now, "launch_failed", {"error": error}, launch_error=error, launch_owner=""
    )


def stop_launch(tx: Tx, campaign_pk: int, owner: str, reason: str, now: int) -> Row | None:
    """Finish issuing early (end time reached): COMPLETED with the stop reason."""
    campaign = campaign_by_pk(tx, campaign_pk, lock=True)
    if campaign is None or campaign["state"] != d.RUNNING or campaign["launch_owner"] not in ("", owner):
        return campaign
    return _transition(
        tx,
        campaign,
        d.COMPLETED,
        now,
        "complete",
        {"stop_reason": reason},
        stop_reason=campaign["stop_reason"] or reason,
        complete_us=now,
        launch_exhausted=1,
        launch_owner="",
    )


@dataclass
class _Group:
    template: Row
    indexes: list[int] = field(default_factory=list)


#: Columns of a ``campaign_members`` row, in the order ``insert_members`` takes them.
MEMBER_COLUMNS = (
    "campaign_pk",
    "user_id",
    "arm_id",
    "holdout",
    "outcome",
    "coupon_id",
    "process_us",
    "pre_spend_fen",
)


def insert_members(tx: Tx, rows: Sequence[tuple[Any, ...]], now: int) -> None:
    """Assign members (rows of ``MEMBER_COLUMNS``) and fold them into their arms' sums in the same
    transaction, so the report's member counts always equal the rows (``ledger_invariants``)."""
    tx.insert_many("campaign_members", MEMBER_COLUMNS, rows)
    by_campaign: dict[int, list[tuple[str, int]]] = {}
    for row in rows:
        by_campaign.setdefault(row[0], []).append((row[2], row[7]))
    for campaign_pk, members in by_campaign.items():
        attribution.add_members(tx, campaign_pk, members, now)


def issue_batch(
    tx: Tx,
    *,
    campaign_pk: int,
    owner: str,
    cursor: tuple[str, int],
    next_cursor: tuple[str, int],
    exhausted: bool,
    user_ids: Sequence[int],
    arm_indexes: Sequence[int],
    holdout: Sequence[bool],
    check_existing: bool,
    now: int,
    lease_us: int,
) -> BatchResult:
    """Process one batch of audience members atomically: member rows, coupons, outbox, counters,
    cursor. Members already processed (a resumed launch's overlap) are skipped."""
    campaign = campaign_by_pk(tx, campaign_pk, lock=True)
    if campaign is None or campaign["state"] != d.RUNNING:
        return BatchResult("stopped", state=campaign["state"] if campaign else "")
    if (
        campaign["launch_owner"] != owner
        or (campaign["launch_page_token"], campaign["launch_page_offset"]) != cursor
    ):
        return BatchResult("stale", state=campaign["state"])
    tenant = campaign["tenant"]
    arms = json.loads(campaign["arms"])
    indexes: Sequence[int] = range(len(user_ids))
    skipped_existing = 0
    if check_existing and user_ids:
        fragment, params = tx.in_list("user_id", list(user_ids))
        existing = {
            row["user_id"]
            for row in tx.all(
                f"SELECT user_id FROM campaign_members WHERE campaign_pk = ? AND {fragment}",
                [campaign_pk, *params],
            )
        }
        if existing:
            indexes = [i for i in indexes if user_ids[i] not in existing]
            skipped_existing = len(user_ids) - len(indexes)
    groups: dict[int, _Group] = {}
    outcome: dict[int, str] = {}
    for i in indexes:
        if holdout[i]:
            outcome[i] = d.OUTCOME_HOLDOUT
            continue
        pk = arms[arm_indexes[i]]["template_pk"]
        groups.setdefault(pk, _Group(template={})).indexes.append(i)
    # Lock templates in ascending id order (the global lock order).
    for pk in sorted(groups):
        locked = tx.one("SELECT * FROM coupon_templates WHERE id = ?" + tx.for_update, (pk,))
        assert locked is not None
        groups[pk].template = locked
    loss_left = (
        campaign["loss_cap_fen"] - campaign["issued_value_fen"] if campaign["loss_cap_fen"] else math.inf
    )
    stop_reason = ""
    coupon_rows: list[tuple[Any, ...]] = []
    outbox_rows: list[tuple[Any, ...]] = []
    coupon_of: dict[int, str] = {}
    moved: dict[int, tuple[int, int]] = {}
    issued_value = 0
    for pk in sorted(groups):
        group = groups[pk]
        template = group.template
        face = template["face_value_fen"]
        users = [user_ids[i] for i in group.indexes]
        fragment, params = tx.in_list("user_id", users)
        held = {
            row["user_id"]: row["n"]
            for row in tx.all(
                f"SELECT user_id, COUNT(*) AS n FROM coupons WHERE template_pk = ? AND {fragment}"
                " GROUP BY user_id",
                [pk, *params],
            )
        }
        stock_left = (
            template["total_stock"] - template["issued_count"] if template["total_stock"] else math.inf
        )
        budget_left = (
            (template["budget_cap_fen"] - template["issued_value_fen"]) // face
            if template["budget_cap_fen"]
            else math.inf
        )
        expire = expire_us_for(template, now)
        expired = template["valid_end_us"] is not None and now >= template["valid_end_us"]
        t_name = d.template_name(tenant, template["template_id"])
        ids = iter(d.new_coupon_ids(len(users)))
        count = 0
        for i in group.indexes:
            user = user_ids[i]
            already = held.get(user, 0)
            if already >= template["per_user_limit"]:
                outcome[i] = d.OUTCOME_PER_USER_LIMIT
                continue
            loss_room = loss_left // face if loss_left != math.inf else math.inf
            if expired:  # an expired template issues nothing more
                outcome[i] = d.OUTCOME_TEMPLATE_EXPIRED
                stop_reason = stop_reason or f"{d.TEMPLATE_EXPIRED}: {t_name}"
                continue
            if count >= stock_left:
                outcome[i] = d.OUTCOME_OUT_OF_STOCK
                stop_reason = stop_reason or f"{d.OUT_OF_STOCK}: {t_name}"
                continue
            if count >= budget_left:
                outcome[i] = d.OUTCOME_BUDGET
                stop_reason = stop_reason or f"{d.BUDGET_EXHAUSTED}: {t_name}"
                continue
            if loss_room < 1:
                outcome[i] = d.OUTCOME_LOSS_CAP
                stop_reason = (
                    stop_reason or f"LOSS_CAP: projected loss would exceed {campaign['loss_cap_fen']} fen"
                )
                continue
            coupon_id = next(ids)
            arm_id = arms[arm_indexes[i]]["arm_id"]
            coupon_rows.append(
                (
                    coupon_id,
                    tenant,
                    pk,
                    campaign_pk,
                    arm_id,
                    user,
                    already + 1,
                    "LAUNCH",
                    "ISSUED",
                    face,
                    now,
                    expire,
                    now,
                )
            )
            outbox_rows.append((tenant, campaign_pk, arm_id, user, coupon_id, now))
            coupon_of[i] = coupon_id
            outcome[i] = d.OUTCOME_ISSUED
            count += 1
            if loss_left != math.inf:
                loss_left -= face
        if count:
            moved[pk] = (count, count * face)
            issued_value += count * face
    launch_us = campaign["launch_us"] or now
    spend = attribution.pre_period_spend(
        tx, tenant, [user_ids[i] for i in indexes], launch_us - campaign["covariate_window_us"], launch_us
    )
    member_rows = [
        (
            campaign_pk,
            user_ids[i],
            d.HOLDOUT_ARM if holdout[i] else arms[arm_indexes[i]]["arm_id"],
            1 if holdout[i] else 0,
            outcome[i],
            coupon_of.get(i),
            now,
            spend.get(user_ids[i], 0),
        )
        for i in indexes
    ]
    insert_members(tx, member_rows, now)
    if coupon_rows:
        tx.insert_many(
            "coupons",
            (
                "coupon_id",
                "tenant",
                "template_pk",
                "campaign_pk",
                "arm_id",
                "user_id",
                "seq",
                "source",
                "state",
                "face_value_fen",
                "issue_us",
                "expire_us",
                "update_us",
            ),
            coupon_rows,
        )
        for pk, (count, value) in moved.items():
            tx.execute(
                "UPDATE coupon_templates SET issued_count = issued_count + ?, issued_value_fen ="
                " issued_value_fen + ?"
                " WHERE id = ?",
                (count, value, pk),
            )
        # Outbox ids must become visible in increasing order: writers take turns until commit.
        tx.advisory_lock(OUTBOX_LOCK_KEY)
        tx.insert_many(
            "outbox", ("tenant", "campaign_pk", "arm_id", "user_id", "coupon_id", "create_us"), outbox_rows
        )
    issued = len(coupon_rows)
    held_out = sum(1 for i in indexes if holdout[i])
    processed = len(member_rows)
    skipped = processed - issued - held_out
    state = d.COMPLETED if exhausted else d.RUNNING
    row = tx.one(
        "UPDATE campaigns SET processed = processed + ?, issued = issued + ?, held_out = held_out + ?,"
        " skipped = skipped + ?, issued_value_fen = issued_value_fen + ?, launch_page_token = ?,"
        " launch_page_offset = ?, launch_exhausted = ?, launch_lease_until_us = ?, state = ?,"
        " complete_us = ?, stop_reason = CASE WHEN stop_reason = '' THEN ? ELSE stop_reason END,"
        " update_us = ?, version = version + 1 WHERE id = ? RETURNING stop_reason",
        (
            processed,
            issued,
            held_out,
            skipped,
            issued_value,
            next_cursor[0],
            next_cursor[1],
            1 if exhausted else 0,
            now + lease_us,
            state,
            now if exhausted else None,
            stop_reason,
            now,
            campaign_pk,
        ),
    )
    assert row is not None
    if exhausted:
        audit(
            tx,
            tenant,
            d.campaign_name(tenant, campaign["campaign_id"]),
            "complete",
            {"stop_reason": row["stop_reason"]},
            now,
        )
    return BatchResult(
        "ok",
        state=state,
        processed=processed,
        issued=issued,
        held_out=held_out,
        skipped=skipped,
        completed=exhausted,
        stop_reason=row["stop_reason"],
        skipped_existing=skipped_existing,
        delivery_rate=campaign["delivery_rate"],
        end_us=campaign["end_us"],
    )


# --- outbox ------------------------------------------------------------------------------------


def read_outbox(tx: Tx, tenant: str, campaign_pk: int | None, after_id: int, limit: int) -> list[Row]:
    query = (
        "SELECT o.id, o.arm_id, o.user_id, o.coupon_id, o.create_us, k.campaign_id, k.offer_item_ids"
        " FROM outbox o JOIN campaigns k ON k.id = o.campaign_pk WHERE o.tenant = ? AND o.id > ?"
    )
    params: list[Any] = [tenant, after_id]
    if campaign_pk is not None:
        query += " AND o.campaign_pk = ?"
        params.append(campaign_pk)
    query += " ORDER BY o.id LIMIT ?"
    params.append(limit)
    return tx.all(query, params)


# --- report ------------------------------------------------------------------------------------


@dataclass
class ArmFacts:
    arm_id: str
    holdout: bool = False
    targeted: int = 0
    delivered: int = 0
    claimed: int = 0
    redeemed: int = 0
    orders: int = 0
    buyers: int = 0
    revenue_fen: int = 0
    coupon_cost_fen: int = 0
    refunded_orders: int = 0
    #: Sufficient statistics of the arm's members (services/retarget/stats.py).
    sums: ArmSums = field(default_factory=lambda: ArmSums(0))
    #: Configured weight (treated arms) or holdout share, in basis points of the audience.
    share_bp: float = 0.0
    #: Members per funnel stage (attribution.FUNNEL_STAGES: viewed, clicked, carted, ordered).
    stages: dict[str, int] = field(default_factory=dict)


@dataclass
class CampaignFacts:
    campaign: Row
    arms: dict[str, ArmFacts]
    #: Coupons claimed in the campaign by users outside its audience.
    unassigned: ArmFacts
    projected_loss_fen: int
    #: Event time up to which the order feed has attributed orders (0: it never ran).
    attributed_through_us: int = 0
    #: ``(item_id, units, gmv_fen)`` of attributed, unrefunded orders.
    items: list[tuple[int, int, int]] = field(default_factory=list)


#: A campaign's coupons (parameters: campaign pk twice), spelled so each half uses its partial index.
CAMPAIGN_COUPONS = (
    "(SELECT arm_id, source, state, claim_us, expire_us, face_value_fen FROM coupons"
    " WHERE campaign_pk = ? AND source = 'LAUNCH' UNION ALL"
    " SELECT arm_id, source, state, claim_us, expire_us, face_value_fen FROM coupons"
    " WHERE campaign_pk = ? AND source = 'CLAIM')"
)

#: Name of the order feed's checkpoint (services/retarget/order_feed.py).
ORDER_FEED = "orders"


def campaign_facts(tx: Tx, campaign: Row, now: int) -> CampaignFacts:
    """Funnel and outcome facts of a campaign. Members, orders and revenue come from the arms' sums
    (services/retarget/attribution.py), kept up to date as orders arrive; coupons are counted."""
    pk = campaign["id"]
    configured = json.loads(campaign["arms"])
    holdout_bp = campaign["holdout_bp"]
    weight = sum(a["weight"] for a in configured)
    arms: dict[str, ArmFacts] = {
        a["arm_id"]: ArmFacts(a["arm_id"], share_bp=d.arm_share_bp(a["weight"], weight, holdout_bp))
        for a in configured
    }
    arms[d.HOLDOUT_ARM] = ArmFacts(d.HOLDOUT_ARM, holdout=True, share_bp=holdout_bp)
    unassigned = ArmFacts("")

    def facts(arm_id: str) -> ArmFacts:
        if not arm_id:
            return unassigned
        return arms.setdefault(arm_id, ArmFacts(arm_id))

    for arm_id, outcome in attribution.arm_outcomes(tx, pk).items():
        arm = facts(arm_id)
        arm.sums = outcome.sums
        arm.targeted = outcome.sums.n
        arm.orders, arm.buyers = outcome.orders, outcome.sums.converted
        arm.revenue_fen = int(outcome.sums.sum_y)
        arm.refunded_orders = outcome.refunds
        arm.stages = outcome.stages
    outstanding = 0
    for row in tx.all(
        "SELECT arm_id, SUM(CASE WHEN source = 'LAUNCH' THEN 1 ELSE 0 END) AS delivered,"
        " SUM(CASE WHEN claim_us IS NOT NULL THEN 1 ELSE 0 END) AS claimed,"
        " SUM(CASE WHEN state = 'REDEEMED' THEN 1 ELSE 0 END) AS redeemed,"
        " SUM(CASE WHEN state = 'ISSUED' AND (expire_us IS NULL OR expire_us > ?) THEN"
        " face_value_fen ELSE 0 END)"
        f" AS outstanding FROM {CAMPAIGN_COUPONS} c GROUP BY arm_id",
        (now, pk, pk),
    ):
        arm = facts(row["arm_id"])
        arm.delivered, arm.claimed, arm.redeemed = (
            int(row["delivered"]),
            int(row["claimed"]),
            int(row["redeemed"]),
        )
        outstanding += int(row["outstanding"] or 0)
    for row in tx.all(
        "SELECT arm_id, SUM(discount_fen) AS cost FROM redemptions WHERE campaign_pk = ? AND state"
        " = 'REDEEMED'"
        " GROUP BY arm_id",
        (pk,),
    ):
        facts(row["arm_id"]).coupon_cost_fen = int(row["cost"] or 0)
    # Orders of claimers outside the audience: only those paid with the campaign's coupons.
    outside = tx.one(
        "SELECT COUNT(*) AS orders, COUNT(DISTINCT user_id) AS buyers, SUM(order_amount_fen) AS revenue"
        " FROM redemptions WHERE campaign_pk = ? AND arm_id = '' AND state = 'REDEEMED'",
        (pk,),
    )
    if outside is not None:
        unassigned.orders, unassigned.buyers = int(outside["orders"] or 0), int(outside["buyers"] or 0)
        unassigned.revenue_fen = int(outside["revenue"] or 0)
    spent = sum(a.coupon_cost_fen for a in arms.values()) + unassigned.coupon_cost_fen
    _, through = attribution.checkpoint(tx, ORDER_FEED)
    items = attribution.item_outcomes(tx, pk)
    return CampaignFacts(campaign, arms, unassigned, outstanding + spent, through, items)


# --- invariants (tests, benchmarks, operators) -------------------------------------------------


def ledger_invariants(tx: Tx) -> dict[str, int]:
    """Counts that must all be zero in a healthy ledger (tests and benchmarks check them)."""
    checks = {
        "templates_counter_mismatch": (
            "SELECT COUNT(*) FROM coupon_templates t LEFT JOIN (SELECT template_pk, COUNT(*) AS n,"
            " SUM(face_value_fen) AS v FROM coupons GROUP BY template_pk) c ON c.template_pk = t.id"
            " WHERE t.issued_count <> COALESCE(c.n, 0) OR t.issued_value_fen <> COALESCE(c.v, 0)"
        ),
        "templates_over_stock": (
            "SELECT COUNT(*) FROM coupon_templates WHERE total_stock > 0 AND issued_count > total_stock"
        ),
        "templates_over_budget": (
            "SELECT COUNT(*) FROM coupon_templates WHERE budget_cap_fen > 0 AND issued_value_fen >"
            " budget_cap_fen"
        ),
        "users_over_limit": (
            "SELECT COUNT(*) FROM (SELECT template_pk, user_id, COUNT(*) AS n FROM coupons"
            " GROUP BY template_pk, user_id) u JOIN coupon_templates t ON t.id = u.template_pk"
            " WHERE u.n > t.per_user_limit"
        ),
        "coupons_multiply_redeemed": (
            "SELECT COUNT(*) FROM (SELECT coupon_id FROM redemptions WHERE state = 'REDEEMED'"
            " GROUP BY coupon_id HAVING COUNT(*) > 1) x"
        ),
        "redeemed_without_redemption": (
            "SELECT COUNT(*) FROM coupons c WHERE c.state = 'REDEEMED' AND NOT EXISTS"
            " (SELECT 1 FROM redemptions r WHERE r.coupon_id = c.coupon_id AND r.state = 'REDEEMED')"
        ),
        "launch_duplicates": (
            "SELECT COUNT(*) FROM (SELECT campaign_pk, user_id FROM coupons WHERE source = 'LAUNCH'"
            " GROUP BY campaign_pk, user_id HAVING COUNT(*) > 1) x"
        ),
        "launch_coupons_without_member": (
            "SELECT COUNT(*) FROM coupons c LEFT JOIN campaign_members m ON m.campaign_pk = c.campaign_pk"
            " AND m.user_id = c.user_id WHERE c.source = 'LAUNCH'"
            " AND (m.coupon_id IS NULL OR m.coupon_id <> c.coupon_id)"
        ),
        "launch_outbox_mismatch": (
            "SELECT COUNT(*) FROM coupons c LEFT JOIN (SELECT coupon_id, COUNT(*) AS n FROM outbox"
            " GROUP BY coupon_id) o ON o.coupon_id = c.coupon_id WHERE c.source = 'LAUNCH' AND"
            " COALESCE(o.n, 0) <> 1"
        ),
        "outbox_without_coupon": (
            "SELECT COUNT(*) FROM outbox o LEFT JOIN coupons c ON c.coupon_id = o.coupon_id WHERE"
            " c.coupon_id IS NULL"
        ),
        "campaign_progress_mismatch": (
            "SELECT COUNT(*) FROM campaigns k"
            " LEFT JOIN (SELECT campaign_pk, COUNT(*) AS n FROM campaign_members GROUP BY campaign_pk) m"
            " ON m.campaign_pk = k.id"
            " LEFT JOIN (SELECT campaign_pk, COUNT(*) AS n FROM coupons WHERE source = 'LAUNCH'"
            " GROUP BY campaign_pk) c ON c.campaign_pk = k.id"
            " WHERE k.processed <> COALESCE(m.n, 0) OR k.issued <> COALESCE(c.n, 0)"
        ),
        # The report's kept sums equal what they summarise (services/retarget/attribution.py).
        "arm_stats_members_mismatch": (
            "SELECT COUNT(*) FROM (SELECT campaign_pk, arm_id, COUNT(*) AS n FROM campaign_members"
            " GROUP BY campaign_pk, arm_id) m LEFT JOIN arm_stats s ON s.campaign_pk = m.campaign_pk"
            " AND s.arm_id = m.arm_id WHERE COALESCE(s.members, 0) <> m.n"
        ),
        "arm_stats_orders_mismatch": (
            "SELECT COUNT(*) FROM arm_stats s LEFT JOIN (SELECT campaign_pk, arm_id, COUNT(*) AS n,"
            " SUM(amount_fen) AS v FROM order_attributions WHERE refund_us IS NULL"
            " GROUP BY campaign_pk, arm_id) a ON a.campaign_pk = s.campaign_pk AND a.arm_id = s.arm_id"
            " WHERE s.orders <> COALESCE(a.n, 0) OR s.revenue_fen <> COALESCE(a.v, 0)"
        ),
        "campaigns_over_loss_cap": (
            "SELECT COUNT(*) FROM campaigns WHERE loss_cap_fen > 0 AND issued_value_fen > loss_cap_fen"
        ),
    }
    return {name: int(tx.scalar(sql) or 0) for name, sql in checks.items()}
