"""Tenant deletion end to end against the real audience and retarget servers: soft delete, undelete
within the window, the purge (immediate with a window of 0, on demand with PurgeTenant, resumed after
a failure halfway), checked on the backends directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as apb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as apb_grpc
from flashcrowd.audience.v1 import events_pb2, live_pack_pb2, live_pack_pb2_grpc, spec_pb2
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from flashcrowd.retarget.v1 import campaign_pb2
from flashcrowd.retarget.v1 import retarget_service_pb2 as rpb
from flashcrowd.retarget.v1 import retarget_service_pb2_grpc as rpb_grpc
from google.longrunning import operations_pb2 as ops
from google.longrunning import operations_pb2_grpc as ops_grpc
from google.protobuf import duration_pb2

from services.gateway.purge import PURGE_SUBJECT
from services.runtime import Unavailable
from tests.fixtures.channels import backend_channel

from .conftest import ALL, BOOTSTRAP, Stack, gateway_settings, start_stack
from .story import CLICKERS, Client
from .test_auth import expect

BOOT = (("x-api-key", BOOTSTRAP),)


async def _gateway(real_stack, tmp_path, rsa_public_pem, tenants: dict, **overrides) -> Stack:  # type: ignore[no-untyped-def]
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=real_stack.audience_target,
        retarget_target=real_stack.retarget_target,
        default_rate_limit={"rate": 10_000, "burst": 10_000},
        **overrides,
    )
    return await start_stack(settings, tenants)


async def populate(stack: Stack, tenant: str) -> None:
    """Two packs (one an upload-sized snapshot of a live pack), a live pack, a template, a launched
    campaign and a draft one: everything a purge must remove or stop."""
    client = Client(stack.channel, tenant, stack.auth(tenant))
    pack = await client.create_pack("clickers", CLICKERS)
    live = live_pack_pb2_grpc.LivePackServiceStub(stack.channel)
    spec = spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(
            event_types=[events_pb2.EVENT_TYPE_CLICK],
            window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=900)),
        )
    )
    await live.CreateLivePack(
        live_pack_pb2.CreateLivePackRequest(
            parent=client.parent, live_pack_id="warm", live_pack=live_pack_pb2.LivePack(spec=spec)
        ),
        metadata=client.metadata,
    )
    await live.SnapshotLivePack(
        live_pack_pb2.SnapshotLivePackRequest(
            name=f"{client.parent}/livePacks/warm", pack_id="warm-snapshot"
        ),
        metadata=client.metadata,
    )
    template = await client.create_template("ten-off")
    running = await client.create_campaign("win-back", pack.name, template.name)
    launch = await client.retarget.LaunchCampaign(
        rpb.LaunchCampaignRequest(name=running.name), metadata=client.metadata
    )
    await client.wait(launch)
    await client.create_campaign("draft", pack.name, template.name)


async def backend_state(stack_or_targets, tenant: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What the backends hold for ``tenant``, asked directly as a platform principal."""
    audience_target, retarget_target = stack_or_targets
    parent = f"tenants/{tenant}"
    async with backend_channel(audience_target) as audience, backend_channel(retarget_target) as retarget:
        packs = await apb_grpc.AudienceServiceStub(audience).ListPacks(apb.ListPacksRequest(parent=parent))
        lives = await live_pack_pb2_grpc.LivePackServiceStub(audience).ListLivePacks(
            live_pack_pb2.ListLivePacksRequest(parent=parent)
        )
        operations = await ops_grpc.OperationsStub(audience).ListOperations(
            ops.ListOperationsRequest(name=parent)
        )
        campaigns = await rpb_grpc.RetargetServiceStub(retarget).ListCampaigns(
            rpb.ListCampaignsRequest(parent=parent)
        )
    return {
        "packs": sorted(pack.name.rsplit("/", 1)[-1] for pack in packs.packs),
        "live_packs": [live.name.rsplit("/", 1)[-1] for live in lives.live_packs],
        "operations": len(operations.operations),
        "campaigns": sorted(
            (c.name.rsplit("/", 1)[-1], campaign_pb2.Campaign.State.Name(c.state))
            for c in campaigns.campaigns
        ),
    }


async def wait_purged(admin: gw_grpc.GatewayServiceStub, name: str, seconds: float = 60) -> gw.Tenant:
    for _ in range(int(seconds * 10)):
        tenant = await admin.GetTenant(gw.GetTenantRequest(name=name), metadata=BOOT)
        if tenant.state == gw.Tenant.STATE_PURGED:
            return tenant
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not purged: {tenant}")


