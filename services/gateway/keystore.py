"""Tenants, hashed API keys and the audit log: SQLite (embedded default, one replica) or PostgreSQL
(shared by replicas).

Why a SQL store rather than a JSON document in the object store: key creation, revocation and tenant
deletion must be atomic and visible to the next call on every replica; SQL gives transactions and
row lookups, while a JSON document would need compare-and-swap on every admin write and a full
re-read on every cache miss. SQLite needs no server and suits one gateway replica (or a laptop);
with several replicas ``FLASHCROWD_KEYSTORE_URL=postgresql://...`` puts the same tables in
PostgreSQL (the server the retarget ledger already uses), so a key created through one replica
works on all of them and every replica appends to the same audit log (``audit.py``).

Invariants:

* Only the SHA-256 of each key's secret is stored; rows are never deleted (revocation and expiry
  are times), so a key id, once seen, exists for good (``key_directory.py`` relies on it).
* Tenants are never really deleted: ``delete_time`` soft-deletes (keys revoked with reason
  ``TENANT_DELETED``), ``purge_time`` records that ``purge.py`` removed the tenant's data, and the
  tombstone keeps the id from being created again, so a replayed key or token of a deleted tenant
  can never be bound to a new tenant of the same name.
* Undeleting is possible only before a purge started (``purge_start_time``); it un-revokes exactly
  the keys the deletion revoked, never a key revoked by RevokeApiKey or one that expired.
* Schema changes are additive: a store created by an older gateway gets the new columns at open
  (``ALTER TABLE ... ADD COLUMN`` when missing), on SQLite and PostgreSQL alike.

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

from services.runtime import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.runtime.tenant_ids import TENANT_ID_RULE, valid_tenant_id

TENANT_TYPE = "flashcrowd.dev/Tenant"
API_KEY_TYPE = "flashcrowd.dev/ApiKey"
#: Owner of platform principals' keys: not a valid tenant id, so never confused with a tenant.
PLATFORM_OWNER = "_platform"
#: ``revoke_reason`` of keys revoked by RevokeApiKey (never un-revoked).
REVOKED_BY_CALL = "REVOKED"
#: ``revoke_reason`` of keys revoked because their tenant was deleted (UndeleteTenant restores them).
REVOKED_BY_TENANT_DELETION = "TENANT_DELETED"


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    display_name: str
    create_time: float
    delete_time: float | None
    #: When the first purge attempt started (undelete is refused from then on).
    purge_start_time: float | None = None
    #: When the purge finished.
    purge_time: float | None = None
    #: The last failed purge attempt's error ("" when none failed or the purge finished).
    purge_error: str = ""
    purge_attempts: int = 0


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str
    secret_sha256: bytes
    scopes: frozenset[str]
    create_time: float
    revoke_time: float | None
    expire_time: float | None = None
    display_name: str = ""
    revoke_reason: str = ""

    def expired(self, now: float) -> bool:
        return self.expire_time is not None and self.expire_time <= now


_TENANT_COLUMNS = (
    "tenant_id, display_name, create_time, delete_time, purge_start_time, purge_time, purge_error, "
    "purge_attempts"
)
_KEY_COLUMNS = (
    "key_id, tenant_id, secret_sha256, scopes, create_time, revoke_time, expire_time, display_name, "
    "revoke_reason"
)


def _key_record(row: Sequence[Any]) -> KeyRecord:
    key_id, tenant, digest, scopes, created, revoked, expires, display_name, reason = row
    return KeyRecord(
        key_id,
        tenant,
        bytes(digest),
        frozenset(scopes.split()),
        created,
        revoked,
        expires,
        display_name,
        reason,
    )


class _Cursor:
    """The little of a DB-API cursor the store uses, with ``?`` placeholders on both backends."""

    def __init__(self, connection: Any, paramstyle_format: bool) -> None:
        self._connection = connection
        self._format = paramstyle_format
        self.rowcount = 0

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._format else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        cursor = self._connection.execute(self._sql(sql), params)
        self.rowcount = cursor.rowcount
        self._cursor = cursor
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._format:
            with self._connection.cursor() as cursor:
                cursor.executemany(self._sql(sql), rows)
        else:
            self._connection.executemany(sql, rows)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())


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
            return self._tenant(cursor, tenant_id)

    @staticmethod
    def _tenant(cursor: _Cursor, tenant_id: str) -> TenantRecord | None:
        row = cursor.execute(
            f"SELECT {_TENANT_COLUMNS} FROM gateway_tenants WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return TenantRecord(*row) if row else None

    def delete_tenant(self, tenant_id: str) -> TenantRecord:
        """Soft-delete the tenant and revoke its live keys (reason TENANT_DELETED), atomically."""
        now = time.time()
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_tenants SET delete_time = ? WHERE tenant_id = ? AND delete_time IS NULL",
                (now, tenant_id),
            )
            if cursor.rowcount == 0 or tenant_id == PLATFORM_OWNER:
                raise NotFound(TENANT_TYPE, f"tenants/{tenant_id}")
            cursor.execute(
                "UPDATE gateway_api_keys SET revoke_time = ?, revoke_reason = ? "
                "WHERE tenant_id = ? AND revoke_time IS NULL",
                (now, REVOKED_BY_TENANT_DELETION, tenant_id),
            )
            record = self._tenant(cursor, tenant_id)
        assert record is not None
        return record

    def undelete_tenant(self, tenant_id: str, *, purge_after: float) -> TenantRecord:
        """Restore a deleted tenant whose purge has not started and whose window is still open.

        The keys its deletion revoked work again (unless they expired meanwhile); keys revoked by
        RevokeApiKey stay revoked. FAILED_PRECONDITION when the tenant is live, being purged or
        past its window; NOT_FOUND when it never existed.
        """
        now = time.time()
        name = f"tenants/{tenant_id}"
        with self.transaction() as cursor:
            record = self._tenant(cursor, tenant_id) if tenant_id != PLATFORM_OWNER else None
            if record is None:
                raise NotFound(TENANT_TYPE, name)
            if record.delete_time is None:
                raise FailedPrecondition(
                    "TENANT_NOT_DELETED", f"{name} is not deleted", [("TENANT_NOT_DELETED", name, "active")]
                )
            if record.purge_start_time is not None or now >= record.delete_time + purge_after:
                raise FailedPrecondition(
                    "UNDELETE_WINDOW_CLOSED",
                    f"{name} can no longer be undeleted: its purge has started or its window has passed",
                    [("UNDELETE_WINDOW_CLOSED", name, "purge started or window passed")],
                )
            cursor.execute(
                "UPDATE gateway_tenants SET delete_time = NULL, purge_attempts = 0, purge_error = '' "
                "WHERE tenant_id = ? AND delete_time IS NOT NULL AND purge_start_time IS NULL",
                (tenant_id,),
            )
            cursor.execute(
                "UPDATE gateway_api_keys SET revoke_time = NULL, revoke_reason = '' "
                "WHERE tenant_id = ? AND revoke_reason = ?",
                (tenant_id, REVOKED_BY_TENANT_DELETION),
            )
            restored = self._tenant(cursor, tenant_id)
        assert restored is not None
        return restored

    # --- purge bookkeeping (purge.py) ---
    def due_purges(self, *, purge_after: float, now: float | None = None) -> list[str]:
        """Deleted, unpurged tenants past their window whose purge no runner holds, oldest first."""
        now = time.time() if now is None else now
        with self.transaction() as cursor:
            rows = cursor.execute(
                "SELECT tenant_id FROM gateway_tenants WHERE delete_time IS NOT NULL AND purge_time IS NULL "
                "AND delete_time + ? <= ? AND (purge_lease_time IS NULL OR purge_lease_time < ?) "
                "ORDER BY delete_time",
                (purge_after, now, now),
            ).fetchall()
        return [row[0] for row in rows]

    def claim_purge(self, tenant_id: str, *, purge_after: float, lease_seconds: float, force: bool) -> bool:
        """Take the purge of a deleted tenant for ``lease_seconds``; False when it is done already.

        ``force`` (PurgeTenant) ignores the undelete window. NOT_FOUND for an unknown tenant;
        FAILED_PRECONDITION for a live one, one still in its window (without ``force``) and while
        another runner holds the lease (``TENANT_PURGE_IN_PROGRESS``).
        """
        now = time.time()
        name = f"tenants/{tenant_id}"
        with self.transaction() as cursor:
            record = self._tenant(cursor, tenant_id) if tenant_id != PLATFORM_OWNER else None
            if record is None:
                raise NotFound(TENANT_TYPE, name)
            if record.delete_time is None:
                raise FailedPrecondition(
                    "TENANT_NOT_DELETED",
                    f"{name} is not deleted: delete it first",
                    [("TENANT_NOT_DELETED", name, "active")],
                )
            if record.purge_time is not None:
                return False
            cursor.execute(
                "UPDATE gateway_tenants SET purge_start_time = COALESCE(purge_start_time, ?), "
                "purge_lease_time = ?, purge_attempts = purge_attempts + 1 "
                "WHERE tenant_id = ? AND purge_time IS NULL "
                "AND (purge_lease_time IS NULL OR purge_lease_time < ?) "
                "AND (? OR delete_time + ? <= ?)",
                (now, now + lease_seconds, tenant_id, now, bool(force), purge_after, now),
            )
            if cursor.rowcount == 1:
                return True
        if now < record.delete_time + purge_after and not force:
            raise FailedPrecondition(
                "UNDELETE_WINDOW_OPEN",
                f"{name} may still be undeleted; its purge is due later",
                [("UNDELETE_WINDOW_OPEN", name, "purge not due")],
            )
        raise FailedPrecondition(
            "TENANT_PURGE_IN_PROGRESS",
            f"{name} is being purged by another gateway replica; retry later",
            [("TENANT_PURGE_IN_PROGRESS", name, "lease held")],
        )

    def finish_purge(self, tenant_id: str) -> TenantRecord:
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_tenants SET purge_time = ?, purge_lease_time = NULL, purge_error = '' "
                "WHERE tenant_id = ?",
                (time.time(), tenant_id),
            )
            record = self._tenant(cursor, tenant_id)
        assert record is not None
        return record

    def fail_purge(self, tenant_id: str, error: str) -> None:
        """Release the lease and keep the error: the next run retries from where this one stopped."""
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_tenants SET purge_lease_time = NULL, purge_error = ? WHERE tenant_id = ?",
                (error[:1000], tenant_id),
            )

    # --- keys ---
    def create_key(
        self,
        tenant_id: str,
        scopes: Iterable[str],
        *,
        expire_time: float | None = None,
        display_name: str = "",
    ) -> tuple[KeyRecord, str]:
        """A new key of a live tenant; returns the record and the full key string (shown once)."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            key_id,
            tenant_id,
            sha256(secret),
            frozenset(scopes),
            time.time(),
            None,
            expire_time,
            display_name,
        )
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
                "INSERT INTO gateway_api_keys (key_id, tenant_id, secret_sha256, scopes, create_time, "
                "expire_time, display_name) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    tenant_id,
                    record.secret_sha256,
                    " ".join(sorted(record.scopes)),
                    record.create_time,
                    expire_time,
                    display_name,
                ),
            )
        return record, f"fc_{key_id}_{secret}"

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.transaction() as cursor:
            row = cursor.execute(
                f"SELECT {_KEY_COLUMNS} FROM gateway_api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return _key_record(row) if row is not None else None

    def list_keys(self, owner: str, *, after: tuple[float, str] | None, limit: int) -> list[KeyRecord]:
        """Keys of ``owner`` (a tenant id or PLATFORM_OWNER), oldest first, after ``(create_time, id)``."""
        sql = f"SELECT {_KEY_COLUMNS} FROM gateway_api_keys WHERE tenant_id = ?"
        params: list[Any] = [owner]
        if after is not None:
            sql += " AND (create_time > ? OR (create_time = ? AND key_id > ?))"
            params += [after[0], after[0], after[1]]
        sql += " ORDER BY create_time, key_id LIMIT ?"
        params.append(limit)
        with self.transaction() as cursor:
            rows = cursor.execute(sql, params).fetchall()
        return [_key_record(row) for row in rows]

    def key_ids(self, *, created_after: float | None = None) -> list[tuple[str, float]]:
        """``(key_id, create_time)`` of every key, or of those created after ``created_after``."""
        with self.transaction() as cursor:
            if created_after is None:
                rows = cursor.execute("SELECT key_id, create_time FROM gateway_api_keys").fetchall()
            else:
                rows = cursor.execute(
                    "SELECT key_id, create_time FROM gateway_api_keys WHERE create_time > ?", (created_after,)
                ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def revoke_key(self, tenant_id: str, key_id: str) -> None:
        """Revoke for good: also a key its tenant's deletion revoked (it then stays revoked on undelete)."""
        with self.transaction() as cursor:
            cursor.execute(
                "UPDATE gateway_api_keys SET revoke_time = COALESCE(revoke_time, ?), revoke_reason = ? "
                "WHERE key_id = ? AND tenant_id = ? AND (revoke_time IS NULL OR revoke_reason = ?)",
                (time.time(), REVOKED_BY_CALL, key_id, tenant_id, REVOKED_BY_TENANT_DELETION),
            )
            if cursor.rowcount == 0:
                raise NotFound(API_KEY_TYPE, f"tenants/{tenant_id}/apiKeys/{key_id}")


# --- schema ---------------------------------------------------------------------------------------
# The tables as the first gateway created them; later columns are in _ADDED_COLUMNS and reach both
# new and old stores the same way (ALTER TABLE ... ADD COLUMN when missing).

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
CREATE TABLE IF NOT EXISTS gateway_audit_log (
    entry_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    time           REAL NOT NULL,
    tenant         TEXT NOT NULL DEFAULT '',
    principal_kind TEXT NOT NULL,
    principal_tenant TEXT NOT NULL DEFAULT '',
    subject        TEXT NOT NULL DEFAULT '',
    auth_method    TEXT NOT NULL DEFAULT '',
    method         TEXT NOT NULL,
    resources      TEXT NOT NULL DEFAULT '[]',
    status_code    TEXT NOT NULL,
    transport      TEXT NOT NULL DEFAULT '',
    client_address TEXT NOT NULL DEFAULT '',
    request_id     TEXT NOT NULL DEFAULT ''
);
"""

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
    """CREATE TABLE IF NOT EXISTS gateway_audit_log (
        entry_id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time           DOUBLE PRECISION NOT NULL,
        tenant         TEXT NOT NULL DEFAULT '',
        principal_kind TEXT NOT NULL,
        principal_tenant TEXT NOT NULL DEFAULT '',
        subject        TEXT NOT NULL DEFAULT '',
        auth_method    TEXT NOT NULL DEFAULT '',
        method         TEXT NOT NULL,
        resources      TEXT NOT NULL DEFAULT '[]',
        status_code    TEXT NOT NULL,
        transport      TEXT NOT NULL DEFAULT '',
        client_address TEXT NOT NULL DEFAULT '',
        request_id     TEXT NOT NULL DEFAULT ''
    )""",
)

#: Columns added after the first release: (table, column, type); REAL is DOUBLE PRECISION on PostgreSQL.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("gateway_tenants", "purge_start_time", "REAL"),
    ("gateway_tenants", "purge_lease_time", "REAL"),
    ("gateway_tenants", "purge_time", "REAL"),
    ("gateway_tenants", "purge_error", "TEXT NOT NULL DEFAULT ''"),
    ("gateway_tenants", "purge_attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("gateway_api_keys", "expire_time", "REAL"),
    ("gateway_api_keys", "display_name", "TEXT NOT NULL DEFAULT ''"),
    ("gateway_api_keys", "revoke_reason", "TEXT NOT NULL DEFAULT ''"),
)
#: Indexes over added columns (created after the columns exist).
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS gateway_api_keys_listing ON gateway_api_keys(tenant_id, create_time, key_id)",
    "CREATE INDEX IF NOT EXISTS gateway_api_keys_created ON gateway_api_keys(create_time)",
    "CREATE INDEX IF NOT EXISTS gateway_tenants_deleted ON gateway_tenants(delete_time)",
    "CREATE INDEX IF NOT EXISTS gateway_audit_tenant ON gateway_audit_log(tenant, entry_id)",
    "CREATE INDEX IF NOT EXISTS gateway_audit_time ON gateway_audit_log(time)",
)


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
        self._db.executescript(_SQLITE_SCHEMA)  # idempotent
        with self.transaction() as cursor:  # BEGIN IMMEDIATE: processes sharing the file migrate it once
            for table, column, kind in _ADDED_COLUMNS:
                present = {row[1] for row in cursor.execute(f"PRAGMA table_info({table})").fetchall()}
                if column not in present:
                    cursor.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for statement in _INDEXES:
                cursor.execute(statement)

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


_SCHEMA_LOCK = 0x6761_7465  # "gate": replicas starting together create and migrate the tables once


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
            # ALTER TABLE and CREATE INDEX lock the table even when there is nothing to do, so only
            # what is missing is altered or created (a replica starting never queues behind traffic).
            present = {
                (table, column)
                for table, column in connection.execute(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
                    (sorted({table for table, _, _ in _ADDED_COLUMNS}),),
                ).fetchall()
            }
            for table, column, kind in _ADDED_COLUMNS:
                if (table, column) not in present:
                    kind = kind.replace("REAL", "DOUBLE PRECISION")
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
            indexes = {
                row[0]
                for row in connection.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                ).fetchall()
            }
            for statement in _INDEXES:
                if statement.split(" IF NOT EXISTS ")[1].split(" ")[0] not in indexes:
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
    "REVOKED_BY_CALL",
    "REVOKED_BY_TENANT_DELETION",
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
