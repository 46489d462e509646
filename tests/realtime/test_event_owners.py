"""Events have an owner: what one tenant tries through its events against another, over real servers.

Every server here verifies the assertion (``backend_interceptors``) the way deployed backends do, and
the bus is the machine's NATS JetStream. Each attack is refused or has no effect on the other tenant:

* ids squatted by tenant A do not make tenant B's events "duplicates" (ingest, bus, compactor);
* A's PAY events never show in B's GetSaleStats, whatever B's scope names;
* B asking for A's sale stats gets NOT_FOUND;
* nobody writes the platform's behaviour stream without ``events.platform``; a tenant's events are
  stamped with its own tenant;
* A's events never make a user a member of B's pack.
"""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from flashcrowd.audience.v1 import (
    audience_service_pb2,
    audience_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    events_pb2,
    pack_pb2,
    spec_pb2,
)
from flashcrowd.retarget.v1 import sale_monitor_pb2, sale_monitor_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from services.audience.config import AudienceSettings
from services.audience.server import create_audience_server
from services.events.bus import EventBus
from services.events.codec import batches_from_columns, decode_batch, encode_batch, shard_table
from services.events.columns import columns_from_proto
from services.events.compactor import Compactor
from services.events.config import RealtimeSettings
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.events.ingest import event_service_definition
from services.events.schema import OWNER, PLATFORM_OWNER
from services.events.sharding import buckets_np
from services.monitor.counters import SaleMonitor, SaleScope
from services.monitor.servicer import sale_monitor_definition
from services.runtime import create_server, error_details, load_settings
from services.runtime.assertion import Caller, asserting_channel, backend_interceptors
from services.runtime.scopes import EVENTS_WRITE, PACKS_READ, PLATFORM_EVENTS_WRITE, TENANT_SCOPES
from services.storage import LocalObjectStore
from tests.fixtures.channels import as_tenant, backend_channel

from .conftest import drop_stream, make_jetstream_bus
from .events import make_event

E = events_pb2
HOOK_ITEM, LIVE_ROOM = 100001, 900002


def pays(first_id: int, users: range, *, item_id: int = HOOK_ITEM, campaign_id: int = LIVE_ROOM) -> list:
    """PAY events of 2,990 fen, one per user, 30 s ago (campaign_id 0: none)."""
    when = datetime.now(UTC) - timedelta(seconds=30)
    return [
        make_event(
            first_id + k,
            user,
            E.EVENT_TYPE_PAY,
            when=when,
            item_id=item_id,
            campaign_id=campaign_id,
            amount_fen=2990,
        )
        for k, user in enumerate(users)
    ]


def batch(events: list) -> event_service_pb2.IngestEventBatchRequest:
    return event_service_pb2.IngestEventBatchRequest(events=events)


async def serve_ingest(bus: EventBus) -> tuple[grpc.aio.Server, int]:
    settings = load_settings(RealtimeSettings, host="127.0.0.1", port=0, grace_seconds=0.2, log_json=False)
    names, register = event_service_definition(settings, bus)
    return await create_server(
        settings, service_names=names, register=register, interceptors=backend_interceptors(settings)
    )


async def serve_monitor(monitor: SaleMonitor) -> tuple[grpc.aio.Server, int]:
    settings = load_settings(RealtimeSettings, host="127.0.0.1", port=0, grace_seconds=0.2, log_json=False)
    names, register = sale_monitor_definition(monitor)
    return await create_server(
        settings, service_names=names, register=register, interceptors=backend_interceptors(settings)
    )


async def read_bus(bus: EventBus) -> pl.DataFrame:
    sub = await bus.subscribe("reader")
    frames = []
    try:
        while deliveries := await sub.fetch(100, 0.5):
            frames.extend(decode_batch(d.payload) for d in deliveries)
    finally:
        await sub.close()
    return pl.concat(frames)


async def caught_up(monitor: SaleMonitor, bus: EventBus) -> None:
    last = await bus.last_seq()
    for _ in range(500):
        if monitor.seq >= last:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"monitor at {monitor.seq}, stream at {last}")


