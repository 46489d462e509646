"""The key store on SQLite and PostgreSQL: migration of a store made by the first gateway, key expiry
and listing, soft deletion with undelete, purge leases, the audit table."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from services.gateway.audit import AuditEntry, list_entries, write_entries
from services.gateway.keystore import (
    PLATFORM_OWNER,
    REVOKED_BY_CALL,
    REVOKED_BY_TENANT_DELETION,
    KeyStore,
    PostgresKeyStore,
    SqliteKeyStore,
)
from services.runtime import FailedPrecondition, NotFound

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

#: The schema of the first gateway release (before expiry, purge state and the audit log).
OLD_SQLITE = """
CREATE TABLE gateway_tenants (tenant_id TEXT PRIMARY KEY, display_name TEXT NOT NULL DEFAULT '',
    create_time REAL NOT NULL, delete_time REAL);
CREATE TABLE gateway_api_keys (key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES gateway_tenants(tenant_id), secret_sha256 BLOB NOT NULL,
    scopes TEXT NOT NULL, create_time REAL NOT NULL, revoke_time REAL);
INSERT INTO gateway_tenants VALUES ('_platform', 'platform principals', 0, NULL);
INSERT INTO gateway_tenants VALUES ('old', 'Old', 1.0, NULL);
INSERT INTO gateway_api_keys VALUES ('00000000000000aa', 'old', x'00', 'packs.read', 2.0, NULL);
"""
OLD_POSTGRES = (
    "CREATE TABLE gateway_tenants (tenant_id TEXT PRIMARY KEY, display_name TEXT NOT NULL DEFAULT '', "
    "create_time DOUBLE PRECISION NOT NULL, delete_time DOUBLE PRECISION)",
    "CREATE TABLE gateway_api_keys (key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES "
    "gateway_tenants(tenant_id), secret_sha256 BYTEA NOT NULL, scopes TEXT NOT NULL, "
    "create_time DOUBLE PRECISION NOT NULL, revoke_time DOUBLE PRECISION)",
    "INSERT INTO gateway_tenants VALUES ('_platform', 'platform principals', 0, NULL)",
    "INSERT INTO gateway_tenants VALUES ('old', 'Old', 1.0, NULL)",
    "INSERT INTO gateway_api_keys VALUES ('00000000000000aa', 'old', '\\x00', 'packs.read', 2.0, NULL)",
)


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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return request.param


def old_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> KeyStore:
    """A store created with the first release's schema and one key, opened by the current code."""
    if backend == "sqlite":
        path = tmp_path / "old.sqlite3"
        connection = sqlite3.connect(path)
        connection.executescript(OLD_SQLITE)
        connection.close()
        return SqliteKeyStore(str(path))
    url = request.getfixturevalue("pg_url")
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in OLD_POSTGRES:
            conn.execute(statement)
    return PostgresKeyStore(url)


@pytest.fixture
def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    opened = old_store(backend, tmp_path, request)
    yield opened
    opened.close()


def test_an_old_store_is_migrated(store: KeyStore, backend: str, tmp_path: Path, request) -> None:  # type: ignore[no-untyped-def]
    old = store.get_key("00000000000000aa")
    assert old is not None and old.expire_time is None and old.display_name == "" and old.revoke_reason == ""
    tenant = store.get_tenant("old")
    assert tenant is not None and tenant.purge_time is None and tenant.purge_attempts == 0
    # Opening it again (another replica starting) finds nothing left to migrate.
    again = (
        SqliteKeyStore(str(tmp_path / "old.sqlite3"))
        if backend == "sqlite"
        else PostgresKeyStore(request.getfixturevalue("pg_url"))
    )
    try:
        assert again.get_key("00000000000000aa") == old
        write_entries(again, [entry("old")])
        assert [e.tenant for e in list_entries(store, tenant="old")] == ["old"]
    finally:
        again.close()


def test_key_expiry_listing_and_ids(store: KeyStore) -> None:
    store.create_tenant("acme")
    soon = time.time() + 0.2
    first, _ = store.create_key("acme", ["packs.read"], expire_time=soon, display_name="ci")
    others = [store.create_key("acme", ["packs.write"])[0] for _ in range(3)]
    assert store.get_key(first.key_id) == first
    assert not first.expired(time.time()) and first.expired(soon + 0.01)
    page = store.list_keys("acme", after=None, limit=2)
    assert [k.key_id for k in page] == [first.key_id, others[0].key_id]
    rest = store.list_keys("acme", after=(page[-1].create_time, page[-1].key_id), limit=10)
    assert [k.key_id for k in rest] == [k.key_id for k in others[1:]]
    assert store.list_keys(PLATFORM_OWNER, after=None, limit=10) == []
    ids = {key_id for key_id, _ in store.key_ids()}
    assert {first.key_id, *(k.key_id for k in others), "00000000000000aa"} <= ids
    newest = max(k.create_time for k in others)
    assert {key_id for key_id, _ in store.key_ids(created_after=newest)} == set()


