"""Per-tenant quotas and the fair build queue over real gRPC (servers on port 0, the local store).

Every limit is hit by a tenant principal (``as_tenant``) and answered RESOURCE_EXHAUSTED with reason
TENANT_QUOTA and a QuotaFailure naming the limit's variable; the refused call consumed nothing
(counters, queues and pack ids are as before it); platform principals are not held to tenant limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import lookalike_pb2, lookalike_pb2_grpc, pack_pb2, spec_pb2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from services.audience.quotas import QUOTA_REASON
from services.audience.uploads import upload_requests
from services.runtime import error_details
from tests.audience.service.conftest import Service, start_service, stop_service
from tests.audience.service.specs import ET, behavior
from tests.fixtures.channels import as_tenant

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def _create(svc: Service, tenant: str, pack_id: str | None = None) -> api.CreatePackRequest:
    spec = behavior([ET.EVENT_TYPE_CLICK], svc.dataset.start, svc.dataset.end)
    return api.CreatePackRequest(
        parent=f"tenants/{tenant}", pack_id=pack_id or svc.new_id(), pack=pack_pb2.Pack(spec=spec)
    )


def assert_quota_refusal(error: grpc.aio.AioRpcError, tenant: str, quota: str, variable: str) -> None:
    details = error_details(error)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, details.message
    assert details.reason == QUOTA_REASON and details.error_info.metadata["quota"] == quota
    assert details.error_info.metadata["variable"] == variable
    assert details.quota_failure is not None
    [violation] = details.quota_failure.violations
    assert violation.subject == f"tenants/{tenant}" and variable in violation.description
    assert details.retry_after_seconds and details.retry_after_seconds > 0


async def _gate(svc: Service, tenant: str, release: threading.Event) -> operations_pb2.Operation:
    """A job of ``tenant`` holding a worker until ``release`` is set; returns once it runs."""
    op = await svc.app.operations.start(
        tenant, "Test", lambda ctx: release.wait(60) and pack_pb2.Pack(), api.BuildPackMetadata()
    )
    for _ in range(500):
        if svc.app.operations.queued(tenant) == 0:
            return op
        await asyncio.sleep(0.01)
    raise AssertionError("the gate job never started")


async def _done(svc: Service, name: str) -> bool:
    return (await svc.ops.GetOperation(operations_pb2.GetOperationRequest(name=name))).done


def _end_time(op: operations_pb2.Operation) -> float:
    metadata = api.BuildPackMetadata()
    assert op.metadata.Unpack(metadata) and metadata.HasField("end_time")
    return metadata.end_time.ToNanoseconds()


async def test_a_tenant_that_filled_its_queue_does_not_hold_back_another(local_world) -> None:
    store, url = local_world
    svc = await start_service(
        "local",
        store,
        url,
        max_concurrent_builds=2,
        tenant_max_running_builds=1,
        tenant_max_queued_builds=3,
    )
    release = threading.Event()
    a, b = _tenant(), _tenant()
    try:
        gate = await _gate(svc, a, release)  # A's one running build
        queued = [await svc.stub.CreatePack(_create(svc, a), metadata=as_tenant(a)) for _ in range(3)]
        refused_id = svc.new_id("refused")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await svc.stub.CreatePack(_create(svc, a, refused_id), metadata=as_tenant(a))
        assert_quota_refusal(caught.value, a, "queued_builds", "FLASHCROWD_TENANT_MAX_QUEUED_BUILDS")
        # The refusal consumed nothing: the same three wait, no operation or pack id was taken.
        assert svc.app.operations.queued(a) == 3
        listed = await svc.ops.ListOperations(operations_pb2.ListOperationsRequest(name=f"tenants/{a}"))
        assert len(listed.operations) == 4  # the gate and the three queued builds
        assert svc.app.servicer._building_op(a, refused_id) is None

        # B's build is accepted and runs on the free worker while A's three wait for A's slot.
        b_op = await svc.stub.CreatePack(_create(svc, b), metadata=as_tenant(b))
        finished = await svc.wait(b_op.name)
        assert not finished.HasField("error"), finished.error
        assert not any([await _done(svc, op.name) for op in queued])
        # Platform principals are not held to A's queued-builds limit.
        platform_op = await svc.stub.CreatePack(_create(svc, a))

        release.set()
        await svc.wait(gate.name)
        for op in [*queued, platform_op]:
            done = await svc.wait(op.name)
            assert not done.HasField("error"), done.error
        again = await svc.create(a, _create(svc, a).pack.spec, pack_id=refused_id, metadata=as_tenant(a))
        assert not again.HasField("error"), again.error  # room again once the queue drained
    finally:
        release.set()
        await stop_service(svc)


async def test_the_next_build_is_the_waiting_tenants(local_world) -> None:
    store, url = local_world
    svc = await start_service(
        "local", store, url, max_concurrent_builds=1, tenant_max_running_builds=1, tenant_max_queued_builds=20
    )
    release = threading.Event()
    a, b = _tenant(), _tenant()
    try:
        gate = await _gate(svc, a, release)  # the only worker, busy with A
        a_ops = [await svc.stub.CreatePack(_create(svc, a), metadata=as_tenant(a)) for _ in range(5)]
        b_op = await svc.stub.CreatePack(_create(svc, b), metadata=as_tenant(b))  # queued behind five
        release.set()
        await svc.wait(gate.name)
        a_done = [await svc.wait(op.name) for op in a_ops]
        b_done = await svc.wait(b_op.name)
        assert not b_done.HasField("error") and not any(op.HasField("error") for op in a_done)
        # One worker runs them one after the other: B's build went first, then A's in their order.
        ends = [_end_time(op) for op in a_done]
        assert _end_time(b_done) < min(ends) and ends == sorted(ends)
    finally:
        release.set()
        await stop_service(svc)


async def _upload(svc: Service, tenant: str, pack_id: str, rows: int, *, tenant_call: bool = True):
    digests = [hashlib.sha256(f"{tenant}-{pack_id}-{i}".encode()).hexdigest() for i in range(rows)]
    header = api.UploadPackHeader(
        parent=f"tenants/{tenant}", pack_id=pack_id, id_type=api.ID_TYPE_PHONE, hash_type=api.HASH_TYPE_SHA256
    )

    async def stream():
        for message in upload_requests(header, digests, chunk_rows=100):
            yield message

    return await svc.stub.UploadPack(stream(), metadata=as_tenant(tenant) if tenant_call else None)


async def test_uploads_and_rows_per_day(local_world, monkeypatch) -> None:
    store, url = local_world
    svc = await start_service(
        "local", store, url, tenant_max_uploads_per_day=3, tenant_max_upload_rows_per_day=250
    )
    tenant = _tenant()
    quotas = svc.app.quotas
    assert quotas is not None
    uploads, rows = quotas.limits.uploads_per_day, quotas.limits.upload_rows_per_day

    def used() -> tuple[int, int]:
        return quotas.used_today(tenant, uploads), quotas.used_today(tenant, rows)

    try:
        first = await _upload(svc, tenant, "first", 200)
        assert first.stats.received == 200 and used() == (1, 200)
        # 100 more rows would pass 250: refused, naming the rows limit; nothing counted or written.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(svc, tenant, "too-many-rows", 100)
        assert_quota_refusal(
            caught.value, tenant, "upload_rows_per_day", "FLASHCROWD_TENANT_MAX_UPLOAD_ROWS_PER_DAY"
        )
        assert used() == (1, 200) and not svc.app.packs.exists(tenant, "too-many-rows")
        # Refused for another reason (the pack exists): nothing counted either.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(svc, tenant, "first", 10)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and used() == (1, 200)
        # Failing after the charge (the publish breaks): the units are given back.
        original = svc.app.packs.publish_version

        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(svc.app.packs, "publish_version", broken)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(svc, tenant, "broken", 10)
        assert caught.value.code() == grpc.StatusCode.INTERNAL and used() == (1, 200)
        monkeypatch.setattr(svc.app.packs, "publish_version", original)

        await _upload(svc, tenant, "second", 50)
        assert used() == (2, 250)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(svc, tenant, "rows-gone", 1)
        assert_quota_refusal(
            caught.value, tenant, "upload_rows_per_day", "FLASHCROWD_TENANT_MAX_UPLOAD_ROWS_PER_DAY"
        )
        # Another tenant has its own counters; platform principals are not held to tenant quotas.
        other = _tenant()
        await _upload(svc, other, "own", 250)
        platform = await _upload(svc, tenant, "by-platform", 300, tenant_call=False)
        assert platform.stats.received == 300 and used() == (2, 250)
    finally:
        await stop_service(svc)


async def test_uploads_per_day_refused_before_the_rows(local_world) -> None:
    store, url = local_world
    svc = await start_service("local", store, url, tenant_max_uploads_per_day=2)
    tenant = _tenant()
    try:
        await _upload(svc, tenant, "one", 5)
        await _upload(svc, tenant, "two", 5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _upload(svc, tenant, "three", 5)
        assert_quota_refusal(caught.value, tenant, "uploads_per_day", "FLASHCROWD_TENANT_MAX_UPLOADS_PER_DAY")
        assert not svc.app.packs.exists(tenant, "three")
        assert svc.app.quotas.used_today(tenant, svc.app.quotas.limits.uploads_per_day) == 2
        # The refusal comes from the header: the pack id was never claimed.
        assert svc.app.servicer._building_op(tenant, "three") is None
    finally:
        await stop_service(svc)


async def test_expansions_and_trainings_per_day(local_world) -> None:
    store, url = local_world
    svc = await start_service("local", store, url, tenant_max_expansions_per_day=1, max_trainings_per_day=1)
    lookalike = lookalike_pb2_grpc.LookalikeServiceStub(svc.channel)
    tenant = _tenant()
    model = f"q{uuid.uuid4().hex[:8]}"
    try:
        trained = await svc.wait(
            (
                await lookalike.TrainLookalikeModel(
                    lookalike_pb2.TrainLookalikeModelRequest(model_id=model, cluster_count=8)
                )
            ).name
        )
        assert not trained.HasField("error"), trained.error
        # The training limit holds for platform principals too (only they may train).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookalike.TrainLookalikeModel(
                lookalike_pb2.TrainLookalikeModelRequest(model_id=f"{model}-2", cluster_count=8)
            )
        assert_quota_refusal(
            caught.value, "platform", "trainings_per_day", "FLASHCROWD_MAX_TRAININGS_PER_DAY"
        )

        seed = spec_pb2.PackSpec(
            shortcut=spec_pb2.Shortcut(
                kind=spec_pb2.Shortcut.KIND_CLICKERS,
                window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=30 * 86_400)),
            )
        )
        await svc.create_pack(tenant, seed, pack_id="seed")

        def expand(pack_id: str, seed_pack: str = "seed") -> lookalike_pb2.ExpandLookalikeRequest:
            return lookalike_pb2.ExpandLookalikeRequest(
                parent=f"tenants/{tenant}",
                seed_pack=f"tenants/{tenant}/packs/{seed_pack}",
                pack_id=pack_id,
                reach_fraction=0.01,
                model=f"lookalikeModels/{model}",
            )

        expansions = svc.app.quotas.limits.expansions_per_day
        # Refused for another reason (no such seed): nothing counted.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookalike.ExpandLookalike(expand("lal-x", "missing"), metadata=as_tenant(tenant))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert svc.app.quotas.used_today(tenant, expansions) == 0
        op = await lookalike.ExpandLookalike(expand("lal-1"), metadata=as_tenant(tenant))
        assert not (await svc.wait(op.name)).HasField("error")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lookalike.ExpandLookalike(expand("lal-2"), metadata=as_tenant(tenant))
        assert_quota_refusal(
            caught.value, tenant, "expansions_per_day", "FLASHCROWD_TENANT_MAX_EXPANSIONS_PER_DAY"
        )
        assert svc.app.quotas.used_today(tenant, expansions) == 1
        assert not svc.app.packs.exists(tenant, "lal-2")
        assert svc.app.servicer._building_op(tenant, "lal-2") is None
        # Platform principals expand for the tenant without its quota.
        op = await lookalike.ExpandLookalike(expand("lal-3"))
        assert not (await svc.wait(op.name)).HasField("error")
        assert svc.app.quotas.used_today(tenant, expansions) == 1
    finally:
        await stop_service(svc)
