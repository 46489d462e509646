"""google.longrunning.Operations.ListOperations on retarget: the tenant's launch operations."""

from __future__ import annotations

import grpc
import pytest
from google.longrunning import operations_pb2

from services.runtime import error_details
from tests.fixtures.channels import as_tenant

from .conftest import Rt


async def test_list_launch_operations_pages_filters_and_isolates(rt: Rt) -> None:
    tenant = rt.tenant()
    pack = await rt.audience.upload(tenant, rt.audience.users[:30])
    template = await rt.template(tenant)
    names = []
    for _ in range(3):
        campaign = await rt.campaign(tenant, pack.name, template.name)
        names.append(campaign.name)
    await rt.campaign(tenant, pack.name, template.name)  # a draft: no operation
    for name in names:
        await rt.launch(name)
    listed = await rt.ops.ListOperations(operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}"))
    expected = [f"{name}/operations/launch" for name in reversed(names)]  # newest first
    assert [op.name for op in listed.operations] == expected and not listed.next_page_token
    assert all(op.done for op in listed.operations)
    # Paging, one at a time, with the same filter.
    seen, token = [], ""
    while True:
        page = await rt.ops.ListOperations(
            operations_pb2.ListOperationsRequest(
                name=f"tenants/{tenant}/operations", page_size=1, page_token=token, filter="done=true"
            )
        )
        seen += [op.name for op in page.operations]
        token = page.next_page_token
        if not token:
            break
    assert seen == expected
    running = await rt.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}", filter="done=false")
    )
    assert not running.operations
    # Another tenant's operations are NOT_FOUND; bad input names its field.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rt.ops.ListOperations(
            operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}"), metadata=as_tenant(rt.tenant())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for request, field in (
        (operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}", filter="state=RUNNING"), "filter"),
        (operations_pb2.ListOperationsRequest(name="campaigns/x"), "name"),
        (operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}", page_token="nope"), "page_token"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rt.ops.ListOperations(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value).field_violations[0][0] == field
