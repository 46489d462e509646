"""Who is calling: API keys (hashed in a small SQLite store) and JWT bearer tokens (HS256 / RS256).

Credentials travel as ``authorization: Bearer <jwt or api key>`` or ``x-api-key: <api key>``.

API keys look like ``fc_<key id>_<secret>``: the id (16 hex chars) finds the row, the SHA-256 of the
secret is compared in constant time. The secret has 256 bits of entropy, so a fast hash is enough (a
slow password hash protects guessable secrets, which these are not) and keeps every call cheap.

Why SQLite rather than a JSON document in the object store: key creation, revocation and tenant
deletion must be atomic and immediately visible to the next call; SQLite gives transactions and
row-level lookups with no extra server, and the same schema moves to PostgreSQL when the gateway
runs more than one replica. A JSON document would need compare-and-swap on every admin write and
a full re-read on every cache miss.

Tenants are never really deleted: a tombstone keeps the id from being created again, so a replayed
key or token of a deleted tenant can never be bound to a new tenant of the same name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt

from services.gateway.catalog import ADMIN, ALL_SCOPES
from services.gateway.config import GatewaySettings
from services.runtime import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

#: Tenant ids follow the resource id rule of every service (AIP-122): safe in names, keys, metadata.
TENANT_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
API_KEY = re.compile(r"fc_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")
# Three base64url segments; anything else (spaces, CR/LF, quotes) is refused before PyJWT sees it.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_CREDENTIAL_LENGTH = 8192

TENANT_TYPE = "flashcrowd.dev/Tenant"
API_KEY_TYPE = "flashcrowd.dev/ApiKey"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``tenant`` is None for system administrators (bootstrap key)."""

    tenant: str | None
    scopes: frozenset[str]
    method: str  # "api_key" or "jwt"
    subject: str = ""  # key id or JWT sub, for logs

    def allows(self, needed: frozenset[str]) -> bool:
        """Any one of ``needed`` suffices; ``admin`` implies every scope; empty needs nothing."""
        return not needed or ADMIN in self.scopes or bool(needed & self.scopes)

    @property
    def is_system(self) -> bool:
        return self.tenant is None and ADMIN in self.scopes


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def valid_tenant_id(value: str) -> bool:
    return isinstance(value, str) and TENANT_ID.fullmatch(value) is not None


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id    TEXT PRIMARY KEY,
    display_name TEXT NOT NULL DEFAULT '',
    create_time  REAL NOT NULL,
    delete_time  REAL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id        TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(tenant_id),
    secret_sha256 BLOB NOT NULL,
    scopes        TEXT NOT NULL,
    create_time   REAL NOT NULL,
    revoke_time   REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id);
