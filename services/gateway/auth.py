"""Who is calling: API keys (hashed in the key store) and JWT bearer tokens (HS256 / RS256).

Credentials travel as ``authorization: Bearer <jwt or api key>`` or ``x-api-key: <api key>``.

API keys look like ``fc_<key id>_<secret>``: the id (16 hex chars) finds the row in the key store
(``keystore.py``), the SHA-256 of the secret is compared in constant time. The secret has 256 bits of
entropy, so a fast hash is enough (a slow password hash protects guessable secrets, which these are
not) and keeps every call cheap. Key ids are not secrets (they name keys in listings and audit
entries): an id the key directory (``key_directory.py``) does not know is refused without a store
lookup, so made-up keys never reach the store. Store lookups are cached for ``auth_cache_seconds``
(revocations through this replica clear the cache at once) and run in a worker thread on a miss.
Keys may expire (``expire_time``): an expired key is UNAUTHENTICATED with reason API_KEY_EXPIRED.

``credential_id`` names the credential a request presented without checking it (the key id, a hash
of anything else, or "none"): the failed-authentication limiter (``limits.py``) counts per client
address and credential id, so one stale key behind a NAT never locks out the valid keys beside it.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt

from services.gateway.config import GatewaySettings
from services.gateway.key_directory import KeyDirectory
from services.gateway.keystore import PLATFORM_OWNER, KeyRecord, KeyStore, TenantRecord, sha256
from services.runtime import Unauthenticated
from services.runtime.assertion import Caller
from services.runtime.scopes import ADMIN, ALL_SCOPES, TENANT_SCOPES
from services.runtime.tenant_ids import valid_tenant_id

API_KEY = re.compile(r"fc_([0-9a-f]{16})_([A-Za-z0-9_-]{32,128})")
# Three base64url segments; anything else (spaces, CR/LF, quotes) is refused before PyJWT sees it.
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_CREDENTIAL_LENGTH = 8192


PrincipalKind = Literal["tenant", "platform", "system"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    * ``tenant``: an advertiser's key or token, bound to ``tenant``; holds tenant scopes only.
    * ``platform``: one of the platform's own services or jobs (no tenant); may hold platform scopes
      (members.read, ...) and acts on every tenant's resources.
    * ``system``: a system administrator (bootstrap key, admin token without tenant): manages tenants
      and keys, calls no tenant API.
    """

    tenant: str | None
    scopes: frozenset[str]
    method: str  # "api_key" or "jwt"
    subject: str = ""  # key id or JWT sub, for logs
    kind: PrincipalKind = "tenant"

    def __post_init__(self) -> None:
        if (self.kind == "tenant") != (self.tenant is not None):
            raise ValueError("tenant principals, and only they, have a tenant")
        if self.kind == "tenant":
            # A tenant never holds a platform scope, whatever its key or token claimed.
            object.__setattr__(self, "scopes", self.scopes & TENANT_SCOPES)

    def allows(self, needed: frozenset[str]) -> bool:
        """Any one of ``needed`` suffices; ``admin`` implies every *tenant* scope; empty needs nothing."""
        if not needed or needed & self.scopes:
            return True
        return ADMIN in self.scopes and bool(needed & TENANT_SCOPES)

    @property
    def is_system(self) -> bool:
        return self.kind == "system"

    @property
    def is_platform(self) -> bool:
        return self.kind == "platform"

    @property
    def limit_key(self) -> str:
        """Whose rate-limit bucket a call takes: the tenant's, or the platform principal's own."""
        return self.tenant or f"{self.kind}:{self.subject}"

    def caller(self) -> Caller:
        """What the gateway asserts to backends for this principal."""
        if self.kind == "tenant":
            assert self.tenant is not None
            scopes = TENANT_SCOPES if ADMIN in self.scopes else self.scopes
            return Caller.for_tenant(self.tenant, self.subject, scopes)
        return Caller.platform(f"{self.method}:{self.subject}", self.scopes)


