"""Campaign rules (quick stop / boost / copy) over live sale metrics, acting through retarget's RPCs.

Every ``interval`` seconds the engine (on the one replica holding the rules lease, lease.py) lists
the RUNNING campaigns of every tenant (``tenants/-``, as a platform principal; ``tenants`` narrows
it), and for each rule
with a ``scope`` reads the sale metrics of that scope (``SaleMonitor``) from the campaign's start
(or creation) to now, compares ``metric`` with ``threshold``, and fires when the condition has held
for ``sustain`` and the rule's ``cooldown`` has passed since its last firing. The metrics are those
the campaign's tenant may see (``SaleMonitor.stats(..., tenant=...)``: its own events and platform
events of what the scope names), so another tenant's events can never stop, boost or copy it:

* STOP -> ``PauseCampaign`` (issuing and claims stop); a campaign already paused is left alone.
* COPY -> ``CopyCampaign`` onto ``copy_to_pack`` with the deterministic id ``<campaign>-<rule>``
  (ALREADY_EXISTS means an earlier firing made it).
* BOOST -> ``UpdateCampaign`` of ``delivery_rate_per_second`` (with the etag read by the listing;
  ABORTED re-reads and retries): the rate doubles, capped at the rule's ``boost_rate_ceiling``. A
  campaign already at the ceiling (or unlimited, rate 0) needs nothing: the rule does not fire.
  The running launch paces its next batch at the new rate.

Every action request carries the firing (``rule_firing``: rule, action, time, the metric values
that triggered it); retarget writes it to the campaign's audit log in the action's own transaction
(a refused action in one of its own) with what it did as the outcome, and ``GetCampaignReport``
lists them. Retarget's ledger is thus the record the report reads, with no store access and no
extra RPC. The engine also keeps its own copy (``rules/firings/{tenant}/{campaign}/...json`` in the
object store, with the engine's outcome, including RPCs that failed before reaching the ledger);
cooldowns survive restarts by reading it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import grpc.aio
from flashcrowd.retarget.v1 import campaign_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from google.protobuf import field_mask_pb2, json_format

from services.monitor.counters import SaleMonitor, SaleScope, metrics_of
from services.monitor.lease import Lease, LocalLease
from services.runtime import BaseServiceSettings, make_channel
from services.runtime.assertion import platform_interceptors
from services.runtime.scopes import CAMPAIGNS_READ, CAMPAIGNS_WRITE
from services.storage import ObjectStore

__all__ = ["RuleEngine", "boost_target", "compare"]

logger = logging.getLogger(__name__)

Rule = campaign_pb2.Rule


def boost_target(campaign: campaign_pb2.Campaign, rule: campaign_pb2.Rule) -> int | None:
    """The delivery rate a BOOST firing sets: double the current one, never above the ceiling;
    None when there is nothing to raise (at or above the ceiling, or unlimited)."""
    rate, ceiling = campaign.delivery_rate_per_second, rule.boost_rate_ceiling
    if rate <= 0 or ceiling <= 0 or rate >= ceiling:
        return None
    return min(rate * 2, ceiling)


def compare(value: float, comparison: int, threshold: float) -> bool:
    if comparison == Rule.COMPARISON_LESS:
        return value < threshold
    if comparison == Rule.COMPARISON_LESS_OR_EQUAL:
        return value <= threshold
    if comparison == Rule.COMPARISON_GREATER:
        return value > threshold
    if comparison == Rule.COMPARISON_GREATER_OR_EQUAL:
        return value >= threshold
    return False


@dataclass
class _RuleState:
    since: float | None = None
    last_fired: float | None = None


class RuleEngine:
    def __init__(
        self,
        stub: retarget_service_pb2_grpc.RetargetServiceStub,
        monitor: SaleMonitor,
        tenants: list[str],
        *,
        store: ObjectStore | None = None,
        interval: float = 1.0,
        clock=time.monotonic,
        lease: Lease | None = None,
    ) -> None:
        self.stub = stub
        self.monitor = monitor
        #: Empty: every tenant's campaigns. Otherwise only these tenants'.
        self.tenants = tenants
        self.lease: Lease = lease or LocalLease()
        self.store = store
        self.interval = interval
        self.clock = clock
        self.state: dict[tuple[str, str], _RuleState] = {}
        self.firings: dict[str, list[campaign_pb2.RuleFiring]] = {}
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    @classmethod
    def connect(
        cls, target: str, settings: BaseServiceSettings, monitor: SaleMonitor, **kwargs
    ) -> RuleEngine:
        channel = make_channel(
            target,
            settings,
            interceptors=platform_interceptors(
                settings, "service:sale-monitor", (CAMPAIGNS_READ, CAMPAIGNS_WRITE)
            ),
        )
        tenants = [t for t in getattr(settings, "rules_tenants", "").split(",") if t]
        engine = cls(retarget_service_pb2_grpc.RetargetServiceStub(channel), monitor, tenants, **kwargs)
        engine._channel = channel
        return engine

    # ---- audit ----------------------------------------------------------------------------------

    def _audit_prefix(self, campaign: str) -> str:
        _, tenant, _, campaign_id = campaign.split("/")
        return f"rules/firings/{tenant}/{campaign_id}/"

    def _record(self, campaign: str, firing: campaign_pb2.RuleFiring) -> None:
        self.firings.setdefault(campaign, []).insert(0, firing)
        if self.store is not None:
            stamp = firing.fire_time.ToMicroseconds()
            key = f"{self._audit_prefix(campaign)}{stamp:020d}-{firing.rule_id}.json"
            self.store.put_bytes(key, json_format.MessageToJson(firing).encode())

    def audit_log(self, campaign: str) -> list[campaign_pb2.RuleFiring]:
        """Firings of a campaign, newest first (from the store when there is one)."""
        if self.store is None:
            return list(self.firings.get(campaign, []))
        entries = []
        for info in self.store.list(self._audit_prefix(campaign)):
            entries.append(json_format.Parse(self.store.get_bytes(info.key), campaign_pb2.RuleFiring()))
        return sorted(entries, key=lambda f: f.fire_time.ToMicroseconds(), reverse=True)

    def _restore_cooldown(self, campaign: str, rule_id: str) -> float | None:
        if self.store is None:
            return None
        fired = [f for f in self.audit_log(campaign) if f.rule_id == rule_id]
        if not fired:
            return None
        ago = datetime.now(UTC).timestamp() - fired[0].fire_time.ToMicroseconds() / 1e6
        return self.clock() - max(0.0, ago)

    # ---- evaluation -----------------------------------------------------------------------------

    async def _running(self) -> list[campaign_pb2.Campaign]:
        """RUNNING campaigns of every tenant (or of ``self.tenants``), all pages."""
        parents = [f"tenants/{t}" for t in self.tenants] or ["tenants/-"]
        campaigns: list[campaign_pb2.Campaign] = []
        for parent in parents:
            token = ""
            while True:
                reply = await self.stub.ListCampaigns(
                    retarget_service_pb2.ListCampaignsRequest(
                        parent=parent, page_size=1000, page_token=token, filter="state=RUNNING"
                    )
                )
                campaigns.extend(reply.campaigns)
                token = reply.next_page_token
                if not token:
                    break
        return campaigns

    async def evaluate(self) -> list[campaign_pb2.RuleFiring]:
        fired: list[campaign_pb2.RuleFiring] = []
        for campaign in await self._running():
            if campaign.state != campaign_pb2.Campaign.STATE_RUNNING:
                continue
            tenant = campaign.name.split("/")[1]
            if self.tenants and tenant not in self.tenants:
                logger.warning("listing returned %s of another tenant: skipped", campaign.name)
                continue
            for rule in campaign.rules:
                firing = await self._evaluate_rule(campaign, rule, tenant)
                if firing is not None:
                    fired.append(firing)
        return fired

    async def _evaluate_rule(self, campaign: campaign_pb2.Campaign, rule: campaign_pb2.Rule, tenant: str):
        """Evaluate one rule of ``tenant``'s ``campaign`` on the stats ``tenant`` may see."""
        if not rule.HasField("scope"):
            return None
        scope = SaleScope.from_pb(rule.scope)
        start = campaign.start_time if campaign.HasField("start_time") else campaign.create_time
        end = self.monitor.now_us()
        start_us = min(start.ToMicroseconds(), end - 60_000_000)
        counters = self.monitor.stats(scope, start_us, end, tenant=tenant).total
        metrics = metrics_of(counters)
        if rule.metric not in metrics:
            logger.warning("rule %s of %s: unknown metric %r", rule.rule_id, campaign.name, rule.metric)
            return None
        key = (campaign.name, rule.rule_id)
        state = self.state.get(key)
        if state is None:
            state = self.state[key] = _RuleState(
                last_fired=self._restore_cooldown(campaign.name, rule.rule_id)
            )
        now = self.clock()
        if not compare(metrics[rule.metric], rule.comparison, rule.threshold):
            state.since = None
            return None
        state.since = state.since if state.since is not None else now
        if now - state.since < rule.sustain.ToTimedelta().total_seconds():
            return None
        cooldown = rule.cooldown.ToTimedelta().total_seconds()
        if state.last_fired is not None and now - state.last_fired < cooldown:
            return None
        if rule.action == Rule.ACTION_BOOST and boost_target(campaign, rule) is None:
            return None  # already at the ceiling: nothing to do, nothing fires
        state.last_fired = now
        firing = campaign_pb2.RuleFiring(rule_id=rule.rule_id, action=rule.action, metrics=metrics)
        firing.fire_time.FromDatetime(datetime.now(UTC))
        firing.outcome = await self._act(campaign, rule, metrics, firing)
        await asyncio.to_thread(self._record, campaign.name, firing)
        logger.info("rule %s fired on %s: %s", rule.rule_id, campaign.name, firing.outcome)
        return firing

    async def _act(
        self,
        campaign: campaign_pb2.Campaign,
        rule: campaign_pb2.Rule,
        metrics: dict[str, float],
        firing: campaign_pb2.RuleFiring,
    ) -> str:
        trigger = {"rule": rule.rule_id, rule.metric: metrics[rule.metric], "threshold": rule.threshold}
        try:
            if rule.action == Rule.ACTION_STOP:
                await self.stub.PauseCampaign(
                    retarget_service_pb2.PauseCampaignRequest(
                        name=campaign.name, reason=json.dumps(trigger), rule_firing=firing
                    )
                )
                return f"paused: {rule.metric}={metrics[rule.metric]:g}"
            if rule.action == Rule.ACTION_COPY:
                campaign_id = f"{campaign.name.rsplit('/', 1)[1]}-{rule.rule_id}"[:63].rstrip("-")
                copy = await self.stub.CopyCampaign(
                    retarget_service_pb2.CopyCampaignRequest(
                        name=campaign.name,
                        campaign_id=campaign_id,
                        audience_pack=rule.copy_to_pack,
                        rule_firing=firing,
                    )
                )
                return f"copied to {copy.name}"
            if rule.action == Rule.ACTION_BOOST:
                return await self._boost(campaign, rule, firing)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                return f"no-op ({error.code().name}): {error.details()}"
            return f"failed ({error.code().name}): {error.details()}"
        return "unknown action"

    async def _boost(
        self, campaign: campaign_pb2.Campaign, rule: campaign_pb2.Rule, firing: campaign_pb2.RuleFiring
    ) -> str:
        """Raise the delivery rate towards the ceiling; a concurrent change (ABORTED on the etag)
        re-reads the campaign and tries again."""
        for attempt in range(3):
            target = boost_target(campaign, rule)
            if target is None:
                return f"no-op: delivery rate already {campaign.delivery_rate_per_second or 'unlimited'}/s"
            try:
                updated = await self.stub.UpdateCampaign(
                    retarget_service_pb2.UpdateCampaignRequest(
                        campaign=campaign_pb2.Campaign(
                            name=campaign.name, delivery_rate_per_second=target, etag=campaign.etag
                        ),
                        update_mask=field_mask_pb2.FieldMask(paths=["delivery_rate_per_second"]),
                        rule_firing=firing,
                    )
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.ABORTED or attempt == 2:
                    raise
                campaign = await self.stub.GetCampaign(
                    retarget_service_pb2.GetCampaignRequest(name=campaign.name)
                )
                continue
            return (
                f"boosted: delivery rate {campaign.delivery_rate_per_second} -> "
                f"{updated.delivery_rate_per_second}/s (ceiling {rule.boost_rate_ceiling})"
            )
        return "unreachable"

    # ---- loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        leading = False
        while not self._stopping.is_set():
            try:
                holds = await self.lease.hold()
                if holds and not leading:
                    self.state.clear()  # cooldowns come back from the audit log (another leader's too)
                leading = holds
                if holds:
                    await self.evaluate()
            except Exception:
                logger.exception("rule evaluation failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="rules")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):  # a task that died is done
                await asyncio.wait_for(self._task, 10)
        await self.lease.release()
        if self._channel is not None:
            await self._channel.close()
