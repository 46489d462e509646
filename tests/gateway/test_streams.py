"""Streaming methods through the gateway: each message checked, bytes forwarded, errors relayed."""

from __future__ import annotations

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc


def header(parent: str, pack_id: str = "u1") -> pb.UploadPackRequest:
    return pb.UploadPackRequest(
        header=pb.UploadPackHeader(
            parent=parent, pack_id=pack_id, id_type=pb.ID_TYPE_PHONE, hash_type=pb.HASH_TYPE_SHA256
        )
    )


CHUNK = pb.UploadPackRequest(chunk=pb.UploadPackChunk(hashed_ids=["ab" * 32, "cd" * 32]))


async def test_client_stream_forwarded(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    reply = await stub.UploadPack(iter([header("tenants/alpha"), CHUNK, CHUNK]), metadata=stack.auth("alpha"))
    assert reply.pack.name == "tenants/alpha/packs/u1" and reply.stats.received == 4
    assert backend.servicer.seen[-1].tenant == "alpha"


@pytest.mark.parametrize("position", [0, 2])
async def test_foreign_resource_mid_stream_is_not_found(fake_stack, position: int) -> None:
    stack, _ = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    messages = [header("tenants/alpha"), CHUNK, CHUNK]
    messages[position] = header("tenants/beta", "stolen")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UploadPack(iter(messages), metadata=stack.auth("alpha"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_malformed_stream_message(fake_stack) -> None:
    stack, _ = fake_stack
    upload = stack.channel.stream_unary("/flashcrowd.audience.v1.AudienceService/UploadPack")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(
            iter([header("tenants/alpha").SerializeToString(), b"\xff\xff\xff"]), metadata=stack.auth("alpha")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_server_stream_forwarded(fake_stack) -> None:
    stack, _ = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    pages = [
        page
        async for page in stub.ExportPack(
            pb.ExportPackRequest(name="tenants/alpha/packs/p1", format=pb.EXPORT_FORMAT_USER_ID),
            metadata=stack.auth("platform"),
        )
    ]
    assert [page.exported for page in pages] == [10, 20, 30]
    assert not stack.app.gateway.streams._open  # every slot released
