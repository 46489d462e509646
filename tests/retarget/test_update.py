"""UpdateCampaign (AIP-134) over real gRPC on SQLite and PostgreSQL: masks, etags, states, the
audit log, a running launch picking up a new delivery rate, and rule firings carried by the action
RPCs showing up in the campaign report."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
from flashcrowd.retarget.v1 import campaign_pb2, retarget_service_pb2
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from services.retarget import repository as repo

from .conftest import Rt
from .test_flows import expect_error, invariants_clean

api = retarget_service_pb2
Campaign = campaign_pb2.Campaign
Rule = campaign_pb2.Rule


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def boost_rule(rule_id: str = "boost", ceiling: int = 400) -> campaign_pb2.Rule:
    return Rule(
        rule_id=rule_id,
        action=Rule.ACTION_BOOST,
        metric="roi",
        comparison=Rule.COMPARISON_GREATER,
        threshold=2.0,
        cooldown=duration_pb2.Duration(seconds=60),
        boost_rate_ceiling=ceiling,
    )


async def audit(rt: Rt, tenant: str, name: str) -> list[tuple[str, dict]]:
    rows = await rt.sql(repo.audit_entries, tenant, name, write=False)
    return [(row["action"], json.loads(row["detail"])) for row in rows]


async def test_update_fields_masks_and_etags(rt: Rt) -> None:
    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:50])
    template = await rt.template(tenant)
    created = await rt.campaign(tenant, pack.name, template.name, display_name="before", loss_cap_fen=5000)
    end = timestamp_pb2.Timestamp(seconds=int(time.time()) + 7200)

    updated = await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(
            campaign=Campaign(
                name=created.name,
                display_name="after",
                delivery_rate_per_second=250,
                loss_cap_fen=9000,
                end_time=end,
                rules=[boost_rule()],
                audience_pack="tenants/ignored/packs/not-in-the-mask",
                etag=created.etag,
            ),
            update_mask=mask("display_name", "delivery_rate_per_second", "loss_cap_fen", "end_time", "rules"),
        )
    )
    assert (updated.display_name, updated.delivery_rate_per_second, updated.loss_cap_fen) == (
        "after",
        250,
        9000,
    )
    assert updated.end_time == end and [r.rule_id for r in updated.rules] == ["boost"]
    assert updated.audience_pack == pack.name  # not in the mask: untouched
    assert (
        updated.etag != created.etag
        and updated.update_time.ToMicroseconds() >= created.update_time.ToMicroseconds()
    )
    assert await rt.get(created.name) == updated

    # The old etag is stale now: ABORTED, nothing changes.
    await expect_error(
        rt.stub.UpdateCampaign(
            api.UpdateCampaignRequest(
                campaign=Campaign(name=created.name, display_name="lost", etag=created.etag),
                update_mask=mask("display_name"),
            )
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert (await rt.get(created.name)).display_name == "after"

    # Empty mask: the mutable fields set in the message; a field in the mask but unset clears it.
    implied = await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(campaign=Campaign(name=created.name, delivery_rate_per_second=300))
    )
    assert implied.delivery_rate_per_second == 300 and implied.display_name == "after"
    cleared = await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(campaign=Campaign(name=created.name), update_mask=mask("end_time", "rules"))
    )
    assert not cleared.HasField("end_time") and not cleared.rules
    # "*" replaces every mutable field.
    star = await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(
            campaign=Campaign(name=created.name, display_name="star", etag=cleared.etag),
            update_mask=mask("*"),
        )
    )
    assert (star.display_name, star.delivery_rate_per_second, star.loss_cap_fen) == ("star", 0, 0)
    # The same values again: nothing changes, not even the etag.
    same = await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(campaign=Campaign(name=created.name, display_name="star"))
    )
    assert same.etag == star.etag

    entries = [detail for action, detail in await audit(rt, tenant, created.name) if action == "update"]
    assert len(entries) == 4
    assert entries[0]["fields"]["delivery_rate"] == {"from": 0, "to": 250}
    assert entries[0]["fields"]["display_name"] == {"from": "before", "to": "after"}
    assert entries[0]["fields"]["rules"] == {"rules": 1}

    # Cancelled (and completed) campaigns cannot be updated.
    await rt.stub.CancelCampaign(api.CancelCampaignRequest(name=created.name))
    await expect_error(
        rt.stub.UpdateCampaign(
            api.UpdateCampaignRequest(campaign=Campaign(name=created.name, display_name="x"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAMPAIGN_STATE_CONFLICT",
    )
    await invariants_clean(rt)


async def test_a_running_launch_takes_a_new_delivery_rate(rt: Rt) -> None:
    tenant = rt.tenant()
    users = rt.audience.users[20000:21500]
    pack = await rt.audience.upload(tenant, users)
    template = await rt.template(tenant)
    campaign = await rt.campaign(tenant, pack.name, template.name, delivery_rate_per_second=100)
    await rt.launch(campaign.name, wait=False)
    await asyncio.sleep(1.0)
    slow = await rt.get(campaign.name)
    assert slow.state == Campaign.STATE_RUNNING and slow.progress.issued <= 300, slow.progress
    started = time.monotonic()
    await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(
            campaign=Campaign(name=campaign.name, delivery_rate_per_second=100_000),
            update_mask=mask("delivery_rate_per_second"),
        )
    )
    # At 100/s the remaining ~1,300 would take 13 s more.
    done = await rt.wait_state(campaign.name, (Campaign.STATE_COMPLETED,), timeout=8)
    assert done.progress.processed == len(users) and time.monotonic() - started < 8
    await expect_error(
        rt.stub.UpdateCampaign(
            api.UpdateCampaignRequest(campaign=Campaign(name=campaign.name, delivery_rate_per_second=5))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAMPAIGN_STATE_CONFLICT",
    )
    await invariants_clean(rt)


async def test_rule_firings_are_audited_and_reported(rt: Rt) -> None:
    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:30])
    other_pack = await rt.audience.upload(tenant, rt.audience.users[30:60])
    template = await rt.template(tenant)
    campaign = await rt.campaign(
        tenant, pack.name, template.name, delivery_rate_per_second=100, rules=[boost_rule()]
    )

    def firing(rule_id: str, action: int, seconds: int, **metrics: float) -> campaign_pb2.RuleFiring:
        out = campaign_pb2.RuleFiring(rule_id=rule_id, action=action, metrics=metrics)
        out.fire_time.FromSeconds(seconds)
        return out

    base = int(time.time())
    copy_request = api.CopyCampaignRequest(
        name=campaign.name,
        campaign_id=f"{campaign.name.rsplit('/', 1)[1]}-clone",
        audience_pack=other_pack.name,
        rule_firing=firing("clone", Rule.ACTION_COPY, base, clicks=60),
    )
    await rt.stub.CopyCampaign(copy_request)
    copy_request.rule_firing.fire_time.FromSeconds(base + 1)
    await expect_error(rt.stub.CopyCampaign(copy_request), grpc.StatusCode.ALREADY_EXISTS)  # still audited
    await rt.stub.UpdateCampaign(
        api.UpdateCampaignRequest(
            campaign=Campaign(name=campaign.name, delivery_rate_per_second=200),
            update_mask=mask("delivery_rate_per_second"),
            rule_firing=firing("boost", Rule.ACTION_BOOST, base + 2, roi=3.5),
        )
    )
    await rt.launch(campaign.name)  # 30 members: one batch, COMPLETED
    await rt.stub.PauseCampaign(
        api.PauseCampaignRequest(
            name=campaign.name,
            reason="stock gone",
            rule_firing=firing("sold-out", Rule.ACTION_STOP, base + 3, stock_left=0, roi=3.1),
        )
    )
    report = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=campaign.name))
    firings = list(report.rule_firings)
    assert [f.rule_id for f in firings] == ["sold-out", "boost", "clone", "clone"]  # newest first
    assert [f.fire_time.seconds for f in firings] == [base + 3, base + 2, base + 1, base]
    assert firings[0].action == Rule.ACTION_STOP and dict(firings[0].metrics) == {"stock_left": 0, "roi": 3.1}
    assert firings[0].outcome.startswith("paused (was COMPLETED)")
    assert firings[1].outcome == "updated: delivery_rate 100 -> 200" and firings[1].metrics["roi"] == 3.5
    assert firings[2].outcome.startswith("no-op (ALREADY_EXISTS)")
    assert firings[3].outcome.startswith(f"copied to {campaign.name}-clone")
    # The copy's own report has none of its source's firings.
    copied = await rt.stub.GetCampaignReport(api.GetCampaignReportRequest(campaign=f"{campaign.name}-clone"))
    assert not copied.rule_firings
    await invariants_clean(rt)
