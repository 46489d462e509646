"""Every class of bad input gets the right status code, with the field named, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from services.runtime import error_details
from tests.audience.service.specs import ET, behavior, exclude, intersect, ref

pytestmark = pytest.mark.asyncio(loop_scope="session")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Case:
    label: str
    call: Callable[[Any, str], Any]  # (svc, tenant) -> awaitable or async iterator
    code: grpc.StatusCode = INVALID
    field: str | None = None  # a BadRequest field violation must start with this


def _create(tenant: str, spec: spec_pb2.PackSpec | None = None, **kwargs) -> api.CreatePackRequest:
    values: dict[str, Any] = dict(parent=f"tenants/{tenant}", pack_id="bad")
    if spec is not None:
        values["pack"] = pack_pb2.Pack(spec=spec)
    values.update(kwargs)
    return api.CreatePackRequest(**values)


def _good_spec(svc) -> spec_pb2.PackSpec:
    return behavior([ET.EVENT_TYPE_CLICK], svc.dataset.start, svc.dataset.end)


def _female_and_male() -> spec_pb2.PackSpec:
    return intersect(
        spec_pb2.PackSpec(profile=spec_pb2.ProfileFilter(genders=[spec_pb2.GENDER_FEMALE])),
        spec_pb2.PackSpec(profile=spec_pb2.ProfileFilter(genders=[spec_pb2.GENDER_MALE])),
    )


def _backwards(svc) -> spec_pb2.PackSpec:
    return behavior([ET.EVENT_TYPE_CLICK], svc.dataset.end, svc.dataset.start)


CASES = [
    # CreatePack
    Case(
        "create: no parent",
        lambda s, t: s.stub.CreatePack(_create(t, _good_spec(s), parent="")),
        field="parent",
    ),
    Case(
        "create: bad parent",
        lambda s, t: s.stub.CreatePack(_create(t, _good_spec(s), parent=t)),
        field="parent",
    ),
    Case(
        "create: bad pack id",
        lambda s, t: s.stub.CreatePack(_create(t, _good_spec(s), pack_id="Bad_Id")),
        field="pack_id",
    ),
    Case(
        "create: no pack id",
        lambda s, t: s.stub.CreatePack(_create(t, _good_spec(s), pack_id="")),
        field="pack_id",
    ),
    Case("create: no spec", lambda s, t: s.stub.CreatePack(_create(t)), field="pack.spec"),
    Case(
        "create: empty spec",
        lambda s, t: s.stub.CreatePack(_create(t, spec_pb2.PackSpec())),
        field="pack.spec",
    ),
    Case(
        "create: window ends before it starts",
        lambda s, t: s.stub.CreatePack(_create(t, _backwards(s))),
        field="pack.spec.behavior.window.absolute.end_time",
    ),
    Case(
        "create: unknown event type",
        lambda s, t: s.stub.CreatePack(_create(t, behavior([99], s.dataset.start, s.dataset.end))),
        field="pack.spec.behavior.event_types[0]",
    ),
    Case(
        "create: contradictory spec",
        lambda s, t: s.stub.CreatePack(_create(t, _female_and_male())),
        field="pack.spec.intersect.operands",
    ),
    Case(
        "create: union of one operand",
        lambda s, t: s.stub.CreatePack(
            _create(t, spec_pb2.PackSpec(union=spec_pb2.SetOperands(operands=[_good_spec(s)])))
        ),
        field="pack.spec.union",
    ),
    Case(
        "create: negative ttl",
        lambda s, t: s.stub.CreatePack(
            api.CreatePackRequest(
                parent=f"tenants/{t}",
                pack_id="bad",
                pack=pack_pb2.Pack(spec=_good_spec(s), ttl=duration_pb2.Duration(seconds=-5)),
            )
        ),
        field="pack.ttl",
    ),
    Case(
        "create: request id too long",
        lambda s, t: s.stub.CreatePack(_create(t, _good_spec(s), request_id="r" * 500)),
        field="request_id",
    ),
    Case(
        "create: reference to a missing pack",
        lambda s, t: s.stub.CreatePack(_create(t, ref(f"tenants/{t}/packs/missing"))),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "create: reference to another tenant's pack",
        lambda s, t: s.stub.CreatePack(_create(t, ref("tenants/other-tenant/packs/theirs"))),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "create: malformed reference",
        lambda s, t: s.stub.CreatePack(_create(t, ref("packs/x"))),
        field="pack.spec.pack.pack",
    ),
    Case(
        "create: a pack referencing itself",
        lambda s, t: s.stub.CreatePack(_create(t, exclude(_good_spec(s), ref(f"tenants/{t}/packs/bad")))),
        code=grpc.StatusCode.FAILED_PRECONDITION,
    ),
    # EstimatePackSize
    Case(
        "estimate: fraction above 1",
        lambda s, t: s.stub.EstimatePackSize(
            api.EstimatePackSizeRequest(parent=f"tenants/{t}", spec=_good_spec(s), sample_fraction=2)
        ),
        field="sample_fraction",
    ),
    Case(
        "estimate: no spec",
        lambda s, t: s.stub.EstimatePackSize(api.EstimatePackSizeRequest(parent=f"tenants/{t}")),
        field="spec",
    ),
    Case(
        "estimate: bad spec",
        lambda s, t: s.stub.EstimatePackSize(
            api.EstimatePackSizeRequest(parent=f"tenants/{t}", spec=_backwards(s))
        ),
        field="spec.behavior.window",
    ),
    # Get / List / Delete / Refresh
    Case("get: no name", lambda s, t: s.stub.GetPack(api.GetPackRequest()), field="name"),
    Case(
        "get: malformed name",
        lambda s, t: s.stub.GetPack(api.GetPackRequest(name=f"tenants/{t}/packs")),
        field="name",
    ),
    Case(
        "get: unknown pack",
        lambda s, t: s.stub.GetPack(api.GetPackRequest(name=f"tenants/{t}/packs/nope")),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "list: page size too big",
        lambda s, t: s.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{t}", page_size=1001)),
        field="page_size",
    ),
    Case(
        "list: negative page size",
        lambda s, t: s.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{t}", page_size=-1)),
        field="page_size",
    ),
    Case(
        "list: bad page token",
        lambda s, t: s.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{t}", page_token="garbage!")),
        field="page_token",
    ),
    Case(
        "list: bad filter",
        lambda s, t: s.stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{t}", filter="size>3")),
        field="filter",
    ),
    Case(
        "delete: unknown pack",
        lambda s, t: s.stub.DeletePack(api.DeletePackRequest(name=f"tenants/{t}/packs/nope")),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "refresh: unknown pack",
        lambda s, t: s.stub.RefreshPack(api.RefreshPackRequest(name=f"tenants/{t}/packs/nope")),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "refresh: as_of out of range",
        lambda s, t: s.stub.RefreshPack(
            api.RefreshPackRequest(
                name=f"tenants/{t}/packs/nope", as_of=timestamp_pb2.Timestamp(seconds=10**12)
            )
        ),
        field="as_of",
    ),
    # CheckMembership
    Case(
        "check: no packs",
        lambda s, t: s.stub.CheckMembership(api.CheckMembershipRequest(parent=f"tenants/{t}", user_ids=[1])),
        field="packs",
    ),
    Case(
        "check: 17 packs",
        lambda s, t: s.stub.CheckMembership(
            api.CheckMembershipRequest(
                parent=f"tenants/{t}", packs=[f"tenants/{t}/packs/p{i}" for i in range(17)], user_ids=[1]
            )
        ),
        field="packs",
    ),
    Case(
        "check: no ids",
        lambda s, t: s.stub.CheckMembership(
            api.CheckMembershipRequest(parent=f"tenants/{t}", packs=[f"tenants/{t}/packs/a"])
        ),
        field="user_ids",
    ),
    Case(
        "check: 10001 ids",
        lambda s, t: s.stub.CheckMembership(
            api.CheckMembershipRequest(
                parent=f"tenants/{t}", packs=[f"tenants/{t}/packs/a"], user_ids=range(10_001)
            )
        ),
        field="user_ids",
    ),
    Case(
        "check: malformed pack name",
        lambda s, t: s.stub.CheckMembership(
            api.CheckMembershipRequest(parent=f"tenants/{t}", packs=["nope"], user_ids=[1])
        ),
        field="packs[0]",
    ),
    Case(
        "check: unknown pack",
        lambda s, t: s.stub.CheckMembership(
            api.CheckMembershipRequest(parent=f"tenants/{t}", packs=[f"tenants/{t}/packs/nope"], user_ids=[1])
        ),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    # ExportPack
    Case(
        "export: no format",
        lambda s, t: s.stub.ExportPack(api.ExportPackRequest(name=f"tenants/{t}/packs/a")),
        field="format",
    ),
    Case(
        "export: page too big",
        lambda s, t: s.stub.ExportPack(
            api.ExportPackRequest(name=f"tenants/{t}/packs/a", format=1, page_size=100_001)
        ),
        field="page_size",
    ),
    Case(
        "export: negative version",
        lambda s, t: s.stub.ExportPack(
            api.ExportPackRequest(name=f"tenants/{t}/packs/a", format=1, version=-1)
        ),
        field="version",
    ),
    Case(
        "export: unknown pack",
        lambda s, t: s.stub.ExportPack(api.ExportPackRequest(name=f"tenants/{t}/packs/nope", format=1)),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    # Persona
    Case(
        "persona: top_n too big",
        lambda s, t: s.stub.GetPackPersona(api.GetPackPersonaRequest(name=f"tenants/{t}/packs/a", top_n=101)),
        field="top_n",
    ),
    # Operations
    Case(
        "operation: malformed name",
        lambda s, t: s.ops.GetOperation(operations_pb2.GetOperationRequest(name="operations/1")),
        field="name",
    ),
    Case(
        "operation: unknown",
        lambda s, t: s.ops.GetOperation(
            operations_pb2.GetOperationRequest(name=f"tenants/{t}/operations/{'0' * 24}")
        ),
        code=grpc.StatusCode.NOT_FOUND,
    ),
    Case(
        "operation: negative wait",
        lambda s, t: s.ops.WaitOperation(
            operations_pb2.WaitOperationRequest(
                name=f"tenants/{t}/operations/{'0' * 24}", timeout=duration_pb2.Duration(seconds=-1)
            )
        ),
        field="timeout",
    ),
    Case(
        "operations: page too big",
        lambda s, t: s.ops.ListOperations(
            operations_pb2.ListOperationsRequest(name=f"tenants/{t}", page_size=5000)
        ),
        field="page_size",
    ),
    Case(
        "operations: bad filter",
        lambda s, t: s.ops.ListOperations(
            operations_pb2.ListOperationsRequest(name=f"tenants/{t}", filter="kind=x")
        ),
        field="filter",
    ),
    Case(
        "operations: bad token",
        lambda s, t: s.ops.ListOperations(
            operations_pb2.ListOperationsRequest(name=f"tenants/{t}", page_token="zz")
        ),
        field="page_token",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_bad_input(svc, case: Case) -> None:
    tenant = svc.new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = case.call(svc, tenant)
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    details = error_details(caught.value)
    assert details.code == case.code, (details.code, details.message)
    assert details.error_info is not None and details.error_info.domain == "flashcrowd.dev"
    if case.field is not None:
        fields = [f for f, _ in details.field_violations]
        assert any(f.startswith(case.field) for f in fields), fields
    # Nothing was written for the tenant.
    assert not list(svc.store.list(f"packs/{tenant}/"))


async def test_cycle_through_another_pack_is_failed_precondition(svc) -> None:
    tenant = svc.new_tenant()
    base = await svc.create_pack(tenant, _good_spec(svc), pack_id="a")
    b = await svc.create_pack(tenant, exclude(_good_spec(svc), ref(base.name)), pack_id="b")
    await svc.stub.DeletePack(api.DeletePackRequest(name=base.name))
    # Re-creating "a" from "b", which was built from (the old) "a": a cycle a -> b -> a.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.CreatePack(_create(tenant, ref(b.name), pack_id="a"))
    details = error_details(caught.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "PACK_REFERENCE_CYCLE"
    assert "tenants/" in details.message and details.precondition_failure is not None
    assert not svc.app.packs.exists(tenant, "a")


async def test_overload_is_resource_exhausted_with_retry_info(local_world) -> None:
    import threading

    from tests.audience.service.conftest import start_service, stop_service

    store, url = local_world
    service = await start_service("local", store, url, max_concurrent_builds=1, max_queued_builds=1)
    release = threading.Event()
    try:
        tenant = service.new_tenant()
        blockers = [
            await service.app.operations.start(
                tenant, "Test", lambda ctx: release.wait(30) and pack_pb2.Pack(), api.BuildPackMetadata()
            )
            for _ in range(2)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.CreatePack(_create(tenant, _good_spec(service)))
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.retry_after_seconds and details.retry_after_seconds > 0
        assert not service.app.packs.exists(tenant, "bad")
        release.set()
        for op in blockers:
            await service.wait(op.name)
        op = await service.create(tenant, _good_spec(service))  # capacity is back
        assert not op.HasField("error")
    finally:
        release.set()
        await stop_service(service)