def test_bus_messages_carry_one_owner_and_hash_it_into_their_ids() -> None:
    columns = columns_from_proto(pays(1, range(1, 301)))
    shards, buckets = shard_table(4), buckets_np(columns.user_id)
    platform = batches_from_columns(columns, buckets, shards)
    acme = batches_from_columns(columns.owned_by("acme"), buckets, shards)
    assert [b.count for b in platform] == [b.count for b in acme]
    assert not {b.msg_id for b in platform} & {b.msg_id for b in acme}  # same ids, other messages
    for a, p in zip(acme, platform, strict=True):
        frame = decode_batch(a.payload)
        assert frame.get_column(OWNER).unique().to_list() == ["acme"]
        assert frame.drop(OWNER).equals(decode_batch(p.payload).drop(OWNER))
    # A message published before events had owners (no owner column) is the platform's.
    old = decode_batch(encode_batch(decode_batch(platform[0].payload).drop(OWNER)))
    assert old.get_column(OWNER).unique().to_list() == [PLATFORM_OWNER]
    assert old.equals(decode_batch(platform[0].payload))
    # The owner is one dictionary entry per message (a byte per event), not a string per event.
    (short,) = batches_from_columns(columns.owned_by("b"), buckets, shard_table(1))
    (long,) = batches_from_columns(columns.owned_by("b" * 63), buckets, shard_table(1))
    assert len(long.payload) - len(short.payload) <= 64


@pytest.mark.timeout(60)
async def test_squatted_event_ids_do_not_make_another_tenants_events_duplicates(
    jetstream_bus, local_store: LocalObjectStore
) -> None:
    server, port = await serve_ingest(jetstream_bus)
    monitor = SaleMonitor(jetstream_bus)
    monitor.start()
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            # Tenant A squats ids 1..200 with junk clicks before B's real payments arrive.
            squat = [make_event(i, 5000 + i, E.EVENT_TYPE_CLICK) for i in range(1, 201)]
            reply = await stub.IngestEventBatch(batch(squat), metadata=as_tenant("a"))
            assert (reply.accepted, reply.duplicates) == (200, 0)
            real = pays(1, range(1, 201))  # B's payments: the same ids
            reply = await stub.IngestEventBatch(batch(real), metadata=as_tenant("b"))
            assert (reply.accepted, reply.duplicates) == (200, 0)
            # The platform's stream may use the same ids too.
            reply = await stub.IngestEventBatch(batch(pays(1, range(1, 51))))
            assert (reply.accepted, reply.duplicates) == (50, 0)
            # A retry stays a retry, per owner.
            reply = await stub.IngestEventBatch(batch(real), metadata=as_tenant("b"))
            assert (reply.accepted, reply.duplicates) == (0, 200)

        stored = await read_bus(jetstream_bus)
        assert dict(stored.group_by(OWNER).len().iter_rows()) == {"a": 200, "b": 200, PLATFORM_OWNER: 50}
        b_rows = stored.filter(pl.col(OWNER) == "b")
        assert b_rows.get_column("event_type").unique().to_list() == [E.EVENT_TYPE_PAY]

        # The compactor stores all three owners' events, and drops re-batched retries per owner.
        compactor = Compactor(local_store, jetstream_bus, max_events=100_000, max_age=3600)
        for _ in range(5):
            await compactor.step(timeout=0.05)
        await compactor.flush()
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            rebatched = [*real[::2], *pays(9000, range(1, 4))]  # other message ids, same event ids
            await stub.IngestEventBatch(batch(rebatched), metadata=as_tenant("b"))
        restarted = Compactor(local_store, jetstream_bus, max_events=100_000, max_age=3600)
        for _ in range(5):
            await restarted.step(timeout=0.05)
        await restarted.flush()
        assert restarted.stats.duplicates_dropped == 100
        dataset = EventDataset(local_store).scan_events(columns=[OWNER, "event_id"]).collect()
        assert dict(dataset.group_by(OWNER).len().iter_rows()) == {"a": 200, "b": 203, PLATFORM_OWNER: 50}
        assert dataset.filter(pl.col(OWNER) == "b").get_column("event_id").is_unique().all()

        # The sale monitor counts B's payments for B: none of them was taken for A's clicks.
        await caught_up(monitor, jetstream_bus)
        scope = SaleScope.from_pb(sale_monitor_pb2.SaleScope(item_ids=[HOOK_ITEM]))
        end = monitor.now_us() + 1
        stats = monitor.stats(scope, end - 3_600_000_000, end, tenant="b")
        assert stats.total.paid_orders == 203 + 50 and stats.total.clicks == 0
    finally:
        await monitor.stop()
        await server.stop(None)


