"""A scriptable AudienceService backend for the gateway tests that need to see what the backend saw.

The real audience server (``services.audience.server``) is used for isolation, auth and HTTP tests;
this one records each call's deadline, metadata and count, and can fail on purpose (UNAVAILABLE a
number of times, or sleep), which the real service cannot be asked to do.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import grpc
import grpc.aio
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.audience.v1 import pack_pb2
from google.longrunning import operations_proto_pb2

from services.runtime import BaseServiceSettings, NotFound, Unavailable, create_server
from services.runtime.assertion import Caller, backend_interceptors, caller_of


@dataclass
class Seen:
    method: str
    tenant: str | None
    time_remaining: float | None
    metadata: dict[str, str]
    caller: Caller | None = None


@dataclass
class FakeAudience(pb_grpc.AudienceServiceServicer):
    """Packs are ``tenants/{t}/packs/{p}``; every pack exists for its own tenant, none for others."""

    calls: Counter[str] = field(default_factory=Counter)
    seen: list[Seen] = field(default_factory=list)
    #: Method -> how many more calls fail with UNAVAILABLE.
    fail_next: Counter[str] = field(default_factory=Counter)
    delay_seconds: float = 0.0

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> str:
        self.calls[method] += 1
        metadata = {item[0]: item[1] for item in context.invocation_metadata() or ()}
        caller = caller_of(context)  # verified by the backend's assertion interceptor
        tenant = caller.tenant if caller is not None else None
        self.seen.append(Seen(method, tenant, context.time_remaining(), metadata, caller))
        if self.fail_next[method] > 0:
            self.fail_next[method] -= 1
            raise Unavailable("flaky backend")
        return tenant or ""

    async def _pause(self) -> None:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)

    async def GetPack(self, request: pb.GetPackRequest, context: grpc.aio.ServicerContext) -> pack_pb2.Pack:
        tenant = self._record("GetPack", context)
        await self._pause()
        if not request.name.startswith(f"tenants/{tenant}/packs/"):
            raise NotFound("flashcrowd.dev/Pack", request.name)
        return pack_pb2.Pack(name=request.name, size=42, state=pack_pb2.Pack.STATE_READY)

    async def CheckMembership(
        self, request: pb.CheckMembershipRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckMembershipResponse:
        self._record("CheckMembership", context)
        await self._pause()
        return pb.CheckMembershipResponse(
            results=[
                pb.PackMembership(pack=pack, version=1, members=[uid % 2 == 0 for uid in request.user_ids])
                for pack in request.packs
            ]
        )

    async def CreatePack(
        self, request: pb.CreatePackRequest, context: grpc.aio.ServicerContext
    ) -> operations_proto_pb2.Operation:
        tenant = self._record("CreatePack", context)
        await self._pause()
        return operations_proto_pb2.Operation(name=f"tenants/{tenant}/operations/op1", done=False)

    async def ExportPack(self, request: pb.ExportPackRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self._record("ExportPack", context)
        for page in range(3):
            await asyncio.sleep(self.delay_seconds or 0)
            yield pb.ExportPackResponse(user_ids=[page * 10 + i for i in range(10)], exported=(page + 1) * 10)

    async def UploadPack(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.UploadPackResponse:  # type: ignore[no-untyped-def]
        self._record("UploadPack", context)
        rows = 0
        name = ""
        async for message in request_iterator:
            if message.HasField("header"):
                name = f"{message.header.parent}/packs/{message.header.pack_id}"
            else:
                rows += len(message.chunk.hashed_ids)
        return pb.UploadPackResponse(pack=pack_pb2.Pack(name=name), stats=pack_pb2.UploadStats(received=rows))


class FakeBackend:
    """The fake on a real port; ``stop``/``start`` kill and revive it on the same port."""

    def __init__(self) -> None:
        self.servicer = FakeAudience()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        settings = BaseServiceSettings(host="127.0.0.1", port=self.port, grace_seconds=0)
        self.server, self.port = await create_server(
            settings,
            service_names=["flashcrowd.audience.v1.AudienceService"],
            register=lambda s: pb_grpc.add_AudienceServiceServicer_to_server(self.servicer, s),
            interceptors=backend_interceptors(settings),
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None
