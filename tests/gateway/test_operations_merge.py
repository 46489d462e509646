"""The gateway's merged ListOperations: builds (audience) and launches (retarget) in one list, and a
backend that cannot answer is named in ``unreachable`` (AIP-217) instead of silently dropped."""

from __future__ import annotations

import grpc
import pytest
from flashcrowd.retarget.v1 import retarget_service_pb2 as rpb
from google.longrunning import operations_pb2 as ops
from google.longrunning import operations_pb2_grpc as ops_grpc

from .story import CLICKERS, Client


async def test_builds_and_launches_in_one_list(real_stack) -> None:  # type: ignore[no-untyped-def]
    gateway = real_stack.gateway
    alpha = Client(gateway.channel, "alpha", gateway.auth("alpha"))
    pack = await alpha.create_pack("merge-clickers", CLICKERS)
    template = await alpha.create_template("merge-template")
    campaign = await alpha.create_campaign("merge-campaign", pack.name, template.name)
    launch = await alpha.retarget.LaunchCampaign(
        rpb.LaunchCampaignRequest(name=campaign.name), metadata=alpha.metadata
    )
    await alpha.wait(launch)
    names: set[str] = set()
    token = ""
    while True:
        page = await alpha.operations.ListOperations(
            ops.ListOperationsRequest(name="tenants/alpha", page_token=token, page_size=50),
            metadata=alpha.metadata,
        )
        assert not page.unreachable
        names |= {op.name for op in page.operations}
        token = page.next_page_token
        if not token:
            break
    assert launch.name in names  # from retarget
    assert any(name.startswith("tenants/alpha/operations/") for name in names)  # from audience


async def test_an_unreachable_backend_is_named_not_dropped(fake_stack) -> None:  # type: ignore[no-untyped-def]
    stack, _ = fake_stack  # retarget is 127.0.0.1:1; the fake audience serves no Operations
    stub = ops_grpc.OperationsStub(stack.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOperations(
            ops.ListOperationsRequest(name="tenants/alpha"), metadata=stack.auth("alpha")
        )
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
    partial = await stub.ListOperations(
        ops.ListOperationsRequest(name="tenants/alpha", return_partial_success=True),
        metadata=stack.auth("alpha"),
    )
    assert sorted(partial.unreachable) == ["tenants/alpha/campaigns/-/operations", "tenants/alpha/operations"]
    assert not partial.operations