@pytest.fixture
async def immediate(real_stack, tmp_path, rsa_public_pem) -> AsyncIterator[Stack]:  # type: ignore[no-untyped-def]
    stack = await _gateway(
        real_stack, tmp_path, rsa_public_pem, {"doomed": ALL}, tenant_purge_after_seconds=0
    )
    yield stack
    await stack.close()


async def test_delete_with_no_window_purges_at_once(real_stack, immediate: Stack) -> None:
    targets = (real_stack.audience_target, real_stack.retarget_target)
    await populate(immediate, "doomed")
    before = await backend_state(targets, "doomed")
    assert before["packs"] == ["clickers", "warm-snapshot"] and before["live_packs"] == ["warm"]
    assert before["campaigns"][0] == ("draft", "STATE_DRAFT")
    assert before["campaigns"][1] in (("win-back", "STATE_RUNNING"), ("win-back", "STATE_COMPLETED"))
    assert before["operations"] >= 1
    admin = gw_grpc.GatewayServiceStub(immediate.channel)
    await admin.DeleteTenant(gw.DeleteTenantRequest(name="tenants/doomed"), metadata=BOOT)
    # The tenant's key is dead at once; the purge runs in the background and finishes.
    await expect(
        apb_grpc.AudienceServiceStub(immediate.channel).ListPacks(
            apb.ListPacksRequest(parent="tenants/doomed"), metadata=immediate.auth("doomed")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    tenant = await wait_purged(admin, "tenants/doomed")
    assert tenant.HasField("delete_time") and tenant.HasField("purge_time")
    assert tenant.expire_time == tenant.delete_time  # a window of 0
    after = await backend_state(targets, "doomed")
    assert after == {
        "packs": [],
        "live_packs": [],
        "operations": 0,
        "campaigns": [("draft", "STATE_CANCELLED"), ("win-back", "STATE_CANCELLED")],
    }
    # The purge's backend calls are in the audit log as the platform principal gateway:purge.
    listed = await admin.ListAuditEntries(gw.ListAuditEntriesRequest(parent="tenants/doomed"), metadata=BOOT)
    purge_calls = [e for e in listed.audit_entries if e.principal.subject == PURGE_SUBJECT]
    methods = {e.method.rsplit("/", 1)[-1] for e in purge_calls}
    assert {"DeletePack", "DeleteLivePack", "CancelCampaign", "DeleteOperation"} <= methods
    assert all(e.transport == "internal" and e.status_code == "OK" for e in purge_calls)
    assert any(
        e.method.endswith("/DeleteTenant") and e.principal.kind == "system" for e in listed.audit_entries
    )
    # Purged: no undelete, and a second purge is a no-op.
    await expect(
        admin.UndeleteTenant(gw.UndeleteTenantRequest(name="tenants/doomed"), metadata=BOOT),
        grpc.StatusCode.FAILED_PRECONDITION,
        "UNDELETE_WINDOW_CLOSED",
    )
    again = await admin.PurgeTenant(gw.PurgeTenantRequest(name="tenants/doomed"), metadata=BOOT)
    assert again.purge_time == tenant.purge_time


async def test_undelete_within_the_window_then_purge_on_demand_resumes(
    real_stack, tmp_path, rsa_public_pem, monkeypatch
) -> None:
    stack = await _gateway(real_stack, tmp_path, rsa_public_pem, {"paused": ALL})
    targets = (real_stack.audience_target, real_stack.retarget_target)
    try:
        admin = gw_grpc.GatewayServiceStub(stack.channel)
        name = "tenants/paused"
        await populate(stack, "paused")
        revoked = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent=name, scopes=["packs.read"]), metadata=BOOT
        )
        await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=revoked.api_key.name), metadata=BOOT)
        tenant_admin = (
            await admin.CreateApiKey(gw.CreateApiKeyRequest(parent=name, scopes=["admin"]), metadata=BOOT)
        ).secret
        await expect(
            admin.PurgeTenant(gw.PurgeTenantRequest(name=name), metadata=BOOT),
            grpc.StatusCode.FAILED_PRECONDITION,
            "TENANT_NOT_DELETED",
        )
        await admin.DeleteTenant(gw.DeleteTenantRequest(name=name), metadata=BOOT)
        deleted = await admin.GetTenant(gw.GetTenantRequest(name=name), metadata=BOOT)
        assert deleted.state == gw.Tenant.STATE_DELETED
        assert deleted.expire_time.seconds - deleted.delete_time.seconds == 7 * 86_400
        assert (await stack.app.gateway.purger.run_due()) == []  # not due for a week
        # Undelete: the data never left, the keys the deletion revoked work again, the revoked one not.
        restored = await admin.UndeleteTenant(gw.UndeleteTenantRequest(name=name), metadata=BOOT)
        assert restored.state == gw.Tenant.STATE_ACTIVE and not restored.HasField("delete_time")
        packs = await apb_grpc.AudienceServiceStub(stack.channel).ListPacks(
            apb.ListPacksRequest(parent=name), metadata=stack.auth("paused")
        )
        assert len(packs.packs) == 2
        await expect(
            apb_grpc.AudienceServiceStub(stack.channel).ListPacks(
                apb.ListPacksRequest(parent=name), metadata=(("x-api-key", revoked.secret),)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_REVOKED",
        )
        own = await admin.GetTenant(gw.GetTenantRequest(name=name), metadata=(("x-api-key", tenant_admin),))
        assert own.state == gw.Tenant.STATE_ACTIVE
        await expect(
            admin.UndeleteTenant(
                gw.UndeleteTenantRequest(name=name), metadata=(("x-api-key", tenant_admin),)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )

        # Delete again and purge on demand, with the backend failing halfway through the first run.
        await admin.DeleteTenant(gw.DeleteTenantRequest(name=name), metadata=BOOT)
        gateway = stack.app.gateway
        real_forward = gateway.forward_as
        failures = {"DeleteLivePack": 1}

        async def flaky(caller, info, request, backend=""):  # type: ignore[no-untyped-def]
            if failures.get(info.name):
                failures[info.name] -= 1
                raise Unavailable("audience restarting")
            return await real_forward(caller, info, request, backend)

        monkeypatch.setattr(gateway, "forward_as", flaky)
        await expect(
            admin.PurgeTenant(gw.PurgeTenantRequest(name=name), metadata=BOOT),
            grpc.StatusCode.UNAVAILABLE,
            "PURGE_INCOMPLETE",
        )
        halfway = await backend_state(targets, "paused")
        assert halfway["campaigns"] == [("draft", "STATE_CANCELLED"), ("win-back", "STATE_CANCELLED")]
        assert halfway["live_packs"] == ["warm"] and len(halfway["packs"]) == 2
        record = await asyncio.to_thread(gateway.store.get_tenant, "paused")
        assert (
            record is not None and "audience restarting" in record.purge_error and record.purge_time is None
        )
        # The purge started, so the tenant can no longer come back half purged.
        await expect(
            admin.UndeleteTenant(gw.UndeleteTenantRequest(name=name), metadata=BOOT),
            grpc.StatusCode.FAILED_PRECONDITION,
            "UNDELETE_WINDOW_CLOSED",
        )
        done = await admin.PurgeTenant(gw.PurgeTenantRequest(name=name), metadata=BOOT)
        assert done.state == gw.Tenant.STATE_PURGED
        after = await backend_state(targets, "paused")
        assert after["packs"] == [] and after["live_packs"] == [] and after["operations"] == 0
        record = await asyncio.to_thread(gateway.store.get_tenant, "paused")
        assert record is not None and record.purge_attempts == 2 and record.purge_error == ""
    finally:
        await stack.close()


async def test_the_periodic_run_purges_tenants_past_their_window(
    real_stack, tmp_path, rsa_public_pem
) -> None:
    stack = await _gateway(
        real_stack,
        tmp_path,
        rsa_public_pem,
        {"expired": ALL},
        tenant_purge_after_seconds=0.5,
        tenant_purge_interval_seconds=0.2,
    )
    try:
        client = Client(stack.channel, "expired", stack.auth("expired"))
        await client.create_pack("clickers", CLICKERS)
        admin = gw_grpc.GatewayServiceStub(stack.channel)
        await admin.DeleteTenant(gw.DeleteTenantRequest(name="tenants/expired"), metadata=BOOT)
        await wait_purged(admin, "tenants/expired", seconds=30)
        state = await backend_state((real_stack.audience_target, real_stack.retarget_target), "expired")
        assert state["packs"] == []
    finally:
        await stack.close()
