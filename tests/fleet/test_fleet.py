"""The fleet keeps its promises: one operation per request, builds survive a SIGKILL, results never change.

Real processes (``conftest.py``): 3 audience replicas with a build worker each, 2 retarget, 2 sale
monitors and 2 gateways over one PostgreSQL database, one NATS stream and one Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import grpc
import grpc.aio
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as aud
from flashcrowd.audience.v1 import audience_service_pb2_grpc as aud_grpc
from flashcrowd.audience.v1 import (
    events_pb2,
    live_pack_pb2,
    live_pack_pb2_grpc,
    lookalike_pb2,
    lookalike_pb2_grpc,
    pack_pb2,
    spec_pb2,
)
from flashcrowd.retarget.v1 import (
    campaign_pb2,
    coupon_pb2,
    retarget_service_pb2,
    retarget_service_pb2_grpc,
    sale_monitor_pb2,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from .conftest import GRACE_SECONDS, LEASE_SECONDS, LIST_RATE, TENANT, Fleet

pytestmark = [pytest.mark.fleet, pytest.mark.postgres]


def clickers(days: int = 30) -> pack_pb2.Pack:
    window = spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=days * 86400))
    return pack_pb2.Pack(
        spec=spec_pb2.PackSpec(
            behavior=spec_pb2.BehaviorCondition(event_types=[events_pb2.EVENT_TYPE_CLICK], window=window)
        )
    )


def clicked_last(minutes: int) -> spec_pb2.PackSpec:
    window = spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=minutes * 60))
    return spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(event_types=[events_pb2.EVENT_TYPE_CLICK], window=window)
    )


class Client:
    """A tenant's client over both gateways (gRPC), turn by turn."""

    def __init__(self, fleet: Fleet) -> None:
        self.channels = [grpc.aio.insecure_channel(fleet.target(n)) for n in fleet.names("gateway")]
        self.audience = [aud_grpc.AudienceServiceStub(c) for c in self.channels]
        self.ops = [operations_pb2_grpc.OperationsStub(c) for c in self.channels]
        self.metadata = (("x-api-key", fleet.tenant_key),)

    async def wait(self, name: str, seconds: int = 90) -> operations_pb2.Operation:
        op = await self.ops[0].WaitOperation(
            operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=seconds)),
            metadata=self.metadata,
            timeout=seconds + 5,
        )
        assert op.done, f"{name} not done after {seconds} s"
        return op

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


@pytest.fixture
async def client(fleet: Fleet):
    c = Client(fleet)
    yield c
    await c.close()


def _operation_rows(fleet: Fleet, op_name: str) -> list[tuple]:
    op_id = op_name.rsplit("/", 1)[1]
    return fleet.sql(
        "SELECT state, owner, attempts, record FROM audience_operations WHERE tenant = %s AND op_id = %s",
        (TENANT, op_id),
    )


async def test_every_backend_replica_serves(fleet: Fleet) -> None:
    for name in fleet.names("audience") + fleet.names("retarget") + fleet.names("monitor"):
        assert fleet.procs[name].poll() is None, fleet.log(name)
    assert all(len(fleet.children(name)) == 1 for name in fleet.names("audience"))  # one worker each


