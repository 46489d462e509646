"""Purging deleted tenants: their campaigns cancelled, live packs, packs (uploads included) and build
operations deleted, through the backends' own APIs.

DeleteTenant only soft-deletes (``keystore.py``): the tenant's keys and tokens stop working at once,
its data stays for the undelete window (``FLASHCROWD_TENANT_PURGE_AFTER_SECONDS``, 7 days). After
the window the purge removes what the backends hold for it. It runs

* periodically on every replica (``tenant_purge_interval_seconds``), for every tenant past its
  window (``KeyStore.due_purges``), and at once after a DeleteTenant with a window of 0;
* on demand: ``PurgeTenant`` (system admin) purges a deleted tenant now, ending its window.

It calls the backends as the platform principal ``gateway:purge`` (packs and campaigns scopes only)
through the gateway's own backend pools with a signed assertion, like any proxied call. Each call is
audited (transport ``internal``).

Invariants:

* **Exclusive**: a run holds a lease in the key store (``claim_purge``) so two replicas never purge
  the same tenant at once; a crashed run's lease expires (``tenant_purge_lease_seconds``) and the
  next run takes over. Within one replica, concurrent requests for one tenant share one run.
* **Idempotent and resumable**: every step lists what is left and removes it; NOT_FOUND counts as
  done. A run that fails halfway records the error (``purge_error``), releases the lease and is
  retried by the next periodic run (or PurgeTenant), which starts with what is left.
* **No undelete once started**: the first claim sets ``purge_start_time``; UndeleteTenant refuses
  from then on, so a tenant is never restored half purged.
* ``purge_time`` is set only after every step succeeded.

Order: campaigns first (CancelCampaign stops issuing and voids unredeemed coupons; campaigns
themselves and coupon templates have no delete RPC and stay, cancelled, in the ledger), then live
packs (stops their maintenance), then running builds (cancelled and awaited), then packs, then the
finished build operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from flashcrowd.audience.v1 import audience_service_pb2, live_pack_pb2
from flashcrowd.retarget.v1 import campaign_pb2, retarget_service_pb2
from google.longrunning import operations_proto_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from services.gateway import catalog
from services.gateway.audit import AuditEntry, request_resources, status_name
from services.gateway.keystore import TenantRecord
from services.runtime import ServiceError, Unavailable
from services.runtime.assertion import Caller
from services.runtime.scopes import CAMPAIGNS_READ, CAMPAIGNS_WRITE, PACKS_READ, PACKS_WRITE

if TYPE_CHECKING:
    from services.gateway.proxy import Gateway

logger = logging.getLogger(__name__)

#: The platform principal the purge asserts to backends.
PURGE_SUBJECT = "gateway:purge"
PURGE_SCOPES = frozenset({PACKS_READ, PACKS_WRITE, CAMPAIGNS_READ, CAMPAIGNS_WRITE})
PAGE_SIZE = 500
#: How long a cancelled build is waited for before its pack is deleted.
BUILD_CANCEL_WAIT_SECONDS = 10
_METHODS = {info.key: info for info in catalog.METHODS.values()}


class PurgeError(Unavailable):
    """A backend refused or failed a purge step; the run is retried later (UNAVAILABLE, reason
    PURGE_INCOMPLETE, to PurgeTenant callers)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="PURGE_INCOMPLETE", retry_after_seconds=60.0)


