"""Client of the audience service: resolve a pack (GetPack) and stream its members (ExportPack).

Retarget calls as a platform service (``service:retarget``, asserted with the shared key): it
reads members to issue offers, which no tenant may do. Pack names are checked to belong to the
campaign's tenant before they get here (validation.pack_ref). Both calls are reads, so the channel
retries them on UNAVAILABLE; errors come back as the runtime's domain errors so they reach our own
callers with the right code (a missing pack is NOT_FOUND, an unreachable audience service is UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc
import grpc.aio
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, pack_pb2

from services.retarget import domain as d
from services.runtime import (
    BaseServiceSettings,
    FailedPrecondition,
    NotFound,
    ServiceError,
    Unavailable,
    make_channel,
)
from services.runtime.assertion import platform_interceptors
from services.runtime.scopes import MEMBERS_READ, PACKS_READ

SERVICE = "flashcrowd.audience.v1.AudienceService"


@dataclass(frozen=True)
class PackInfo:
    name: str
    version: int
    size: int


@dataclass(frozen=True)
class Page:
    """One page of members; ``token`` re-reads this page, ``next_token`` the one after ("" = last)."""

    token: str
    user_ids: list[int]
    next_token: str
    total: int


class AudienceError(Exception):
    """The audience service failed in a way a launch should retry (or give up on, with this reason)."""


def _translate(
    error: grpc.aio.AioRpcError, pack: str, field: str = "audience_pack"
) -> ServiceError | AudienceError:
    code = error.code()
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(d.PACK_TYPE, pack, metadata={"field": field})
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(d.PACK_NOT_READY, f"audience pack {pack}: {error.details()}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"audience service unavailable: {error.details()}", retry_after_seconds=1.0)
    return AudienceError(f"audience service answered {code.name}: {error.details()}")


class AudienceClient:
    """Owns one channel to the audience service; ``await close()`` when done."""

    def __init__(self, target: str, settings: BaseServiceSettings, *, timeout_seconds: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout_seconds
        self._channel = make_channel(
            target,
            settings,
            idempotent_methods=[f"{SERVICE}/GetPack", f"{SERVICE}/ExportPack"],
            interceptors=platform_interceptors(settings, "service:retarget", (PACKS_READ, MEMBERS_READ)),
        )
        self._stub = audience_service_pb2_grpc.AudienceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def get_pack(self, tenant: str, pack: str, *, field: str = "audience_pack") -> PackInfo:
        """The pack's current version and size; NOT_FOUND / FAILED_PRECONDITION (not ready)."""
        try:
            response = await self._stub.GetPack(
                audience_service_pb2.GetPackRequest(name=pack),
                timeout=self.timeout,
                wait_for_ready=False,
            )
        except grpc.aio.AioRpcError as error:
            raise _translate(error, pack, field) from None
        if response.state != pack_pb2.Pack.STATE_READY:
            state = pack_pb2.Pack.State.Name(response.state)
            raise FailedPrecondition(
                d.PACK_NOT_READY,
                f"audience pack {pack} is {state}",
                [("PACK_STATE", pack, f"pack is {state}, not READY")],
                metadata={"pack": pack},
            )
        return PackInfo(name=response.name or pack, version=response.version, size=response.size)

    async def export(
        self, tenant: str, pack: str, version: int, *, page_token: str = "", page_size: int = 20_000
    ) -> AsyncGenerator[Page, None]:
        """Stream the pinned version's user ids from ``page_token`` on, one page per message."""
        request = audience_service_pb2.ExportPackRequest(
            name=pack,
            format=audience_service_pb2.EXPORT_FORMAT_USER_ID,
            page_size=page_size,
            page_token=page_token,
            version=version,
        )
        call = self._stub.ExportPack(request)
        # Iterate the call (rather than call.read()): the OpenTelemetry interceptor ends the client
        # span when the iteration ends, so the stream is read to its end even after the last page.
        messages = call.__aiter__()
        token = page_token
        try:
            while True:
                try:
                    message = await asyncio.wait_for(anext(messages), self.timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise Unavailable(f"no ExportPack page within {self.timeout:.0f} s") from None
                if token or message.user_ids or message.next_page_token:
                    yield Page(
                        token=token,
                        user_ids=list(message.user_ids),
                        next_token=message.next_page_token,
                        total=message.total,
                    )
                token = message.next_page_token
        except grpc.aio.AioRpcError as error:
            raise _translate(error, pack) from None
        finally:
            if not call.done():
                call.cancel()