@pytest.mark.parametrize("same_request_id", [True, False], ids=["same-request-id", "other-request-ids"])
async def test_the_same_create_through_both_gateways_makes_one_pack_and_one_operation(
    fleet: Fleet, client: Client, same_request_id: bool
) -> None:
    pack_id = f"twin-{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex

    async def create(stub: aud_grpc.AudienceServiceStub) -> operations_pb2.Operation | grpc.StatusCode:
        request = aud.CreatePackRequest(
            parent=f"tenants/{TENANT}", pack_id=pack_id, pack=clickers(),
            request_id=request_id if same_request_id else uuid.uuid4().hex,
        )  # fmt: skip
        try:
            return await stub.CreatePack(request, metadata=client.metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code()

    # Eight at once over both gateways (and so over the three audience replicas).
    answers = await asyncio.gather(*(create(client.audience[i % 2]) for i in range(8)))
    operations = {a.name for a in answers if isinstance(a, operations_pb2.Operation)}
    refusals = [a for a in answers if not isinstance(a, operations_pb2.Operation)]
    assert len(operations) == 1, answers
    if same_request_id:
        assert not refusals  # a retry of one request: everybody gets its operation
    else:
        assert refusals and set(refusals) == {grpc.StatusCode.ALREADY_EXISTS}
    (name,) = operations
    try:
        done = await client.wait(name)
    except AssertionError:
        rows = fleet.sql("SELECT op_id, kind, state, owner, portable, attempts FROM audience_operations")
        raise AssertionError(f"{rows}\n{fleet.log('audience1')}") from None
    assert not done.HasField("error"), done.error
    rows = fleet.sql(
        "SELECT count(*) FROM audience_operations WHERE tenant = %s AND kind = 'CreatePack'"
        " AND record IS NOT NULL AND op_id = %s",
        (TENANT, name.rsplit("/", 1)[1]),
    )
    assert rows == [(1,)]
    pack = await client.audience[1].GetPack(
        aud.GetPackRequest(name=f"tenants/{TENANT}/packs/{pack_id}"), metadata=client.metadata
    )
    assert pack.version == 1 and pack.state == pack_pb2.Pack.STATE_READY


async def _running_on_one_worker(
    fleet: Fleet, client: Client
) -> tuple[operations_pb2.Operation, int, list[int]]:
    """Start a build and let exactly one worker claim it: ``(operation, that worker's pid, the
    other workers, still frozen: the caller thaws them)``."""
    workers = [pid for name in fleet.names("audience") for pid in fleet.children(name)]
    assert workers, "no audience-worker left"
    for pid in workers:  # freeze every worker: the build stays queued
        os.kill(pid, signal.SIGSTOP)
    victim, *others = workers
    try:
        op = await client.audience[0].CreatePack(
            aud.CreatePackRequest(parent=f"tenants/{TENANT}", pack_id=f"orphan-{uuid.uuid4().hex[:8]}",
                                  pack=clickers()),
            metadata=client.metadata,
        )  # fmt: skip
        os.kill(victim, signal.SIGCONT)  # one worker takes it (a replacement may still be starting)
        for _ in range(6000):
            rows = _operation_rows(fleet, op.name)
            if rows and rows[0][0] != "queued":
                break
            await asyncio.sleep(0.005)
        state, owner, _attempts, _record = rows[0]
        assert state == "running" and f"-{victim}-" in owner, rows
    except BaseException:
        for pid in others:
            os.kill(pid, signal.SIGCONT)
        raise
    return op, victim, others


async def _finished_once_elsewhere(
    fleet: Fleet, client: Client, op: operations_pb2.Operation, gone: int
) -> None:
    done = await client.wait(op.name, seconds=30 + 3 * LEASE_SECONDS)
    assert not done.HasField("error"), done.error
    state, owner, attempts, record = _operation_rows(fleet, op.name)[0]
    assert state == "done" and attempts == 2 and f"-{gone}-" not in (owner or "")
    pack = pack_pb2.Pack()
    assert done.response.Unpack(pack) and pack.version == 1 and pack.size > 0
    # It ended once: the record does not change any more, and no second version was published.
    await asyncio.sleep(LEASE_SECONDS)
    assert _operation_rows(fleet, op.name)[0][3] == record
    again = await client.audience[1].GetPack(aud.GetPackRequest(name=pack.name), metadata=client.metadata)
    assert again.version == 1


async def test_a_build_whose_worker_is_killed_is_finished_by_another_once(
    fleet: Fleet, client: Client
) -> None:
    op, victim, others = await _running_on_one_worker(fleet, client)
    os.kill(victim, signal.SIGKILL)  # while it runs the build
    for pid in others:
        os.kill(pid, signal.SIGCONT)
    await _finished_once_elsewhere(fleet, client, op, victim)


async def test_a_dead_worker_is_replaced(fleet: Fleet) -> None:
    name = fleet.names("audience")[0]
    (worker,) = fleet.children(name)
    os.kill(worker, signal.SIGKILL)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if (children := fleet.children(name)) and worker not in children:
            break
    assert len(children) == 1 and worker not in children, fleet.log(name)


async def test_a_worker_stopped_mid_build_hands_it_back_within_its_grace(
    fleet: Fleet, client: Client
) -> None:
    op, victim, others = await _running_on_one_worker(fleet, client)
    os.kill(victim, signal.SIGTERM)
    stopped = asyncio.get_running_loop().time()
    while Path(f"/proc/{victim}").exists() and "zombie" not in _status(victim):
        await asyncio.sleep(0.05)
    took = asyncio.get_running_loop().time() - stopped
    assert took < GRACE_SECONDS + 3, f"worker took {took:.1f} s to stop (grace {GRACE_SECONDS} s)"
    for pid in others:
        os.kill(pid, signal.SIGCONT)
    await _finished_once_elsewhere(fleet, client, op, victim)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def _owner_pid(owner: str) -> int:
    """The pid in an operation owner (``<host>-<pid>-<random>``)."""
    return int(owner.rsplit("-", 2)[1])


async def test_lookalike_training_and_expansion_run_in_build_workers(fleet: Fleet, client: Client) -> None:
    workers = {pid for name in fleet.names("audience") for pid in fleet.children(name)}
    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(client.channels[0])
    platform = (("x-api-key", fleet.platform_key),)
    trained = await lookalike.TrainLookalikeModel(
        lookalike_pb2.TrainLookalikeModelRequest(model_id=f"m-{uuid.uuid4().hex[:6]}", cluster_count=8),
        metadata=platform,
    )
    done = await client.ops[1].WaitOperation(
        operations_pb2.WaitOperationRequest(name=trained.name, timeout=duration_pb2.Duration(seconds=90)),
        metadata=platform, timeout=95,
    )  # fmt: skip
    assert done.done and not done.HasField("error"), done.error
    model = lookalike_pb2.LookalikeModel()
    assert done.response.Unpack(model)
    op = await client.audience[1].CreatePack(
        aud.CreatePackRequest(parent=f"tenants/{TENANT}", pack_id=f"seed-{uuid.uuid4().hex[:8]}",
                              pack=clickers()),
        metadata=client.metadata,
    )  # fmt: skip
    seed = pack_pb2.Pack()
    assert (await client.wait(op.name)).response.Unpack(seed)
    # Its persona comes from a compute process of the replica that answers, not its serving thread.
    persona = await client.audience[0].GetPackPersona(
        aud.GetPackPersonaRequest(name=seed.name), metadata=client.metadata
    )
    assert persona.pack == seed.name and persona.dimensions
    assert any(fleet.children(name, "multiprocessing") for name in fleet.names("audience"))
    expanded = await lookalike.ExpandLookalike(
        lookalike_pb2.ExpandLookalikeRequest(
            parent=f"tenants/{TENANT}", pack_id=f"lal-{uuid.uuid4().hex[:8]}", seed_pack=seed.name,
            model=model.name, reach_fraction=0.05,
        ),
        metadata=client.metadata,
    )  # fmt: skip
    result = await client.wait(expanded.name)
    assert not result.HasField("error"), result.error
    response = lookalike_pb2.ExpandLookalikeResponse()
    assert result.response.Unpack(response)
    reach = round(0.05 * model.population_size)  # a tenant sees the size with noise (privacy)
    assert abs(response.pack.size - reach) <= 0.05 * reach, response.pack.size
    for name in (trained.name, expanded.name):
        tenant, op_id = name.split("/")[1], name.rsplit("/", 1)[1]
        ((state, owner),) = fleet.sql(
            "SELECT state, owner FROM audience_operations WHERE tenant = %s AND op_id = %s", (tenant, op_id)
        )
        assert state == "done" and _owner_pid(owner) in workers, (name, owner, workers)


async def test_finished_operations_never_change(fleet: Fleet, client: Client) -> None:
    before = dict(fleet.sql("SELECT op_id, record FROM audience_operations WHERE state = 'done'"))
    assert before, "the earlier tests finished operations"
    # More work on every replica, then the same records.
    ops = [
        await client.audience[i % 2].CreatePack(
            aud.CreatePackRequest(parent=f"tenants/{TENANT}", pack_id=f"more-{i}-{uuid.uuid4().hex[:6]}",
                                  pack=clickers(days=1 + i)),
            metadata=client.metadata,
        )
        for i in range(4)
    ]  # fmt: skip
    for op in ops:
        assert not (await client.wait(op.name)).HasField("error")
    after = dict(fleet.sql("SELECT op_id, record FROM audience_operations WHERE state = 'done'"))
    assert {op_id: after[op_id] for op_id in before} == before
    listed = await client.ops[1].ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{TENANT}/operations", page_size=100),
        metadata=client.metadata,
    )
    assert {op.name for op in ops} <= {op.name for op in listed.operations}


