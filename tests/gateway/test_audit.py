"""The audit log: which calls leave an entry, what it says, who may read which entries, the JSON log
line, and the writer's bounded queue (drops counted, flushed on shutdown)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from google.protobuf import timestamp_pb2

from services.gateway.audit import AuditEntry, AuditLog, list_entries
from services.gateway.keystore import SqliteKeyStore

from .conftest import ALL, BOOTSTRAP, gateway_settings, start_stack
from .test_auth import expect

BOOT = (("x-api-key", BOOTSTRAP),)
DELETE_PACK = "/flashcrowd.audience.v1.AudienceService/DeletePack"
CHECK = "/flashcrowd.audience.v1.AudienceService/CheckMembership"
EXPORT = "/flashcrowd.audience.v1.AudienceService/ExportPack"


async def entries(admin: gw_grpc.GatewayServiceStub, metadata, **fields) -> list[gw.AuditEntry]:  # type: ignore[no-untyped-def]
    found: list[gw.AuditEntry] = []
    token = ""
    while True:
        page = await admin.ListAuditEntries(
            gw.ListAuditEntriesRequest(page_token=token, **fields), metadata=metadata
        )
        found.extend(page.audit_entries)
        token = page.next_page_token
        if not token:
            return found


async def test_audited_calls_and_who_sees_them(fake_stack, caplog: pytest.LogCaptureFixture) -> None:
    stack, _ = fake_stack
    caplog.set_level(logging.INFO, logger="flashcrowd.audit")
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    alpha_admin = (
        await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["admin"]), metadata=BOOT
        )
    ).secret
    as_alpha = (("x-api-key", alpha_admin),)
    started = time.time()
    # Member-level calls by the platform on alpha's and beta's packs (unary and streaming).
    check = pb.CheckMembershipRequest(
        parent="tenants/alpha", packs=["tenants/alpha/packs/p1"], user_ids=[1, 2]
    )
    await stub.CheckMembership(check, metadata=(*stack.auth("platform"), ("x-request-id", "req-7")))
    beta_export = pb.ExportPackRequest(name="tenants/beta/packs/p9", format=pb.EXPORT_FORMAT_USER_ID)
    assert len([page async for page in stub.ExportPack(beta_export, metadata=stack.auth("platform"))]) == 3
    # A tenant trying a member-level call: refused, and audited as such.
    await expect(stub.CheckMembership(check, metadata=stack.auth("alpha")), grpc.StatusCode.PERMISSION_DENIED)
    # Reads are not audited; admin writes are (also the system admin's on alpha).
    await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("alpha"))
    made = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"]), metadata=as_alpha
    )
    await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=made.api_key.name), metadata=BOOT)
    await admin.CreateTenant(gw.CreateTenantRequest(tenant_id="gamma"), metadata=BOOT)
    # Unauthenticated attempts have no principal: not audited.
    await expect(
        admin.DeleteTenant(gw.DeleteTenantRequest(name="tenants/alpha")), grpc.StatusCode.UNAUTHENTICATED
    )

    alpha = await entries(admin, as_alpha, parent="tenants/alpha", start_time=_ts(started))
    summary = [(e.method.rsplit("/", 1)[-1], e.principal.kind, e.status_code) for e in alpha]
    assert summary == [  # newest first
        ("RevokeApiKey", "system", "OK"),
        ("CreateApiKey", "tenant", "OK"),
        ("CheckMembership", "tenant", "PERMISSION_DENIED"),
        ("CheckMembership", "platform", "OK"),
    ]
    platform_check = alpha[-1]
    assert platform_check.resources == ["tenants/alpha", "tenants/alpha/packs/p1"]
    assert platform_check.request_id == "req-7" and platform_check.client_address == "127.0.0.1"
    assert platform_check.transport == "grpc" and platform_check.name.startswith(
        "tenants/alpha/auditEntries/"
    )
    assert alpha[1].principal.tenant == "alpha" and alpha[1].principal.method == "api_key"
    # Alpha's admin sees none of beta's entries and cannot ask for them, nor for every tenant's.
    await expect(
        admin.ListAuditEntries(gw.ListAuditEntriesRequest(parent="tenants/beta"), metadata=as_alpha),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect(
        admin.ListAuditEntries(gw.ListAuditEntriesRequest(parent="tenants/-"), metadata=as_alpha),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect(
        admin.ListAuditEntries(
            gw.ListAuditEntriesRequest(parent="tenants/alpha"), metadata=stack.auth("alpha")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # The system admin sees everything, filtered by method, tenant and time, page by page.
    everything = await entries(admin, BOOT, parent="tenants/-", start_time=_ts(started), page_size=2)
    assert {e.tenant for e in everything} == {"alpha", "beta", "gamma"}
    exports = await entries(admin, BOOT, parent="tenants/-", method="ExportPack")
    assert [(e.tenant, e.method, e.resources[0]) for e in exports] == [("beta", EXPORT, beta_export.name)]
    assert [e.method for e in await entries(admin, BOOT, parent="tenants/gamma")] == [
        "/flashcrowd.gateway.v1.GatewayService/CreateTenant"
    ]
    assert await entries(admin, BOOT, parent="tenants/-", end_time=_ts(started)) == [
        e for e in await entries(admin, BOOT, parent="tenants/-") if e.time.ToNanoseconds() < started * 1e9
    ]
    for request, field in (
        (gw.ListAuditEntriesRequest(parent="tenants/-", method="NoSuchMethod"), "method"),
        (gw.ListAuditEntriesRequest(parent="tenants/-", page_size=-1), "page_size"),
        (gw.ListAuditEntriesRequest(parent="tenants/-", start_time=_ts(10), end_time=_ts(5)), "end_time"),
        (gw.ListAuditEntriesRequest(parent="everyone"), "parent"),
    ):
        details = await expect(
            admin.ListAuditEntries(request, metadata=BOOT), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details.bad_request.field_violations[0].field == field
    # Every entry was also logged as one structured line.
    logged = [record.audit for record in caplog.records if record.name == "flashcrowd.audit"]
    denied = [
        line for line in logged if line["method"] == CHECK and line["status_code"] == "PERMISSION_DENIED"
    ]
    assert len(denied) == 1 and denied[0]["tenant"] == "alpha" and denied[0]["principal_kind"] == "tenant"
    assert json.dumps(logged)  # JSON-serialisable as the JSON formatter writes it


async def test_rate_limited_calls_are_not_audited(tmp_path, rsa_public_pem, fake_backend) -> None:
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        rate_limits={"DeletePack": {"rate": 0.01, "burst": 2}},
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        codes = []
        for _ in range(6):
            try:
                await stub.DeletePack(
                    pb.DeletePackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("alpha")
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
        admin = gw_grpc.GatewayServiceStub(stack.channel)
        logged = await entries(admin, BOOT, parent="tenants/alpha", method=DELETE_PACK)
        assert len(logged) == 2  # the two calls that reached the backend (the fake has no DeletePack)
        assert {e.status_code for e in logged} == {"UNIMPLEMENTED"}
    finally:
        await stack.close()


async def test_the_queue_is_bounded_and_flushed_on_close(tmp_path) -> None:
    store = SqliteKeyStore(str(tmp_path / "audit.sqlite3"))
    log = AuditLog(store, queue_size=5, batch_size=2)
    try:
        for index in range(8):  # writer not started yet: 5 queued, 3 dropped
            log.record(_entry(index))
        assert log.dropped == 3
        log.start()
        await log.flush(timeout=5)
        assert log.written == 5 and len(list_entries(store, tenant="acme")) == 5
        log.record(_entry(9))
        await log.close()
        assert log.written == 6
        log.record(_entry(10))  # after close: dropped, counted
        assert log.dropped == 4
    finally:
        store.close()


async def test_a_failing_table_drops_the_batch_and_counts_it(tmp_path, monkeypatch) -> None:
    from services.gateway import audit

    monkeypatch.setattr(audit, "WRITE_ATTEMPTS", 2)
    store = SqliteKeyStore(str(tmp_path / "audit.sqlite3"))
    log = AuditLog(store, queue_size=10)
    log.start()
    try:
        with store.transaction() as cursor:
            cursor.execute("DROP TABLE gateway_audit_log")
        log.record(_entry(1))
        await asyncio.wait_for(log.flush(), 10)
        assert log.dropped == 1 and log.written == 0
    finally:
        await log.close()
        store.close()


def _entry(index: int) -> AuditEntry:
    return AuditEntry(
        time=1000.0 + index,
        tenant="acme",
        principal_kind="tenant",
        principal_tenant="acme",
        subject="k",
        auth_method="api_key",
        method=DELETE_PACK,
        resources=(f"tenants/acme/packs/p{index}",),
        status_code="OK",
        transport="grpc",
    )


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def test_log_lines_can_be_turned_off(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flashcrowd.audit")
    store = SqliteKeyStore(str(tmp_path / "audit.sqlite3"))
    log = AuditLog(store, log_lines=False)
    log.start()
    try:
        log.record(_entry(1))
        await log.flush(timeout=5)
        assert log.written == 1
        assert not [record for record in caplog.records if record.name == "flashcrowd.audit"]
    finally:
        await log.close()
        store.close()
