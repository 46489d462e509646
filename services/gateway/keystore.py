"""Tenants and hashed API keys: SQLite (embedded default, one replica) or PostgreSQL (shared by replicas).

Why a SQL store rather than a JSON document in the object store: key creation, revocation and tenant
deletion must be atomic and visible to the next call on every replica; SQL gives transactions and
row lookups, while a JSON document would need compare-and-swap on every admin write and a full
re-read on every cache miss. SQLite needs no server and suits one gateway replica (or a laptop);
with several replicas ``FLASHCROWD_KEYSTORE_URL=postgresql://...`` puts the same two tables in
PostgreSQL (the server the retarget ledger already uses), so a key created through one replica
works on all of them.

Only the SHA-256 of each key's secret is stored. Tenants are never really deleted: a tombstone keeps
the id from being created again, so a replayed key or token of a deleted tenant can never be bound to
a new tenant of the same name.

Methods are blocking (short queries); the gateway calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.runtime import AlreadyExists, InvalidArgument, NotFound
from services.runtime.tenant_ids import TENANT_ID_RULE, valid_tenant_id

TENANT_TYPE = "flashcrowd.dev/Tenant"
API_KEY_TYPE = "flashcrowd.dev/ApiKey"
#: Owner of platform principals' keys: not a valid tenant id, so never confused with a tenant.
PLATFORM_OWNER = "_platform"


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    display_name: str
    create_time: float
    delete_time: float | None


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    secret_sha256: bytes
    scopes: frozenset[str]
    create_time: float
    revoke_time: float | None


class _Cursor:
    """The little of a DB-API cursor the store uses, with ``?`` placeholders on both backends."""

    def __init__(self, connection: Any, paramstyle_format: bool) -> None:
        self._connection = connection
        self._format = paramstyle_format
        self.rowcount = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        cursor = self._connection.execute(sql.replace("?", "%s") if self._format else sql, params)
        self.rowcount = cursor.rowcount
        self._cursor = cursor
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()


class KeyStore(ABC):
    """The store's operations; backends provide a transaction and their schema."""

    integrity_errors: tuple[type[Exception], ...] = ()

    @abstractmethod
    def transaction(self) -> Any:  # a context manager yielding a _Cursor
        ...

    @abstractmethod
    def close(self) -> None: ...

    # --- tenants ---
    def create_tenant(self, tenant_id: str, display_name: str = "") -> TenantRecord:
        if not valid_tenant_id(tenant_id):
            raise InvalidArgument("tenant_id", f"must be {TENANT_ID_RULE}")
        now = time.time()
        try:
            with self.transaction() as cursor:
                cursor.execute(
                    "INSERT INTO gateway_tenants (tenant_id, display_name, create_time) VALUES (?, ?, ?)",
                    (tenant_id, display_name, now),
                )
        except self.integrity_errors:
            # Also for deleted tenants: their ids are never reused.
            raise AlreadyExists(TENANT_TYPE, f"tenants/{tenant_id}") from None
        return TenantRecord(tenant_id, display_name, now, None)

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self.transaction() as cursor:
            row = cursor.execute(
                "SELECT tenant_id, display_name, create_time, delete_time FROM gateway_tenants "
                "WHERE tenant_id = ?",
                (tenant_id,),
            ).fetchone()
        return TenantRecord(*row) if row else None

    def delete_tenant(self, tenant_id: str) -> None:
        """Tombstone the tenant and revoke all its keys, atomically."""
        now = time.time()
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_tenants SET delete_time = ? WHERE tenant_id = ? AND delete_time IS NULL",
                (now, tenant_id),
            )
            if cursor.rowcount == 0:
                raise NotFound(TENANT_TYPE, f"tenants/{tenant_id}")
            cursor.execute(
                "UPDATE gateway_api_keys SET revoke_time = ? WHERE tenant_id = ? AND revoke_time IS NULL",
                (now, tenant_id),
            )

    # --- keys ---
    def create_key(self, tenant_id: str, scopes: Iterable[str]) -> tuple[KeyRecord, str]:
        """A new key of a live tenant; returns the record and the full key string (shown once)."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(key_id, tenant_id, sha256(secret), frozenset(scopes), time.time(), None)
        with self.transaction() as cursor:
            live = (
                tenant_id == PLATFORM_OWNER
                or cursor.execute(
                    "SELECT 1 FROM gateway_tenants WHERE tenant_id = ? AND delete_time IS NULL", (tenant_id,)
                ).fetchone()
            )
            if not live:
                raise NotFound(TENANT_TYPE, f"tenants/{tenant_id}")
            cursor.execute(
                "INSERT INTO gateway_api_keys (key_id, tenant_id, secret_sha256, scopes, create_time) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    key_id,
                    tenant_id,
                    record.secret_sha256,
                    " ".join(sorted(record.scopes)),
                    record.create_time,
                ),
            )
        return record, f"fc_{key_id}_{secret}"

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.transaction() as cursor:
            row = cursor.execute(
                "SELECT key_id, tenant_id, secret_sha256, scopes, create_time, revoke_time "
                "FROM gateway_api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None:
            return None
        key_id, tenant, digest, scopes, created, revoked = row
        return KeyRecord(key_id, tenant, bytes(digest), frozenset(scopes.split()), created, revoked)

    def revoke_key(self, tenant_id: str, key_id: str) -> None:
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_api_keys SET revoke_time = ? "
                "WHERE key_id = ? AND tenant_id = ? AND revoke_time IS NULL",
                (time.time(), key_id, tenant_id),
            )
            if cursor.rowcount == 0:
                raise NotFound(API_KEY_TYPE, f"tenants/{tenant_id}/apiKeys/{key_id}")


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS gateway_tenants (
    tenant_id    TEXT PRIMARY KEY,
    display_name TEXT NOT NULL DEFAULT '',
    create_time  REAL NOT NULL,
    delete_time  REAL
);
CREATE TABLE IF NOT EXISTS gateway_api_keys (
    key_id        TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES gateway_tenants(tenant_id),
    secret_sha256 BLOB NOT NULL,
    scopes        TEXT NOT NULL,
    create_time   REAL NOT NULL,
    revoke_time   REAL
);
CREATE INDEX IF NOT EXISTS gateway_api_keys_tenant ON gateway_api_keys(tenant_id);
INSERT OR IGNORE INTO gateway_tenants (tenant_id, display_name, create_time)
    VALUES ('_platform', 'platform principals', 0);
"""