async def test_a_tenants_rate_limit_holds_across_both_gateways(fleet: Fleet, client: Client) -> None:
    """Calls spread over both gateways admit what one bucket admits (burst + rate x time), +-10%."""
    admitted = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    request = aud.ListPacksRequest(parent=f"tenants/{TENANT}", page_size=1)

    async def caller(index: int) -> None:
        nonlocal admitted
        turn = index
        while loop.time() - started < 3.0:
            try:
                await client.audience[turn % 2].ListPacks(request, metadata=client.metadata, timeout=5)
                admitted += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                await asyncio.sleep(0.01)
            turn += 1

    await asyncio.gather(*(caller(i) for i in range(8)))
    elapsed = loop.time() - started
    allowed = LIST_RATE + LIST_RATE * elapsed
    assert abs(admitted - allowed) <= 0.1 * allowed, (admitted, allowed)


async def test_a_live_pack_created_through_one_gateway_is_served_by_every_replica(
    fleet: Fleet, client: Client
) -> None:
    """GETs right after the create, and lists within 2 s, over both gateways (round robin over the
    three audience replicas): every one answers with the pack."""
    stubs = [live_pack_pb2_grpc.LivePackServiceStub(c) for c in client.channels]
    pack_id = f"live-{uuid.uuid4().hex[:8]}"
    created = await stubs[0].CreateLivePack(
        live_pack_pb2.CreateLivePackRequest(
            parent=f"tenants/{TENANT}", live_pack_id=pack_id,
            live_pack=live_pack_pb2.LivePack(display_name="clickers now", spec=clicked_last(15)),
        ),
        metadata=client.metadata,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    listed_everywhere_by = loop.time() + 2.0
    for turn in range(12):
        got = await stubs[turn % 2].GetLivePack(
            live_pack_pb2.GetLivePackRequest(name=created.name), metadata=client.metadata
        )
        assert got.name == created.name and got.spec == created.spec
    while True:
        listings = [
            await stubs[turn % 2].ListLivePacks(
                live_pack_pb2.ListLivePacksRequest(parent=f"tenants/{TENANT}"), metadata=client.metadata
            )
            for turn in range(12)
        ]
        if all(created.name in {p.name for p in page.live_packs} for page in listings):
            break
        assert loop.time() < listed_everywhere_by, "a replica did not list the new live pack within 2 s"
        await asyncio.sleep(0.1)
    await stubs[1].DeleteLivePack(
        live_pack_pb2.DeleteLivePackRequest(name=created.name), metadata=client.metadata
    )
    gone_by = loop.time() + 2.0
    while True:
        codes = []
        for turn in range(12):
            try:
                await stubs[turn % 2].GetLivePack(
                    live_pack_pb2.GetLivePackRequest(name=created.name), metadata=client.metadata
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
        if set(codes) == {grpc.StatusCode.NOT_FOUND}:
            break
        assert loop.time() < gone_by, f"still served after its delete: {codes}"
        await asyncio.sleep(0.1)


STOP_NOW = campaign_pb2.Rule(
    rule_id="stop-now",
    action=campaign_pb2.Rule.ACTION_STOP,
    metric="clicks",
    comparison=campaign_pb2.Rule.COMPARISON_GREATER_OR_EQUAL,
    threshold=0,  # holds at once: the leader's first evaluation fires it
    cooldown=duration_pb2.Duration(seconds=600),
    scope=sale_monitor_pb2.SaleScope(item_ids=[1]),
)


async def _stopped_by_its_rule(client: Client, pack: str, template: str) -> str:
    """Launch a slow campaign with STOP_NOW; wait for the rule to pause it; the campaign's name."""
    retarget = retarget_service_pb2_grpc.RetargetServiceStub(client.channels[1])
    campaign = await retarget.CreateCampaign(
        retarget_service_pb2.CreateCampaignRequest(
            parent=f"tenants/{TENANT}", campaign_id=f"cmp-{uuid.uuid4().hex[:8]}",
            campaign=campaign_pb2.Campaign(audience_pack=pack, coupon_template=template, rules=[STOP_NOW],
                                           delivery_rate_per_second=1),
        ),
        metadata=client.metadata,
    )  # fmt: skip
    await retarget.LaunchCampaign(
        retarget_service_pb2.LaunchCampaignRequest(name=campaign.name), metadata=client.metadata
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        got = await retarget.GetCampaign(
            retarget_service_pb2.GetCampaignRequest(name=campaign.name), metadata=client.metadata
        )
        if got.state == campaign_pb2.Campaign.STATE_PAUSED:
            return campaign.name
        assert loop.time() < deadline, f"{campaign.name} not stopped by its rule: state {got.state}"
        await asyncio.sleep(0.1)


async def _firings(client: Client, campaign: str) -> list[campaign_pb2.RuleFiring]:
    retarget = retarget_service_pb2_grpc.RetargetServiceStub(client.channels[0])
    report = await retarget.GetCampaignReport(
        retarget_service_pb2.GetCampaignReportRequest(campaign=campaign), metadata=client.metadata
    )
    return list(report.rule_firings)


async def test_a_stop_rule_fires_once_with_two_monitors_and_again_after_the_leader_is_killed(
    fleet: Fleet, client: Client
) -> None:
    """Last in this module: it SIGKILLs a sale monitor."""
    op = await client.audience[0].CreatePack(
        aud.CreatePackRequest(parent=f"tenants/{TENANT}", pack_id=f"rule-{uuid.uuid4().hex[:8]}",
                              pack=clickers()),
        metadata=client.metadata,
    )  # fmt: skip
    pack = pack_pb2.Pack()
    assert (await client.wait(op.name)).response.Unpack(pack) and pack.size > 0
    retarget = retarget_service_pb2_grpc.RetargetServiceStub(client.channels[0])
    template = await retarget.CreateCouponTemplate(
        retarget_service_pb2.CreateCouponTemplateRequest(
            parent=f"tenants/{TENANT}", coupon_template_id=f"tpl-{uuid.uuid4().hex[:8]}",
            coupon_template=coupon_pb2.CouponTemplate(fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=1000)),
        ),
        metadata=client.metadata,
    )  # fmt: skip
    first = await _stopped_by_its_rule(client, pack.name, template.name)
    await asyncio.sleep(3.0)  # three more evaluations by whichever monitor leads
    firings = await _firings(client, first)
    assert [f.rule_id for f in firings] == ["stop-now"], firings
    leaders = [n for n in fleet.names("monitor") if f"fired on {first}" in fleet.log(n)]
    assert len(leaders) == 1, {n: fleet.log(n)[-2000:] for n in fleet.names("monitor")}
    (leader,) = leaders
    fleet.procs[leader].send_signal(signal.SIGKILL)
    fleet.procs[leader].wait(10)
    # The survivor takes the lease over once it expires (3 s) and stops the next campaign.
    second = await _stopped_by_its_rule(client, pack.name, template.name)
    assert [f.rule_id for f in await _firings(client, second)] == ["stop-now"]
    (survivor,) = [n for n in fleet.names("monitor") if n != leader]
    assert f"fired on {second}" in fleet.log(survivor)