@pytest.mark.timeout(60)
async def test_foreign_pay_events_never_count_in_another_tenants_sale_stats(jetstream_bus) -> None:
    ingest_server, ingest_port = await serve_ingest(jetstream_bus)
    monitor = SaleMonitor(jetstream_bus)
    monitor.start()
    monitor_server, monitor_port = await serve_monitor(monitor)
    try:
        async with (
            backend_channel(f"127.0.0.1:{ingest_port}") as ingest_channel,
            backend_channel(f"127.0.0.1:{monitor_port}") as monitor_channel,
        ):
            events = event_service_pb2_grpc.EventServiceStub(ingest_channel)
            sales = sale_monitor_pb2_grpc.SaleMonitorServiceStub(monitor_channel)
            # The platform's stream: B's live room sells 3 hook pieces, 20 clicks.
            platform = pays(1, range(1, 4)) + [
                make_event(100 + i, i, E.EVENT_TYPE_CLICK, item_id=HOOK_ITEM, campaign_id=LIVE_ROOM)
                for i in range(1, 21)
            ]
            await events.IngestEventBatch(batch(platform))
            # Tenant A forges 500 "payments" of B's hook item in B's live room ...
            await events.IngestEventBatch(batch(pays(1, range(1, 501))), metadata=as_tenant("a"))
            # ... and B records 2 conversions of its own on another item.
            own = pays(7000, range(1, 3), item_id=555, campaign_id=0)
            await events.IngestEventBatch(batch(own), metadata=as_tenant("b"))
            await caught_up(monitor, jetstream_bus)

            hook = sale_monitor_pb2.HookProduct(
                item_id=HOOK_ITEM, stock=500, sale_price_fen=2990, unit_cost_fen=5000
            )
            by_item = sale_monitor_pb2.SALE_GROUP_BY_ITEM

            async def stats(tenant: str, **scope) -> sale_monitor_pb2.SaleStats:
                request = sale_monitor_pb2.GetSaleStatsRequest(
                    parent=f"tenants/{tenant}", scope=sale_monitor_pb2.SaleScope(**scope), group_by=by_item
                )
                return await sales.GetSaleStats(request, metadata=as_tenant(tenant))

            sale = await stats("b", campaign_ids=[LIVE_ROOM], hook_products=[hook])
            assert (sale.total.paid_orders, sale.total.clicks, sale.total.stock_left) == (3, 20, 497)
            assert sale.total.paid_gmv_fen == 3 * 2990
            named = await stats("b", item_ids=[HOOK_ITEM, 555])
            assert {g.key: g.paid_orders for g in named.groups} == {f"item/{HOOK_ITEM}": 3, "item/555": 2}
            # An empty scope is "all of my own events", not every merchant's totals.
            everything = await stats("b")
            assert (everything.total.paid_orders, everything.total.clicks) == (2, 0)
            assert [g.key for g in everything.groups] == ["item/555"]
            # A sees its own forgeries (and the platform's events of what it names), never B's events.
            forged = await stats("a", item_ids=[HOOK_ITEM, 555])
            assert {g.key: g.paid_orders for g in forged.groups} == {f"item/{HOOK_ITEM}": 503}
            # WatchSale shows B the same counters.
            call = sales.WatchSale(
                sale_monitor_pb2.WatchSaleRequest(
                    parent="tenants/b",
                    scope=sale_monitor_pb2.SaleScope(campaign_ids=[LIVE_ROOM], hook_products=[hook]),
                ),
                metadata=as_tenant("b"),
            )
            first = await call.read()
            call.cancel()
            assert (first.total.paid_orders, first.total.stock_left) == (3, 497)
    finally:
        await monitor_server.stop(None)
        await monitor.stop()
        await ingest_server.stop(None)