class _TtlCache:
    """A tiny time-bounded cache; revocations through this gateway invalidate it at once."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: dict[str, tuple[float, Any]] = {}

    async def get(self, key: str, load: Callable[[], Any]) -> Any:
        """The cached value, or ``load()`` run in a worker thread (store queries block)."""
        now = time.monotonic()
        hit = self._items.get(key) if self.ttl > 0 else None
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await asyncio.to_thread(load)
        if self.ttl > 0:
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
                algorithms=[str(algorithm)],  # a str: no key is known for anything else
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


def credential_id(header: Callable[[str], str | None]) -> str:
    """What the failed-authentication limiter counts a request under, without verifying anything.

    ``key:<key id>`` for an ``fc_`` API key (so a stale key is counted apart from its neighbours'),
    ``hash:<16 hex>`` of any other presented credential (tokens, malformed keys), ``none`` without one.
    """
    authorization = header("authorization")
    presented = header("x-api-key")
    if authorization is not None:
        presented = authorization.strip().partition(" ")[2].strip() or authorization
    if presented is None:
        return "none"
    presented = presented.strip()
    match = API_KEY.fullmatch(presented[:MAX_CREDENTIAL_LENGTH])
    if match is not None:
        return f"key:{match.group(1)}"
    return "hash:" + sha256(presented[:MAX_CREDENTIAL_LENGTH]).hex()[:16]


class Authenticator:
    """Turns request headers into a Principal or raises Unauthenticated."""

    def __init__(
        self, settings: GatewaySettings, store: KeyStore, directory: KeyDirectory | None = None
    ) -> None:
        self.store = store
        self.directory = directory or KeyDirectory(
            store, min_refresh_seconds=settings.key_directory_refresh_seconds
        )
        self.jwt = JwtVerifier(
            hs256_secret=settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None,
            rs256_public_key=settings.jwt_rs256_public_key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_seconds,
        )
        bootstrap = settings.bootstrap_admin_key.get_secret_value() if settings.bootstrap_admin_key else ""
        self._bootstrap_digest = sha256(bootstrap) if bootstrap else None
        self._keys = _TtlCache(settings.auth_cache_seconds)
        self._tenants = _TtlCache(settings.auth_cache_seconds)

    def invalidate(self) -> None:
        """Forget cached keys and tenants (after a revocation or deletion through this gateway)."""
        self._keys.clear()
        self._tenants.clear()

    async def authenticate(self, header: Callable[[str], str | None]) -> Principal:
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
                return await self._api_key(credential)
            return await self._token(credential)
        if api_key is not None:
            return await self._api_key(api_key.strip())
        raise Unauthenticated("authentication required", reason="MISSING_CREDENTIALS")

    async def _live_tenant(self, tenant_id: str) -> bool:
        record: TenantRecord | None = await self._tenants.get(
            tenant_id, lambda: self.store.get_tenant(tenant_id)
        )
        return record is not None and record.delete_time is None

    async def _api_key(self, presented: str) -> Principal:
        if len(presented) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        if self._bootstrap_digest is not None and hmac.compare_digest(
            sha256(presented), self._bootstrap_digest
        ):
            return Principal(
                tenant=None, scopes=frozenset({ADMIN}), method="api_key", subject="bootstrap", kind="system"
            )
        match = API_KEY.fullmatch(presented)
        if match is None:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        key_id, secret = match.groups()
        record: KeyRecord | None = None
        if await self.directory.contains(key_id):  # made-up ids never reach the store
            record = await self._keys.get(key_id, lambda: self.store.get_key(key_id))
        # Hash and compare for unknown ids too, so that they cost what a wrong secret costs.
        expected = record.secret_sha256 if record is not None else b"\0" * 32
        if not hmac.compare_digest(sha256(secret), expected) or record is None:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        if record.revoke_time is not None:
            raise Unauthenticated("API key revoked", reason="API_KEY_REVOKED")
        if record.expired(time.time()):
            raise Unauthenticated("API key expired", reason="API_KEY_EXPIRED")
        if record.tenant == PLATFORM_OWNER:
            return Principal(
                tenant=None, scopes=record.scopes, method="api_key", subject=key_id, kind="platform"
            )
        if not await self._live_tenant(record.tenant):
            raise Unauthenticated("API key revoked", reason="API_KEY_REVOKED")
        return Principal(tenant=record.tenant, scopes=record.scopes, method="api_key", subject=key_id)

    async def _token(self, token: str) -> Principal:
        if not self.jwt.enabled:
            raise Unauthenticated("bearer tokens are not accepted here", reason="TOKENS_DISABLED")
        if len(token) > MAX_CREDENTIAL_LENGTH or JWT_SHAPE.fullmatch(token) is None:
            raise Unauthenticated("malformed bearer token", reason="MALFORMED_TOKEN")
        claims = self.jwt.verify(token)
        scopes = _claim_scopes(claims)
        tenant = claims.get("tenant")
        subject = str(claims.get("sub", ""))[:128]
        if claims.get("platform") is True:
            # The platform's own services: no tenant, platform scopes as granted by the token.
            if tenant is not None:
                raise Unauthenticated("a platform token names no tenant", reason="INVALID_TOKEN")
            return Principal(tenant=None, scopes=scopes, method="jwt", subject=subject, kind="platform")
        if tenant is None:
            if ADMIN not in scopes:
                raise Unauthenticated("token names no tenant", reason="TOKEN_WITHOUT_TENANT")
            return Principal(
                tenant=None, scopes=frozenset({ADMIN}), method="jwt", subject=subject, kind="system"
            )
        # The tenant goes into trusted metadata: only a well-formed, live tenant id gets that far.
        if not isinstance(tenant, str) or not valid_tenant_id(tenant):
            raise Unauthenticated("token tenant is not a valid tenant id", reason="INVALID_TOKEN")
        if not await self._live_tenant(tenant):
            raise Unauthenticated("token tenant is unknown or deleted", reason="UNKNOWN_TENANT")
        return Principal(tenant=tenant, scopes=scopes, method="jwt", subject=subject)


__all__ = ["Authenticator", "JwtVerifier", "Principal", "credential_id"]