class SqliteKeyStore(KeyStore):
    """One SQLite file (WAL); calls are serialised by a lock, each in its own transaction."""

    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 5000")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(_SQLITE_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Cursor(self._db, paramstyle_format=False)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def dump(self) -> str:
        with self._lock:
            return "\n".join(self._db.iterdump())

    def close(self) -> None:
        with self._lock:
            self._db.close()


_POSTGRES_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS gateway_tenants (
        tenant_id    TEXT PRIMARY KEY,
        display_name TEXT NOT NULL DEFAULT '',
        create_time  DOUBLE PRECISION NOT NULL,
        delete_time  DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS gateway_api_keys (
        key_id        TEXT PRIMARY KEY,
        tenant_id     TEXT NOT NULL REFERENCES gateway_tenants(tenant_id),
        secret_sha256 BYTEA NOT NULL,
        scopes        TEXT NOT NULL,
        create_time   DOUBLE PRECISION NOT NULL,
        revoke_time   DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS gateway_api_keys_tenant ON gateway_api_keys(tenant_id)",
    # The owner row of platform principals' keys ("_platform" is not a valid tenant id).
    "INSERT INTO gateway_tenants (tenant_id, display_name, create_time) "
    "VALUES ('_platform', 'platform principals', 0) ON CONFLICT DO NOTHING",
)
_SCHEMA_LOCK = 0x6761_7465  # "gate": replicas starting together create the tables once


class PostgresKeyStore(KeyStore):
    """The same tables in PostgreSQL, through a small psycopg connection pool."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.integrity_errors = (psycopg.IntegrityError,)
        self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, open=True, timeout=10)
        with self._pool.connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _POSTGRES_SCHEMA:
                connection.execute(statement)

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._pool.connection() as connection, connection.transaction():
            yield _Cursor(connection, paramstyle_format=True)

    def close(self) -> None:
        self._pool.close()


def open_keystore(url: str, path: str) -> KeyStore:
    """``url`` (``postgresql://...`` or ``sqlite:///path``) if set, else the SQLite file ``path``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresKeyStore(url)
    if url.startswith("sqlite:///"):
        return SqliteKeyStore(url[len("sqlite:///") :] or ":memory:")
    if url:
        raise ValueError("keystore URL must start with postgresql:// or sqlite:///")
    return SqliteKeyStore(path)


__all__ = [
    "API_KEY_TYPE",
    "PLATFORM_OWNER",
    "TENANT_TYPE",
    "KeyRecord",
    "KeyStore",
    "PostgresKeyStore",
    "SqliteKeyStore",
    "TenantRecord",
    "open_keystore",
    "sha256",
    "valid_tenant_id",
]
