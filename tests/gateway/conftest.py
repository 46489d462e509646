"""Gateway fixtures: real gateway servers on port 0 in front of fake or real backends.

``fake_stack``: gateway -> ``FakeBackend`` (sees deadlines, counts calls, fails on demand).
``real_stack`` (in ``test_isolation.py`` and friends): gateway -> real audience (+ retarget).
Credentials: the bootstrap admin key creates tenants ``alpha`` and ``beta`` with keys holding every
tenant scope, and a platform principal's key (``stack.auth("platform")``) with every platform scope.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from services.gateway.config import GatewaySettings
from services.gateway.server import GatewayApp, create_gateway_server
from services.runtime import load_settings
from services.runtime.scopes import ALL_SCOPES, TENANT_SCOPES

from .fakes import FakeBackend

BOOTSTRAP = "bootstrap-admin-key-for-tests-0123456789"
HS_SECRET = "hs256-test-secret-which-is-long-enough-0123456789"
AUDIENCE = "flashcrowd"
ISSUER = "https://issuer.test"
#: Every tenant scope but admin (what a full tenant key holds).
ALL = sorted(TENANT_SCOPES - {"admin"})
#: Every scope but admin (a platform key: member-level reads and writes too).
PLATFORM = sorted(ALL_SCOPES - {"admin"})


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def rsa_public_pem(rsa_key: rsa.RSAPrivateKey) -> str:
    return (
        rsa_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def make_token(
    tenant: str | None,
    scopes: list[str],
    *,
    key: object = HS_SECRET,
    algorithm: str = "HS256",
    audience: str = AUDIENCE,
    issuer: str = ISSUER,
    expires_in: float = 300,
    not_before: float | None = None,
    extra: dict | None = None,
) -> str:
    now = time.time()
    claims: dict = {"aud": audience, "iss": issuer, "exp": int(now + expires_in), "iat": int(now)}
    claims["sub"] = "u1"
    if tenant is not None:
        claims["tenant"] = tenant
    claims["scope"] = " ".join(scopes)
    if not_before is not None:
        claims["nbf"] = int(not_before)
    claims.update(extra or {})
    return jwt.encode(claims, key, algorithm=algorithm)


def gateway_settings(tmp_path: Path, rsa_public_pem: str, **overrides: object) -> GatewaySettings:
    values: dict = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "grace_seconds": 0.2,
        "keystore_path": str(tmp_path / "keys.sqlite3"),
        "bootstrap_admin_key": BOOTSTRAP,
        "jwt_hs256_secret": HS_SECRET,
        "jwt_rs256_public_key": rsa_public_pem,
        "jwt_audience": AUDIENCE,
        "jwt_issuer": ISSUER,
        "auth_cache_seconds": 0.0,
        "retry_initial_backoff_seconds": 0.02,
        "retry_max_backoff_seconds": 0.1,
        "connect_timeout_seconds": 0.5,
        "sale_monitor_target": "127.0.0.1:1",
    }
    values.update(overrides)
    return load_settings(GatewaySettings, **values)


@dataclass
class Stack:
    """A running gateway and what tests need to call it."""

    server: grpc.aio.Server
    port: int
    app: GatewayApp
    channel: grpc.aio.Channel
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    def auth(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.keys[tenant]),)

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.app.close()


async def start_stack(settings: GatewaySettings, tenants: dict[str, list[str]]) -> Stack:
    server, port, app = await create_gateway_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stack = Stack(server, port, app, channel)
    admin = gw_grpc.GatewayServiceStub(channel)
    boot = (("x-api-key", BOOTSTRAP),)
    for tenant, scopes in tenants.items():
        await admin.CreateTenant(gw.CreateTenantRequest(tenant_id=tenant), metadata=boot)
        response = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent=f"tenants/{tenant}", scopes=scopes), metadata=boot
        )
        stack.keys[tenant] = response.secret
    for name in ("platform", "platform-b"):  # two platform principals (their own limits each)
        platform = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="platform", scopes=PLATFORM), metadata=boot
        )
        stack.keys[name] = platform.secret
    return stack


@pytest.fixture
async def fake_backend() -> AsyncIterator[FakeBackend]:
    backend = FakeBackend()
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture
async def fake_stack(
    tmp_path: Path, rsa_public_pem: str, fake_backend: FakeBackend
) -> AsyncIterator[tuple[Stack, FakeBackend]]:
    settings = gateway_settings(
        tmp_path, rsa_public_pem, audience_target=fake_backend.target, retarget_target="127.0.0.1:1"
    )
    stack = await start_stack(settings, {"alpha": ALL, "beta": ALL})
    yield stack, fake_backend
    await stack.close()


# --- real backends ------------------------------------------------------------------------------


@dataclass
class RealStack:
    """Gateway in front of a real audience and a real retarget server, on a small generated world."""

    gateway: Stack
    audience_target: str
    retarget_target: str
    closers: list = field(default_factory=list)

    async def close(self) -> None:
        await self.gateway.close()
        for closer in reversed(self.closers):
            await closer()


async def start_real_backends(root: Path) -> tuple[str, str, list]:
    """Audience (local store with a generated world) and retarget (SQLite ledger) on port 0."""
    from services.audience.config import AudienceSettings
    from services.audience.server import create_audience_server
    from services.events.generator import GenConfig, generate
    from services.retarget.config import RetargetSettings
    from services.retarget.server import create_retarget_server
    from services.storage import LocalObjectStore

    store_dir = root / "store"
    generate(LocalObjectStore(store_dir), GenConfig(users=3000, days=3, seed=11))
    closers: list = []
    audience_settings = load_settings(
        AudienceSettings,
        store_url=str(store_dir),
        port=0,
        grace_seconds=0.2,
        persona_min_size=50,
        membership_refresh_ms=200,
        log_json=False,
    )
    a_server, a_port, a_app = await create_audience_server(audience_settings)
    closers.append(a_app.close)
    closers.append(lambda: a_server.stop(None))
    audience_target = f"127.0.0.1:{a_port}"
    retarget_settings = load_settings(
        RetargetSettings,
        database_url=f"sqlite:///{root / 'retarget.db'}",
        audience_target=audience_target,
        port=0,
        grace_seconds=0.2,
        log_json=False,
    )
    r_server, r_port, r_app = await create_retarget_server(retarget_settings)
    closers.append(r_app.close)
    closers.append(lambda: r_server.stop(None))
    return audience_target, f"127.0.0.1:{r_port}", closers


@pytest.fixture(scope="session")
async def real_stack(
    tmp_path_factory: pytest.TempPathFactory, rsa_public_pem: str
) -> AsyncIterator[RealStack]:
    root = tmp_path_factory.mktemp("gateway-real")
    audience_target, retarget_target, closers = await start_real_backends(root)
    settings = gateway_settings(
        root,
        rsa_public_pem,
        audience_target=audience_target,
        retarget_target=retarget_target,
        default_rate_limit={"rate": 10_000, "burst": 10_000},
    )
    gateway = await start_stack(settings, {"alpha": ALL, "beta": ALL, "fuzz": ALL})
    stack = RealStack(gateway, audience_target, retarget_target, closers)
    yield stack
    await stack.close()