async def test_sale_stats_of_another_tenants_parent_are_not_found(jetstream_bus) -> None:
    monitor = SaleMonitor(jetstream_bus)
    server, port = await serve_monitor(monitor)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            sales = sale_monitor_pb2_grpc.SaleMonitorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await sales.GetSaleStats(
                    sale_monitor_pb2.GetSaleStatsRequest(parent="tenants/a"), metadata=as_tenant("b")
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_details(caught.value).resource_info.resource_name == "tenants/a"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                call = sales.WatchSale(
                    sale_monitor_pb2.WatchSaleRequest(parent="tenants/a"), metadata=as_tenant("b")
                )
                await call.read()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # Bad parents name the field; never INTERNAL.
            for parent in (
                "",
                "tenants/",
                "tenants/A!",
                "acme",
                "tenants/a/campaigns/c",
                f"tenants/{PLATFORM_OWNER}",
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await sales.GetSaleStats(sale_monitor_pb2.GetSaleStatsRequest(parent=parent))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, parent
                violations = error_details(caught.value).bad_request.field_violations
                assert [v.field for v in violations] == ["parent"], parent
            # Its own parent, and a platform principal for any tenant, are answered.
            own = await sales.GetSaleStats(
                sale_monitor_pb2.GetSaleStatsRequest(parent="tenants/b"), metadata=as_tenant("b")
            )
            assert own.total.paid_orders == 0
            await sales.GetSaleStats(sale_monitor_pb2.GetSaleStatsRequest(parent="tenants/a"))
        # Without an assertion at all: refused before any handler runs.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as bare:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await sale_monitor_pb2_grpc.SaleMonitorServiceStub(bare).GetSaleStats(
                    sale_monitor_pb2.GetSaleStatsRequest(parent="tenants/b")
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)


async def test_ingest_needs_the_scope_of_the_owner_it_writes(jetstream_bus) -> None:
    server, port = await serve_ingest(jetstream_bus)
    target = f"127.0.0.1:{port}"
    callers = {
        # A platform service holding tenant scopes only: no tenant to own events, no platform scope.
        "platform without events.platform": Caller.platform("svc", [EVENTS_WRITE, PACKS_READ]),
        "tenant without events.write": Caller.for_tenant("a", "key", TENANT_SCOPES - {EVENTS_WRITE}),
    }
    expected = {
        "platform without events.platform": ("PLATFORM_SCOPE_REQUIRED", PLATFORM_EVENTS_WRITE),
        "tenant without events.write": ("MISSING_SCOPE", EVENTS_WRITE),
    }
    try:
        for label, caller in callers.items():
            async with asserting_channel(target, caller) as channel:
                stub = event_service_pb2_grpc.EventServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.IngestEventBatch(batch(pays(1, range(1, 3))))
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, label
                details = error_details(caught.value)
                assert (details.reason, details.error_info.metadata["scope"]) == expected[label], label
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.IngestEvents(
                        iter([event_service_pb2.IngestEventsRequest(events=pays(1, range(1, 3)))])
                    ):
                        pass
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, label
        # A tenant claiming a platform scope is no tenant principal at all (Caller refuses it), and
        # a tenant's events are its own whatever they look like: there is no owner field to send.
        with pytest.raises(ValueError):
            Caller.for_tenant("a", "key", {EVENTS_WRITE, PLATFORM_EVENTS_WRITE})
        async with asserting_channel(target, Caller.for_tenant("a", "key", [EVENTS_WRITE])) as channel:
            reply = await event_service_pb2_grpc.EventServiceStub(channel).IngestEventBatch(
                batch(pays(1, range(1, 4))),
                metadata=(("x-flashcrowd-event-owner", PLATFORM_OWNER), ("x-flashcrowd-tenant", "b")),
            )
            assert reply.accepted == 3
        async with asserting_channel(target, Caller.platform("ads", [PLATFORM_EVENTS_WRITE])) as channel:
            reply = await event_service_pb2_grpc.EventServiceStub(channel).IngestEventBatch(
                batch(pays(1, range(1, 3)))
            )
            assert reply.accepted == 2
        async with grpc.aio.insecure_channel(target) as bare:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await event_service_pb2_grpc.EventServiceStub(bare).IngestEventBatch(
                    batch(pays(1, range(1, 3)))
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stored = await read_bus(jetstream_bus)
        assert dict(stored.group_by(OWNER).len().iter_rows()) == {"a": 3, PLATFORM_OWNER: 2}
    finally:
        await server.stop(None)


@pytest.mark.timeout(120)
async def test_a_tenants_events_never_make_members_of_another_tenants_pack(
    tmp_path, nats_url, monkeypatch
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    generate(store, GenConfig(users=2000, days=2, seed=3))
    bus = await make_jetstream_bus(nats_url)
    monkeypatch.setenv("FLASHCROWD_BUS_URL", f"{bus.url}?stream={bus.stream}&subjects={bus.subject_prefix}")
    settings = load_settings(
        AudienceSettings, store_url=(tmp_path / "store").as_uri(), port=0, grace_seconds=0.2, log_json=False
    )
    server, port, app = await create_audience_server(settings)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            events = event_service_pb2_grpc.EventServiceStub(channel)
            # Users 10001-10010 pay on the platform; A's "conversions" name 10101-10150; B's 10201-10205.
            await events.IngestEventBatch(batch(pays(1, range(10_001, 10_011))))
            await events.IngestEventBatch(batch(pays(1, range(10_101, 10_151))), metadata=as_tenant("a"))
            await events.IngestEventBatch(batch(pays(1, range(10_201, 10_206))), metadata=as_tenant("b"))
            compactor = Compactor(store, bus, max_events=100_000, max_age=3600)
            for _ in range(5):
                await compactor.step(timeout=0.05)
            await compactor.flush()
            assert compactor.stats.events_written == 65

            stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
            ops = operations_pb2_grpc.OperationsStub(channel)
            spec = spec_pb2.PackSpec(
                behavior=spec_pb2.BehaviorCondition(
                    event_types=[E.EVENT_TYPE_PAY],
                    window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=3600)),
                    filter=spec_pb2.EventFilter(item_ids=[HOOK_ITEM]),
                )
            )

            async def members(tenant: str) -> set[int]:
                op = await stub.CreatePack(
                    audience_service_pb2.CreatePackRequest(
                        parent=f"tenants/{tenant}",
                        pack_id="payers",
                        pack=pack_pb2.Pack(spec=spec, options=spec_pb2.BuildOptions(include_bots=True)),
                    ),
                    metadata=as_tenant(tenant),
                )
                done = await ops.WaitOperation(
                    operations_pb2.WaitOperationRequest(
                        name=op.name, timeout=duration_pb2.Duration(seconds=60)
                    )
                )
                assert done.done and not done.HasField("error"), done.error
                pack = pack_pb2.Pack()
                done.response.Unpack(pack)
                check = await stub.CheckMembership(
                    audience_service_pb2.CheckMembershipRequest(
                        parent=f"tenants/{tenant}", packs=[pack.name], user_ids=list(range(10_001, 10_206))
                    )
                )
                flags = np.array(check.results[0].members)
                assert int(flags.sum()) == pack.size
                return {10_001 + int(i) for i in np.flatnonzero(flags)}

            platform = set(range(10_001, 10_011))
            assert await members("b") == platform | set(range(10_201, 10_206))
            assert await members("a") == platform | set(range(10_101, 10_151))
            assert await members("c") == platform
    finally:
        await server.stop(0.2)
        await app.close()
        await drop_stream(bus)


def test_stream_frames_keep_the_owner_through_arrow() -> None:
    """The frames consumers see (live packs, the monitor) have ``owner`` as a plain string column."""
    columns = columns_from_proto(pays(1, range(1, 11))).owned_by("acme")
    (message,) = batches_from_columns(columns, buckets_np(columns.user_id), shard_table(1))
    table = pa.ipc.open_stream(io.BytesIO(message.payload)).read_all()
    assert table.schema.field(OWNER).type == pa.dictionary(pa.int8(), pa.string())
    assert decode_batch(message.payload).schema[OWNER] == pl.Utf8