def test_delete_undelete_restores_only_the_keys_the_deletion_revoked(store: KeyStore) -> None:
    store.create_tenant("acme")
    kept, _ = store.create_key("acme", ["packs.read"])
    revoked, _ = store.create_key("acme", ["packs.read"])
    store.revoke_key("acme", revoked.key_id)
    store.delete_tenant("acme")
    assert store.get_key(kept.key_id).revoke_reason == REVOKED_BY_TENANT_DELETION  # type: ignore[union-attr]
    assert store.get_key(revoked.key_id).revoke_reason == REVOKED_BY_CALL  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        store.delete_tenant("acme")
    restored = store.undelete_tenant("acme", purge_after=3600)
    assert restored.delete_time is None
    assert store.get_key(kept.key_id).revoke_time is None  # type: ignore[union-attr]
    assert store.get_key(revoked.key_id).revoke_time is not None  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition) as caught:
        store.undelete_tenant("acme", purge_after=3600)
    assert caught.value.reason == "TENANT_NOT_DELETED"
    # A key revoked while its tenant is deleted stays revoked after the undelete.
    store.delete_tenant("acme")
    store.revoke_key("acme", kept.key_id)
    store.undelete_tenant("acme", purge_after=3600)
    assert store.get_key(kept.key_id).revoke_time is not None  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        store.undelete_tenant("ghost", purge_after=3600)


def test_purge_claims_are_exclusive_and_end_the_undelete_window(store: KeyStore) -> None:
    store.create_tenant("acme")
    store.create_tenant("live")
    with pytest.raises(FailedPrecondition):
        store.claim_purge("live", purge_after=0, lease_seconds=60, force=True)
    store.delete_tenant("acme")
    assert store.due_purges(purge_after=3600) == []
    assert store.due_purges(purge_after=0) == ["acme"]
    with pytest.raises(FailedPrecondition) as caught:
        store.claim_purge("acme", purge_after=3600, lease_seconds=60, force=False)
    assert caught.value.reason == "UNDELETE_WINDOW_OPEN"
    assert store.claim_purge("acme", purge_after=3600, lease_seconds=60, force=True)
    # Held: neither another runner nor the periodic query gets it, and it cannot be undeleted.
    with pytest.raises(FailedPrecondition) as caught:
        store.claim_purge("acme", purge_after=0, lease_seconds=60, force=True)
    assert caught.value.reason == "TENANT_PURGE_IN_PROGRESS"
    assert store.due_purges(purge_after=0) == []
    with pytest.raises(FailedPrecondition) as caught:
        store.undelete_tenant("acme", purge_after=3600)
    assert caught.value.reason == "UNDELETE_WINDOW_CLOSED"
    # A failed run releases the lease and keeps its error; the next run takes it again.
    store.fail_purge("acme", "retarget unavailable")
    assert store.get_tenant("acme").purge_error == "retarget unavailable"  # type: ignore[union-attr]
    assert store.due_purges(purge_after=0) == ["acme"]
    assert store.claim_purge("acme", purge_after=0, lease_seconds=60, force=False)
    done = store.finish_purge("acme")
    assert done.purge_time is not None and done.purge_error == "" and done.purge_attempts == 2
    assert store.claim_purge("acme", purge_after=0, lease_seconds=60, force=True) is False
    assert store.due_purges(purge_after=0) == []


def entry(
    tenant: str, method: str = "/flashcrowd.audience.v1.AudienceService/DeletePack", at: float = 0.0
) -> AuditEntry:
    return AuditEntry(
        time=at or time.time(),
        tenant=tenant,
        principal_kind="tenant",
        principal_tenant=tenant,
        subject="k1",
        auth_method="api_key",
        method=method,
        resources=(f"tenants/{tenant}/packs/p1",),
        status_code="OK",
        transport="grpc",
        client_address="192.0.2.1",
        request_id="r1",
    )


def test_audit_table(store: KeyStore) -> None:
    write_entries(
        store, [entry("acme", at=100.0), entry("beta", at=200.0), entry("acme", "/x.Y/Z", at=300.0)]
    )
    newest_first = list_entries(store, tenant=None)
    assert [(e.tenant, e.time) for e in newest_first] == [("acme", 300.0), ("beta", 200.0), ("acme", 100.0)]
    assert newest_first[0].resources == ("tenants/acme/packs/p1",) and newest_first[0].entry_id is not None
    assert [e.time for e in list_entries(store, tenant="acme")] == [300.0, 100.0]
    assert [e.time for e in list_entries(store, tenant="acme", method="/x.Y/Z")] == [300.0]
    assert [e.time for e in list_entries(store, tenant=None, start_time=150.0, end_time=300.0)] == [200.0]
    first = list_entries(store, tenant=None, limit=1)[0]
    assert [e.time for e in list_entries(store, tenant=None, before_id=first.entry_id)] == [200.0, 100.0]
