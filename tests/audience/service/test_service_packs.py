"""Pack lifecycle over real gRPC, on the local store and on the S3-protocol server."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import pack_pb2
from google.longrunning import operations_pb2
from pyroaring import BitMap

from services.audience.bots import bot_bitmap
from services.runtime import error_details
from tests.audience.service.specs import (
    ET,
    INCLUDE_BOTS,
    behavior,
    exclude,
    expected_users,
    intersect,
    ref,
    union,
)
from tests.fixtures.channels import AS_TENANT

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _days(svc):
    start = svc.dataset.start
    return start, start + timedelta(days=1), start + timedelta(days=2), svc.dataset.end


async def _members(svc, name: str, version: int = 0) -> BitMap:
    ids: list[int] = []
    async for page in svc.stub.ExportPack(
        api.ExportPackRequest(name=name, format=api.EXPORT_FORMAT_USER_ID, page_size=100_000, version=version)
    ):
        ids.extend(page.user_ids)
    return BitMap(ids)


async def test_create_wait_get_list_refresh_delete(svc) -> None:
    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    spec = behavior([ET.EVENT_TYPE_CLICK], d0, end, min_count=2)
    op = await svc.stub.CreatePack(
        api.CreatePackRequest(
            parent=f"tenants/{tenant}",
            pack_id="clickers",
            pack=pack_pb2.Pack(spec=spec, options=INCLUDE_BOTS, labels={"team": "growth"}, display_name="C"),
        )
    )
    assert op.name.startswith(f"tenants/{tenant}/operations/")
    meta = api.BuildPackMetadata()
    assert op.metadata.Unpack(meta) and meta.pack == f"tenants/{tenant}/packs/clickers" and meta.version == 1

    done = await svc.wait(op.name)
    assert done.done and not done.HasField("error")
    assert done.metadata.Unpack(meta) and meta.progress_percent == 100.0 and meta.HasField("end_time")
    built = pack_pb2.Pack()
    assert done.response.Unpack(built)

    pack = await svc.stub.GetPack(api.GetPackRequest(name=f"tenants/{tenant}/packs/clickers"))
    assert pack.state == pack_pb2.Pack.STATE_READY and pack.version == 1
    assert pack.source == pack_pb2.Pack.SOURCE_SPEC and pack.display_name == "C"
    assert pack.size == built.size > 0 and pack.build_stats.files_read > 0
    expected = expected_users(svc.dataset, [ET.EVENT_TYPE_CLICK], d0, end, min_count=2)
    assert await _members(svc, pack.name) == expected
    assert pack.size == len(expected)

    # GetOperation answers the same, and ListOperations lists it for this tenant only.
    again = await svc.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
    assert again == done
    listed = await svc.ops.ListOperations(operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}"))
    assert [o.name for o in listed.operations] == [op.name]

    # A second, labelled pack; list pagination and the label filter.
    for i in range(3):
        await svc.create_pack(
            tenant, behavior([ET.EVENT_TYPE_PAY], d0, end), pack_id=f"payers-{i}", labels={"team": "ops"}
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await svc.stub.ListPacks(
            api.ListPacksRequest(parent=f"tenants/{tenant}", page_size=2, page_token=token)
        )
        assert len(page.packs) <= 2
        seen.extend(p.name for p in page.packs)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(
        [f"tenants/{tenant}/packs/{p}" for p in ("clickers", "payers-0", "payers-1", "payers-2")]
    )
    assert seen[-1] == f"tenants/{tenant}/packs/clickers"  # newest first
    ops_only = await svc.stub.ListPacks(
        api.ListPacksRequest(parent=f"tenants/{tenant}", filter="labels.team=ops")
    )
    assert sorted(p.name.rsplit("/", 1)[1] for p in ops_only.packs) == ["payers-0", "payers-1", "payers-2"]

    # Refresh: a new version from the stored spec, same members (same data), version 2.
    refresh = await svc.stub.RefreshPack(api.RefreshPackRequest(name=pack.name))
    assert refresh.metadata.Unpack(meta) and meta.version == 2
    refreshed_op = await svc.wait(refresh.name)
    assert not refreshed_op.HasField("error"), refreshed_op.error
    refreshed = await svc.stub.GetPack(api.GetPackRequest(name=pack.name))
    assert refreshed.version == 2 and refreshed.size == pack.size
    assert await _members(svc, pack.name, version=1) == await _members(svc, pack.name, version=2)

    # Delete: gone for reads, lists and membership checks.
    await svc.stub.DeletePack(api.DeletePackRequest(name=pack.name))
    for call in (
        svc.stub.GetPack(api.GetPackRequest(name=pack.name)),
        svc.stub.DeletePack(api.DeletePackRequest(name=pack.name)),
        svc.stub.CheckMembership(
            api.CheckMembershipRequest(parent=f"tenants/{tenant}", packs=[pack.name], user_ids=[1])
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    remaining = await svc.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{tenant}"))
    assert pack.name not in {p.name for p in remaining.packs}


async def test_bots_are_excluded_by_default(svc) -> None:
    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    pack = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_CLICK], d0, end))
    bots = bot_bitmap(svc.dataset)
    everyone = expected_users(svc.dataset, [ET.EVENT_TYPE_CLICK], d0, end)
    assert await _members(svc, pack.name) == everyone - bots
    assert pack.build_stats.bots_excluded == len(everyone & bots) > 0


async def test_set_operations_on_pack_references_match_pyroaring(svc) -> None:
    tenant = svc.new_tenant()
    d0, d1, d2, end = _days(svc)
    clicked = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_CLICK], d1, d2), options=INCLUDE_BOTS)
    paid = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_PAY], d0, end), options=INCLUDE_BOTS)
    a, b = await _members(svc, clicked.name), await _members(svc, paid.name)
    assert a and b
    cases = {
        "union": (union(ref(clicked.name), ref(paid.name)), a | b),
        "intersect": (intersect(ref(clicked.name), ref(paid.name)), a & b),
        "exclude": (exclude(ref(clicked.name), ref(paid.name)), a - b),
    }
    for label, (spec, expected) in cases.items():
        pack = await svc.create_pack(tenant, spec, options=INCLUDE_BOTS, pack_id=f"{label}-{svc.new_id()}")
        assert await _members(svc, pack.name) == expected, label
        assert [(r.pack, r.version) for r in pack.inputs] == sorted(
            [(clicked.name, 1), (paid.name, 1)], key=lambda r: [clicked.name, paid.name].index(r[0])
        )
    # Clicked on the sale day minus paid, built from events directly, equals the hand-written query.
    direct = await svc.create_pack(
        tenant,
        exclude(behavior([ET.EVENT_TYPE_CLICK], d1, d2), behavior([ET.EVENT_TYPE_PAY], d0, end)),
        options=INCLUDE_BOTS,
    )
    assert await _members(svc, direct.name) == a - b


async def test_request_id_makes_create_idempotent_and_duplicates_conflict(svc) -> None:
    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    request = api.CreatePackRequest(
        parent=f"tenants/{tenant}",
        pack_id="retried",
        pack=pack_pb2.Pack(spec=behavior([ET.EVENT_TYPE_FOLLOW], d0, end)),
        request_id="5f0c6a4e-retry",
    )
    first = await svc.stub.CreatePack(request)
    second = await svc.stub.CreatePack(request)  # a retry, maybe while the build still runs
    assert second.name == first.name
    await svc.wait(first.name)
    third = await svc.stub.CreatePack(request)  # a retry after it finished
    assert third.name == first.name and third.done

    other = api.CreatePackRequest()
    other.CopyFrom(request)
    other.pack.labels["x"] = "y"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.CreatePack(other)  # same request id, different request
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details.field_violations] == ["request_id"]

    other.request_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.CreatePack(other)  # same pack id without the token
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(caught.value).reason == "PACK_ALREADY_EXISTS"


async def test_estimate_is_close_to_the_built_size(svc) -> None:
    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    spec = behavior([ET.EVENT_TYPE_PRODUCT_VIEW], d0, end)
    estimate = await svc.stub.EstimatePackSize(
        api.EstimatePackSizeRequest(
            parent=f"tenants/{tenant}", spec=spec, options=INCLUDE_BOTS, sample_fraction=0.25
        )
    )
    actual = len(expected_users(svc.dataset, [ET.EVENT_TYPE_PRODUCT_VIEW], d0, end))
    assert estimate.sample_fraction == 0.25
    assert 0 < estimate.sample_size < actual
    assert estimate.lower_bound <= actual <= estimate.upper_bound
    assert abs(estimate.estimated_size - actual) / actual < 0.15
    full = await svc.stub.EstimatePackSize(
        api.EstimatePackSizeRequest(
            parent=f"tenants/{tenant}", spec=spec, options=INCLUDE_BOTS, sample_fraction=1
        )
    )
    assert full.estimated_size == full.sample_size == full.lower_bound == full.upper_bound == actual
    # Nothing was written.
    assert not (await svc.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{tenant}"))).packs


async def test_build_that_dies_midway_leaves_no_pack(svc, monkeypatch) -> None:
    import services.audience.packstore as packstore_module

    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    real_publish = packstore_module.publish

    def dying_publish(store, *, data, manifest_key, manifest, overwrite=False):
        for key, value in data.items():  # the data lands ...
            store.put_bytes(key, bytes(value))
        raise OSError("connection reset while writing the manifest")  # ... the manifest never does

    monkeypatch.setattr(packstore_module, "publish", dying_publish)
    try:
        op = await svc.create(tenant, behavior([ET.EVENT_TYPE_CLICK], d0, end), pack_id="doomed")
    finally:
        monkeypatch.setattr(packstore_module, "publish", real_publish)
    assert op.HasField("error") and op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert not op.HasField("response")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.GetPack(api.GetPackRequest(name=f"tenants/{tenant}/packs/doomed"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (await svc.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{tenant}"))).packs
    keys = [info.key for info in svc.store.list(f"packs/{tenant}/doomed/")]
    assert not [k for k in keys if k.endswith(("manifest.json", "latest.json"))], keys
    # The id is free again: a retry succeeds.
    pack = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_CLICK], d0, end), pack_id="doomed")
    assert pack.version >= 1 and pack.size > 0


async def test_operations_survive_a_restart(svc) -> None:
    """A second server on the same store and control database answers for the first one's
    operations; what a dead process left behind is taken over only once its lease expired."""
    import asyncio

    from services.audience.operation_store import OperationStore
    from services.audience.operations import OperationManager
    from services.audience.pack_builds import build_payload
    from services.audience.server import open_control
    from tests.audience.service.conftest import start_service, stop_service

    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    op = await svc.create(tenant, behavior([ET.EVENT_TYPE_LIVE_ENTER], d0, end))
    # A "dead" process: no worker threads and no heartbeat, so its leases run out after 0.3 s.
    control = open_control(svc.settings)
    ghost = OperationManager(
        OperationStore(control), lease_seconds=0.3, start_threads=False, runners={"CreatePack": None}
    )
    dead = threading.Event()
    pinned = await ghost.start(tenant, "CreatePack", lambda ctx: dead.wait(30), api.BuildPackMetadata())
    # A portable build it had claimed when it died: another replica must run it to the end.
    template = pack_pb2.Pack(spec=behavior([ET.EVENT_TYPE_CLICK], d0, end))
    portable = await ghost.start(
        tenant, "CreatePack", None, api.BuildPackMetadata(pack=f"tenants/{tenant}/packs/orphan"),
        payload=build_payload(f"tenants/{tenant}/packs/orphan", template),
    )  # fmt: skip
    claimed = ghost.store.claim(ghost.replica_id, 0.0, portable=True, pinned=False, max_running=None)
    assert claimed is not None and claimed.operation.op_id == portable.name.rsplit("/", 1)[1]
    await asyncio.sleep(0.4)

    second = await start_service(svc.kind, svc.store, svc.store_url)
    try:
        same = await second.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert same.done and same.response == op.response
        ghost_op = await second.ops.GetOperation(operations_pb2.GetOperationRequest(name=pinned.name))
        assert ghost_op.done and ghost_op.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert ghost_op.error.message == "server restarted; retry"
        rerun = await second.wait(portable.name)
        assert not rerun.HasField("error"), rerun.error
        built = pack_pb2.Pack()
        assert rerun.response.Unpack(built) and built.size > 0
        assert built.name == f"tenants/{tenant}/packs/orphan"
        # Finished means finished: the ghost's late result cannot replace the recorded one.
        assert not ghost.store.finish(tenant, claimed.operation.op_id, b"late", owner=ghost.replica_id)
        again = await second.ops.GetOperation(operations_pb2.GetOperationRequest(name=portable.name))
        assert again == rerun
    finally:
        dead.set()
        await stop_service(second)
        control.close()


async def test_operations_service_contract(svc) -> None:
    tenant = svc.new_tenant()
    release = threading.Event()
    manager = svc.app.operations

    def slow(ctx):
        while not release.wait(0.02):
            ctx.progress("scan", 50.0)
        return pack_pb2.Pack(name="done")

    op = await manager.start(tenant, "Test", slow, api.BuildPackMetadata(pack="p"))
    waited = await svc.ops.WaitOperation(
        operations_pb2.WaitOperationRequest(name=op.name, timeout={"nanos": 200_000_000})
    )
    assert not waited.done  # the timeout returns the running operation
    meta = api.BuildPackMetadata()
    assert waited.metadata.Unpack(meta) and meta.stage == "scan" and meta.progress_percent == 50.0

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await svc.ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
    cancelled = await svc.wait(op.name)
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]

    release.set()
    finished = await manager.start(
        tenant, "Test", lambda ctx: pack_pb2.Pack(name="ok"), api.BuildPackMetadata()
    )
    await svc.wait(finished.name)
    listed = await svc.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}/operations", page_size=1)
    )
    assert [o.name for o in listed.operations] == [finished.name] and listed.next_page_token
    rest = await svc.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}", page_token=listed.next_page_token)
    )
    assert [o.name for o in rest.operations] == [op.name] and not rest.next_page_token
    running = await svc.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}", filter="done=false")
    )
    assert not running.operations

    await svc.ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Another tenant cannot see, wait for, cancel or delete it.
    foreign = finished.name.replace(f"tenants/{tenant}/", "tenants/someone-else/")
    for request, call in (
        (operations_pb2.GetOperationRequest(name=foreign), svc.ops.GetOperation),
        (operations_pb2.CancelOperationRequest(name=foreign), svc.ops.CancelOperation),
        (operations_pb2.DeleteOperationRequest(name=foreign), svc.ops.DeleteOperation),
        (operations_pb2.WaitOperationRequest(name=foreign), svc.ops.WaitOperation),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.ops.GetOperation(
            operations_pb2.GetOperationRequest(name=finished.name),
            metadata=((AS_TENANT, "someone-else"),),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_build_span_is_a_child_of_the_create_call(svc) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.runtime import attributes, setup_telemetry

    exporter = InMemorySpanExporter()
    setup_telemetry("audience-tests", span_exporter=exporter)
    tenant = svc.new_tenant()
    d0, _, _, end = _days(svc)
    pack = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_ADD_CART], d0, end), pack_id="traced")
    spans = exporter.get_finished_spans()
    build = [
        s
        for s in spans
        if s.name == "audience.build_pack" and s.attributes.get(attributes.PACK_NAME) == pack.name
    ]
    assert len(build) == 1
    assert build[0].attributes[attributes.PACK_SIZE] == pack.size
    assert build[0].attributes[attributes.TENANT] == tenant
    create = [
        s for s in spans if s.name.endswith("/CreatePack") and s.context.trace_id == build[0].context.trace_id
    ]
    assert create and build[0].parent is not None and build[0].parent.span_id == create[0].context.span_id