class TenantPurger:
    """The periodic purge task of one gateway and its on-demand entry point (``purge``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.caller = Caller.platform(PURGE_SUBJECT, PURGE_SCOPES)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._running: dict[str, asyncio.Task[TenantRecord]] = {}
        #: Purges completed by this replica (tests read it).
        self.completed = 0

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="tenant-purge")

    def wake(self) -> None:
        """Look for due purges now (after a DeleteTenant with a window of 0)."""
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        tasks = [task for task in (self._task, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.run_due()
            except Exception:  # the store may be down: try again at the next interval
                logger.exception("purge run failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.tenant_purge_interval_seconds)
            self._wake.clear()

    async def run_due(self) -> list[str]:
        """Purge every tenant past its window that no runner holds; the ids it tried."""
        due = await asyncio.to_thread(
            self.gateway.store.due_purges, purge_after=self.settings.tenant_purge_after_seconds
        )
        for tenant in due:
            try:
                await self.purge(tenant)
            except ServiceError as error:
                logger.warning("purge of tenant %s failed, retried later: %s", tenant, error)
        return due

    async def purge(self, tenant: str, *, force: bool = False) -> TenantRecord:
        """Purge ``tenant`` (deleted; past its window unless ``force``); its record afterwards."""
        running = self._running.get(tenant)
        if running is None:
            running = asyncio.get_running_loop().create_task(
                self._purge(tenant, force), name=f"purge-{tenant}"
            )
            self._running[tenant] = running
            running.add_done_callback(lambda _: self._running.pop(tenant, None))
        return await asyncio.shield(running)

    async def _purge(self, tenant: str, force: bool) -> TenantRecord:
        store = self.gateway.store
        claimed = await asyncio.to_thread(
            store.claim_purge,
            tenant,
            purge_after=self.settings.tenant_purge_after_seconds,
            lease_seconds=self.settings.tenant_purge_lease_seconds,
            force=force,
        )
        if claimed:
            logger.info("purging tenant %s", tenant, extra={"tenant": tenant})
            started = time.perf_counter()
            try:
                counts = {
                    "campaigns_cancelled": await self._cancel_campaigns(tenant),
                    "live_packs_deleted": await self._delete_live_packs(tenant),
                    "builds_cancelled": await self._cancel_builds(tenant),
                    "packs_deleted": await self._delete_packs(tenant),
                    "operations_deleted": await self._delete_operations(tenant),
                }
            except BaseException as error:
                text = _describe(error)
                await asyncio.shield(asyncio.to_thread(store.fail_purge, tenant, text))
                if isinstance(error, ServiceError):
                    raise PurgeError(f"purge of tenants/{tenant} stopped: {text}") from None
                raise
            record = await asyncio.to_thread(store.finish_purge, tenant)
            self.completed += 1
            logger.info(
                "tenant %s purged",
                tenant,
                extra={"tenant": tenant, "seconds": round(time.perf_counter() - started, 3), **counts},
            )
            return record
        found = await asyncio.to_thread(store.get_tenant, tenant)
        assert found is not None
        return found

    # --- steps ------------------------------------------------------------------------------------
    async def _cancel_campaigns(self, tenant: str) -> int:
        cancelled = 0
        token = ""
        while True:
            page = await self._call(
                tenant,
                "RetargetService/ListCampaigns",
                retarget_service_pb2.ListCampaignsRequest(
                    parent=f"tenants/{tenant}", page_size=PAGE_SIZE, page_token=token
                ),
            )
            assert isinstance(page, retarget_service_pb2.ListCampaignsResponse)
            for campaign in page.campaigns:
                if campaign.state != campaign_pb2.Campaign.STATE_CANCELLED:
                    request = retarget_service_pb2.CancelCampaignRequest(name=campaign.name)
                    await self._call(tenant, "RetargetService/CancelCampaign", request, missing_ok=True)
                    cancelled += 1
            token = page.next_page_token
            if not token:
                return cancelled

    async def _delete_live_packs(self, tenant: str) -> int:
        async def page() -> list[str]:
            response = await self._call(
                tenant,
                "LivePackService/ListLivePacks",
                live_pack_pb2.ListLivePacksRequest(parent=f"tenants/{tenant}", page_size=PAGE_SIZE),
            )
            assert isinstance(response, live_pack_pb2.ListLivePacksResponse)
            return [live.name for live in response.live_packs]

        def delete(name: str) -> Message:
            return live_pack_pb2.DeleteLivePackRequest(name=name)

        return await self._drain(tenant, page, "LivePackService/DeleteLivePack", delete)

    async def _operations(self, tenant: str, done: bool) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            response = await self._call(
                tenant,
                "Operations/ListOperations",
                operations_proto_pb2.ListOperationsRequest(
                    name=f"tenants/{tenant}",
                    filter=f"done={'true' if done else 'false'}",
                    page_size=PAGE_SIZE,
                    page_token=token,
                ),
                backend=catalog.AUDIENCE,
            )
            assert isinstance(response, operations_proto_pb2.ListOperationsResponse)
            names.extend(operation.name for operation in response.operations)
            token = response.next_page_token
            if not token:
                return names

    async def _cancel_builds(self, tenant: str) -> int:
        running = await self._operations(tenant, done=False)
        for name in running:
            request = operations_proto_pb2.CancelOperationRequest(name=name)
            await self._call(
                tenant, "Operations/CancelOperation", request, backend=catalog.AUDIENCE, missing_ok=True
            )
        for name in running:
            wait = operations_proto_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(seconds=BUILD_CANCEL_WAIT_SECONDS)
            )
            await self._call(
                tenant, "Operations/WaitOperation", wait, backend=catalog.AUDIENCE, missing_ok=True
            )
        return len(running)

    async def _delete_packs(self, tenant: str) -> int:
        async def page() -> list[str]:
            response = await self._call(
                tenant,
                "AudienceService/ListPacks",
                audience_service_pb2.ListPacksRequest(parent=f"tenants/{tenant}", page_size=PAGE_SIZE),
            )
            assert isinstance(response, audience_service_pb2.ListPacksResponse)
            return [pack.name for pack in response.packs]

        def delete(name: str) -> Message:
            return audience_service_pb2.DeletePackRequest(name=name)

        return await self._drain(tenant, page, "AudienceService/DeletePack", delete)

    async def _delete_operations(self, tenant: str) -> int:
        finished = await self._operations(tenant, done=True)
        for name in finished:
            request = operations_proto_pb2.DeleteOperationRequest(name=name)
            await self._call(
                tenant, "Operations/DeleteOperation", request, backend=catalog.AUDIENCE, missing_ok=True
            )
        return len(finished)

    async def _drain(
        self,
        tenant: str,
        page: Callable[[], Awaitable[list[str]]],
        method: str,
        delete: Callable[[str], Message],
    ) -> int:
        """Delete the first page until the listing is empty (deleting shifts later pages)."""
        deleted: set[str] = set()
        while names := await page():
            if set(names) <= deleted:
                raise PurgeError(f"{method}: {names[0]} is still listed after it was deleted")
            for name in names:
                if name not in deleted:
                    await self._call(tenant, method, delete(name), missing_ok=True)
                    deleted.add(name)
        return len(deleted)

    async def _call(
        self, tenant: str, method: str, request: Message, *, backend: str = "", missing_ok: bool = False
    ) -> Message | None:
        """One backend call as ``gateway:purge``; NOT_FOUND is None when ``missing_ok``."""
        from services.gateway.proxy import BackendError  # proxy imports this module

        info = _METHODS[method]
        code = 0
        try:
            raw = await self.gateway.forward_as(self.caller, info, request, backend)
            return info.response_class.FromString(raw)
        except BackendError as error:
            code = error.code.value[0]
            if missing_ok and error.code is grpc.StatusCode.NOT_FOUND:
                return None
            raise PurgeError(f"{info.key} {request_resources(info, request)}: {error}") from None
        except ServiceError as error:
            code = error.code.value[0]
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.value[0]
            raise
        finally:
            if info.audited:
                resources = request_resources(info, request)
                self.gateway.audit.record(
                    AuditEntry(
                        time=time.time(),
                        tenant=tenant,
                        principal_kind="platform",
                        principal_tenant="",
                        subject=PURGE_SUBJECT,
                        auth_method="internal",
                        method=info.full,
                        resources=resources,
                        status_code=status_name(code),
                        transport="internal",
                    )
                )


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "interrupted (gateway shutting down)"
    if isinstance(error, PurgeError):
        return str(error)[:1000]
    if isinstance(error, Unavailable):
        return f"backend unavailable: {error}"
    return f"{type(error).__name__}: {error}"[:1000]


__all__ = ["PURGE_SCOPES", "PURGE_SUBJECT", "PurgeError", "TenantPurger"]