"""


class KeyStore:
    """Tenants and hashed API keys in SQLite. Calls are short and serialised by a lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 5000")
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- tenants ---
    def create_tenant(self, tenant_id: str, display_name: str = "") -> TenantRecord:
        if not valid_tenant_id(tenant_id):
            raise InvalidArgument("tenant_id", "must be 1-63 characters of [a-z0-9-], starting with a letter")
        now = time.time()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO tenants (tenant_id, display_name, create_time) VALUES (?, ?, ?)",
                    (tenant_id, display_name, now),
                )
            except sqlite3.IntegrityError:
                # Also for deleted tenants: their ids are never reused.
                raise AlreadyExists(TENANT_TYPE, f"tenants/{tenant_id}") from None
        return TenantRecord(tenant_id, display_name, now, None)

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT tenant_id, display_name, create_time, delete_time FROM tenants WHERE tenant_id = ?",
                (tenant_id,),
            ).fetchone()
        return TenantRecord(*row) if row else None

    def delete_tenant(self, tenant_id: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "UPDATE tenants SET delete_time = ? WHERE tenant_id = ? AND delete_time IS NULL",
                    (now, tenant_id),
                )
                if cursor.rowcount == 0:
                    self._db.execute("ROLLBACK")
                    raise NotFound(TENANT_TYPE, f"tenants/{tenant_id}")
                self._db.execute(
                    "UPDATE api_keys SET revoke_time = ? WHERE tenant_id = ? AND revoke_time IS NULL",
                    (now, tenant_id),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    # --- keys ---
    def create_key(self, tenant_id: str, scopes: Iterable[str]) -> tuple[KeyRecord, str]:
        """A new key of a live tenant; returns the record and the full key string (shown once)."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(key_id, tenant_id, _sha256(secret), frozenset(scopes), time.time(), None)
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM tenants WHERE tenant_id = ? AND delete_time IS NULL", (tenant_id,)
            ).fetchone()
            if row is None:
                raise NotFound(TENANT_TYPE, f"tenants/{tenant_id}")
            self._db.execute(
                "INSERT INTO api_keys (key_id, tenant_id, secret_sha256, scopes, create_time) "
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
        with self._lock:
            row = self._db.execute(
                "SELECT key_id, tenant_id, secret_sha256, scopes, create_time, revoke_time "
                "FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None:
            return None
        key_id, tenant, digest, scopes, created, revoked = row
        return KeyRecord(key_id, tenant, bytes(digest), frozenset(scopes.split()), created, revoked)

    def revoke_key(self, tenant_id: str, key_id: str) -> None:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoke_time = ? "
                "WHERE key_id = ? AND tenant_id = ? AND revoke_time IS NULL",
                (time.time(), key_id, tenant_id),
            )
        if cursor.rowcount == 0:
            raise NotFound(API_KEY_TYPE, f"tenants/{tenant_id}/apiKeys/{key_id}")


class _TtlCache:
    """A tiny time-bounded cache; revocations through this gateway invalidate it at once."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: dict[str, tuple[float, Any]] = {}

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        if self.ttl <= 0:
            return load()
        now = time.monotonic()
        hit = self._items.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load()
        if len(self._items) >= self.max_entries:
            self._items.clear()
        self._items[key] = (now + self.ttl, value)
        return value

    def clear(self) -> None:
        self._items.clear()


@dataclass
class JwtVerifier:
    """Verifies bearer JWTs: signature (HS256 or RS256 by configured key), exp, nbf, aud, iss."""

    hs256_secret: str | None
    rs256_public_key: str | None
    audience: str
    issuer: str
    leeway: float
    _keys: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.hs256_secret:
            self._keys["HS256"] = self.hs256_secret
        if self.rs256_public_key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            self._keys["RS256"] = load_pem_public_key(self.rs256_public_key.encode())

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed bearer token", reason="MALFORMED_TOKEN") from None
        algorithm = header.get("alg")
        # The key is chosen by algorithm and only that algorithm is accepted with it, so an
        # RS256 public key can never be used as an HS256 secret (algorithm confusion) and
        # "none" is never accepted.
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:
            raise Unauthenticated("unsupported token algorithm", reason="UNSUPPORTED_TOKEN_ALGORITHM")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer or None,
                leeway=self.leeway,
                options={"require": ["exp", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience mismatch", reason="TOKEN_AUDIENCE") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer mismatch", reason="TOKEN_ISSUER") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid bearer token", reason="INVALID_TOKEN") from None


def _claim_scopes(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scopes", ""))
    if isinstance(raw, str):
        items = raw.split()
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    else:
        raise Unauthenticated("token scopes must be a string or a list of strings", reason="INVALID_TOKEN")
    return frozenset(items) & ALL_SCOPES


class Authenticator:
    """Turns request headers into a Principal or raises Unauthenticated."""

    def __init__(self, settings: GatewaySettings, store: KeyStore) -> None:
        self.store = store
        self.jwt = JwtVerifier(
            hs256_secret=settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None,
            rs256_public_key=settings.jwt_rs256_public_key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_seconds,
        )
        bootstrap = settings.bootstrap_admin_key.get_secret_value() if settings.bootstrap_admin_key else ""
        self._bootstrap_digest = _sha256(bootstrap) if bootstrap else None
        self._keys = _TtlCache(settings.auth_cache_seconds)
        self._tenants = _TtlCache(settings.auth_cache_seconds)

    def invalidate(self) -> None:
        """Forget cached keys and tenants (after a revocation or deletion through this gateway)."""
        self._keys.clear()
        self._tenants.clear()

    def authenticate(self, header: Callable[[str], str | None]) -> Principal:
        """``header(name)`` returns a lower-case-named header's value (gRPC metadata or HTTP)."""
        authorization = header("authorization")
        api_key = header("x-api-key")
        if authorization is not None and api_key is not None:
            raise Unauthenticated("send one credential, not both", reason="AMBIGUOUS_CREDENTIALS")
        if authorization is not None:
            scheme, _, credential = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise Unauthenticated(
                    "authorization must be 'Bearer <token>'", reason="MALFORMED_CREDENTIALS"
                )
            credential = credential.strip()
            if credential.startswith("fc_"):
                return self._api_key(credential)
            return self._token(credential)
        if api_key is not None:
            return self._api_key(api_key.strip())
        raise Unauthenticated("authentication required", reason="MISSING_CREDENTIALS")

    def _live_tenant(self, tenant_id: str) -> bool:
        record = self._tenants.get(tenant_id, lambda: self.store.get_tenant(tenant_id))
        return record is not None and record.delete_time is None

    def _api_key(self, presented: str) -> Principal:
        if len(presented) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        if self._bootstrap_digest is not None and hmac.compare_digest(
            _sha256(presented), self._bootstrap_digest
        ):
            return Principal(tenant=None, scopes=frozenset({ADMIN}), method="api_key", subject="bootstrap")
        match = API_KEY.fullmatch(presented)
        if match is None:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        key_id, secret = match.groups()
        record: KeyRecord | None = self._keys.get(key_id, lambda: self.store.get_key(key_id))
        # Hash and compare even for unknown ids so that timing does not tell which ids exist.
        expected = record.secret_sha256 if record is not None else b"\0" * 32
        if not hmac.compare_digest(_sha256(secret), expected) or record is None:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        if record.revoke_time is not None or not self._live_tenant(record.tenant):
            raise Unauthenticated("API key revoked", reason="API_KEY_REVOKED")
        return Principal(tenant=record.tenant, scopes=record.scopes, method="api_key", subject=key_id)

    def _token(self, token: str) -> Principal:
        if not self.jwt.enabled:
            raise Unauthenticated("bearer tokens are not accepted here", reason="TOKENS_DISABLED")
        if len(token) > MAX_CREDENTIAL_LENGTH or JWT_SHAPE.fullmatch(token) is None:
            raise Unauthenticated("malformed bearer token", reason="MALFORMED_TOKEN")
        claims = self.jwt.verify(token)
        scopes = _claim_scopes(claims)
        tenant = claims.get("tenant")
        subject = str(claims.get("sub", ""))[:128]
        if tenant is None:
            if ADMIN not in scopes:
                raise Unauthenticated("token names no tenant", reason="TOKEN_WITHOUT_TENANT")
            return Principal(tenant=None, scopes=frozenset({ADMIN}), method="jwt", subject=subject)
        # The tenant goes into trusted metadata: only a well-formed, live tenant id gets that far.
        if not isinstance(tenant, str) or not valid_tenant_id(tenant):
            raise Unauthenticated("token tenant is not a valid tenant id", reason="INVALID_TOKEN")
        if not self._live_tenant(tenant):
            raise Unauthenticated("token tenant is unknown or deleted", reason="UNKNOWN_TENANT")
        return Principal(tenant=tenant, scopes=scopes, method="jwt", subject=subject)


__all__ = [
    "API_KEY_TYPE",
    "TENANT_TYPE",
    "Authenticator",
    "JwtVerifier",
    "KeyStore",
    "Principal",
    "valid_tenant_id",
]
