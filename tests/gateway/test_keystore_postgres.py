"""Two gateway replicas sharing one PostgreSQL key store: a key made on one works on the other,
a revocation or tenant deletion on one is refused by the other."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from services.gateway.keystore import PostgresKeyStore

from .conftest import BOOTSTRAP, gateway_settings, start_stack

pytestmark = pytest.mark.postgres
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BOOT = (("x-api-key", BOOTSTRAP),)
GET = pb.GetPackRequest(name="tenants/acme/packs/p1")


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True) as conn:
            name = f"gateway_test_{uuid.uuid4().hex[:12]}"
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as error:
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is unreachable: {error}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_store_operations(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url)
    again = PostgresKeyStore(pg_url)  # a second replica starting: schema creation is idempotent
    try:
        store.create_tenant("acme", "Acme")
        record, secret = store.create_key("acme", ["packs.read"])
        assert again.get_key(record.key_id) == record
        assert secret.startswith(f"fc_{record.key_id}_")
        store.delete_tenant("acme")
        assert again.get_key(record.key_id).revoke_time is not None  # type: ignore[union-attr]
        assert again.get_tenant("acme").delete_time is not None  # type: ignore[union-attr]
    finally:
        store.close()
        again.close()


async def test_replicas_share_keys(tmp_path, rsa_public_pem, fake_backend, pg_url: str) -> None:
    replicas = []
    for index in range(2):
        settings = gateway_settings(
            tmp_path / str(index), rsa_public_pem, audience_target=fake_backend.target, keystore_url=pg_url
        )
        (tmp_path / str(index)).mkdir()
        replicas.append(await start_stack(settings, {}))
    first, second = replicas
    try:
        admin = gw_grpc.GatewayServiceStub(first.channel)
        await admin.CreateTenant(gw.CreateTenantRequest(tenant_id="acme"), metadata=BOOT)
        created = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/acme", scopes=["packs.read"]), metadata=BOOT
        )
        key = (("x-api-key", created.secret),)
        for replica in replicas:
            assert (await pb_grpc.AudienceServiceStub(replica.channel).GetPack(GET, metadata=key)).size == 42
        await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=created.api_key.name), metadata=BOOT)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.AudienceServiceStub(second.channel).GetPack(GET, metadata=key)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A tenant deleted through the second replica is gone on the first too.
        other = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/acme", scopes=["packs.read"]), metadata=BOOT
        )
        await gw_grpc.GatewayServiceStub(second.channel).DeleteTenant(
            gw.DeleteTenantRequest(name="tenants/acme"), metadata=BOOT
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.AudienceServiceStub(first.channel).GetPack(
                GET, metadata=(("x-api-key", other.secret),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for replica in replicas:
            await replica.close()


async def test_replicas_write_one_audit_log(tmp_path, rsa_public_pem, fake_backend, pg_url: str) -> None:
    """Audited calls through either replica land in the same table; either replica lists all of them."""
    replicas = []
    for index in range(2):
        (tmp_path / str(index)).mkdir()
        settings = gateway_settings(
            tmp_path / str(index), rsa_public_pem, audience_target=fake_backend.target, keystore_url=pg_url
        )
        replicas.append(await start_stack(settings, {"acme": ["packs.read"]} if index == 0 else {}))
    try:
        check = pb.CheckMembershipRequest(
            parent="tenants/acme", packs=["tenants/acme/packs/p1"], user_ids=[1]
        )
        for replica in replicas:
            await pb_grpc.AudienceServiceStub(replica.channel).CheckMembership(
                check, metadata=replica.auth("platform")
            )
        for replica in replicas:  # each replica writes its own queue (ListAuditEntries flushes only its own)
            await replica.app.gateway.audit.flush()
        for replica in replicas:
            listed = await gw_grpc.GatewayServiceStub(replica.channel).ListAuditEntries(
                gw.ListAuditEntriesRequest(parent="tenants/acme", method="CheckMembership"), metadata=BOOT
            )
            assert len(listed.audit_entries) == 2
            assert {entry.principal.subject for entry in listed.audit_entries} == {
                replicas[0].keys["platform"].split("_")[1],
                replicas[1].keys["platform"].split("_")[1],
            }
    finally:
        for replica in replicas:
            await replica.close()
