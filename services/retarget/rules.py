"""Campaign rules (quick stop / boost / copy) over live sale metrics, acting through retarget's RPCs.

Every ``interval`` seconds the engine lists the RUNNING campaigns of its tenants, and for each rule
with a ``scope`` reads the sale metrics of that scope (``SaleMonitor``) from the campaign's start
(or creation) to now, compares ``metric`` with ``threshold``, and fires when the condition has held
for ``sustain`` and the rule's ``cooldown`` has passed since its last firing:

* STOP -> ``PauseCampaign`` (issuing and claims stop); a campaign already paused is left alone.
* COPY -> ``CopyCampaign`` onto ``copy_to_pack`` with the deterministic id ``<campaign>-<rule>``
  (ALREADY_EXISTS means an earlier firing made it).
* BOOST -> recorded only: the retarget API has no UpdateCampaign to raise the delivery rate yet.

Each firing is written to the audit log (``rules/firings/{tenant}/{campaign}/...json`` in the object
store: rule, action, time, the metric values that triggered it, outcome); the pause reason carries
the same JSON, so retarget's own audit log has it too. Cooldowns survive restarts (read back from
the audit log).
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
from google.protobuf import json_format

from services.retarget.sale_monitor import SaleMonitor, SaleScope, metrics_of
from services.runtime import BaseServiceSettings, make_channel
from services.storage import ObjectStore

__all__ = ["RuleEngine", "compare"]

logger = logging.getLogger(__name__)

Rule = campaign_pb2.Rule


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
    ) -> None:
        self.stub = stub
        self.monitor = monitor
        self.tenants = tenants
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
        channel = make_channel(target, settings)
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

    async def evaluate(self) -> list[campaign_pb2.RuleFiring]:
        fired: list[campaign_pb2.RuleFiring] = []
        for tenant in self.tenants:
            reply = await self.stub.ListCampaigns(
                retarget_service_pb2.ListCampaignsRequest(parent=f"tenants/{tenant}", page_size=1000)
            )
            for campaign in reply.campaigns:
                if campaign.state != campaign_pb2.Campaign.STATE_RUNNING:
                    continue
                for rule in campaign.rules:
                    firing = await self._evaluate_rule(campaign, rule)
                    if firing is not None:
                        fired.append(firing)
        return fired

    async def _evaluate_rule(self, campaign: campaign_pb2.Campaign, rule: campaign_pb2.Rule):
        if not rule.HasField("scope"):
            return None
        scope = SaleScope.from_pb(rule.scope)
        start = campaign.start_time if campaign.HasField("start_time") else campaign.create_time
        end = self.monitor.now_us()
        start_us = min(start.ToMicroseconds(), end - 60_000_000)
        counters = self.monitor.stats(scope, start_us, end).total
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
        state.last_fired = now
        outcome = await self._act(campaign, rule, metrics)
        firing = campaign_pb2.RuleFiring(
            rule_id=rule.rule_id, action=rule.action, metrics=metrics, outcome=outcome
        )
        firing.fire_time.FromDatetime(datetime.now(UTC))
        await asyncio.to_thread(self._record, campaign.name, firing)
        logger.info("rule %s fired on %s: %s", rule.rule_id, campaign.name, outcome)
        return firing

    async def _act(
        self, campaign: campaign_pb2.Campaign, rule: campaign_pb2.Rule, metrics: dict[str, float]
    ) -> str:
        trigger = {"rule": rule.rule_id, rule.metric: metrics[rule.metric], "threshold": rule.threshold}
        try:
            if rule.action == Rule.ACTION_STOP:
                await self.stub.PauseCampaign(
                    retarget_service_pb2.PauseCampaignRequest(name=campaign.name, reason=json.dumps(trigger))
                )
                return f"paused: {rule.metric}={metrics[rule.metric]:g}"
            if rule.action == Rule.ACTION_COPY:
                campaign_id = f"{campaign.name.rsplit('/', 1)[1]}-{rule.rule_id}"[:63].rstrip("-")
                copy = await self.stub.CopyCampaign(
                    retarget_service_pb2.CopyCampaignRequest(
                        name=campaign.name, campaign_id=campaign_id, audience_pack=rule.copy_to_pack
                    )
                )
                return f"copied to {copy.name}"
            if rule.action == Rule.ACTION_BOOST:
                return (
                    f"not applied: retarget has no UpdateCampaign to raise the delivery rate to "
                    f"{rule.boost_rate_ceiling}/s"
                )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                return f"no-op ({error.code().name}): {error.details()}"
            return f"failed ({error.code().name}): {error.details()}"
        return "unknown action"

    # ---- loop -----------------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
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
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        if self._channel is not None:
            await self._channel.close()
