from __future__ import annotations

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc

from services.runtime import error_details


async def test_get_pack_through_gateway(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    pack = await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("alpha"))
    assert pack.size == 42
    assert backend.servicer.seen[-1].tenant == "alpha"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("beta"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    print(error_details(caught.value))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
