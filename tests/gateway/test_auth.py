"""Authentication and scopes: API keys, HS256/RS256 JWTs, revocation, deleted tenants, admin rules."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from services.runtime import error_details

from .conftest import ALL, BOOTSTRAP, HS_SECRET, make_token

GET = pb.GetPackRequest(name="tenants/alpha/packs/p1")
BOOT = (("x-api-key", BOOTSTRAP),)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def expect(call, code: grpc.StatusCode, reason: str | None = None):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = error_details(caught.value)
    if reason is not None:
        assert details.reason == reason
    return details


async def test_api_key_and_jwts_authenticate(fake_stack, rsa_key) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    assert (await stub.GetPack(GET, metadata=stack.auth("alpha"))).size == 42
    assert (
        await stub.GetPack(GET, metadata=(("authorization", f"Bearer {stack.keys['alpha']}"),))
    ).size == 42
    assert (await stub.GetPack(GET, metadata=bearer(make_token("alpha", ["packs.read"])))).size == 42
    rs = make_token("alpha", ["packs.read"], key=rsa_key, algorithm="RS256")
    assert (await stub.GetPack(GET, metadata=bearer(rs))).size == 42
    assert [seen.tenant for seen in backend.servicer.seen] == ["alpha"] * 4
    who = await gw_grpc.GatewayServiceStub(stack.channel).WhoAmI(gw.WhoAmIRequest(), metadata=bearer(rs))
    assert (who.tenant, list(who.scopes), who.method) == ("alpha", ["packs.read"], "jwt")


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ((), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "MALFORMED_CREDENTIALS"),
        ((("authorization", "Bearer not-a-jwt"),), "MALFORMED_TOKEN"),
        ((("authorization", "Bearer a.b.c"),), "MALFORMED_TOKEN"),
        ((("authorization", "Bearer " + "a" * 6000 + ".b.c"),), "MALFORMED_TOKEN"),
        ((("x-api-key", "garbage"),), "INVALID_API_KEY"),
        ((("x-api-key", "fc_0123456789abcdef_" + "x" * 43),), "INVALID_API_KEY"),
    ],
)
async def test_malformed_credentials(fake_stack, metadata, reason) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    await expect(stub.GetPack(GET, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED, reason)
    assert backend.servicer.calls["GetPack"] == 0


async def test_bad_tokens(fake_stack, rsa_key) -> None:
    stack, _ = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    unauth = grpc.StatusCode.UNAUTHENTICATED
    cases = {
        "TOKEN_EXPIRED": make_token("alpha", ALL, expires_in=-120),
        "TOKEN_NOT_YET_VALID": make_token("alpha", ALL, not_before=time.time() + 600),
        "TOKEN_AUDIENCE": make_token("alpha", ALL, audience="someone-else"),
        "TOKEN_ISSUER": make_token("alpha", ALL, issuer="https://evil.test"),
        "UNKNOWN_TENANT": make_token("nobody", ALL),
    }
    for reason, token in cases.items():
        await expect(stub.GetPack(GET, metadata=bearer(token)), unauth, reason)
    # Signed with another RSA key; HS256 signed with a wrong secret; alg "none".
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await expect(
        stub.GetPack(GET, metadata=bearer(make_token("alpha", ALL, key=other, algorithm="RS256"))),
        unauth,
        "INVALID_TOKEN",
    )
    await expect(
        stub.GetPack(GET, metadata=bearer(make_token("alpha", ALL, key="wrong-secret-" * 4))),
        unauth,
        "INVALID_TOKEN",
    )
    none_token = jwt.encode(
        {"tenant": "alpha", "aud": "flashcrowd", "exp": int(time.time()) + 60}, None, algorithm="none"
    )
    await expect(stub.GetPack(GET, metadata=bearer(none_token)), unauth)
    # Missing exp.
    no_exp = jwt.encode({"tenant": "alpha", "aud": "flashcrowd", "scope": "packs.read"}, HS_SECRET)
    await expect(stub.GetPack(GET, metadata=bearer(no_exp)), unauth, "INVALID_TOKEN")


async def test_algorithm_confusion_refused(fake_stack, rsa_public_pem) -> None:
    """An HS256 token whose 'secret' is the RSA public key must not pass as RS256 (or at all)."""
    stack, _ = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    header_b64 = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    claims = {
        "tenant": "alpha",
        "aud": "flashcrowd",
        "iss": "https://issuer.test",
        "exp": int(time.time()) + 60,
    }
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    signature = hmac.new(rsa_public_pem.encode(), f"{header_b64}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header_b64}.{payload}.{jwt.utils.base64url_encode(signature).decode()}"
    await expect(stub.GetPack(GET, metadata=bearer(forged)), grpc.StatusCode.UNAUTHENTICATED)


async def test_injected_tenant_claims_refused(fake_stack) -> None:
    """A tenant claim that could smuggle metadata (CR/LF, slashes) never reaches a backend."""
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    for tenant in ["alpha\r\nx-flashcrowd-tenant: beta", "alpha/../beta", "ALPHA", "", "a" * 100]:
        await expect(
            stub.GetPack(GET, metadata=bearer(make_token(tenant, ALL))), grpc.StatusCode.UNAUTHENTICATED
        )
    # A non-string tenant or scope claim is refused too.
    await expect(
        stub.GetPack(GET, metadata=bearer(make_token(None, ALL, extra={"tenant": ["alpha"]}))),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect(
        stub.GetPack(GET, metadata=bearer(make_token("alpha", [], extra={"scope": {"a": 1}}))),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert backend.servicer.calls["GetPack"] == 0


async def test_both_credentials_refused(fake_stack) -> None:
    stack, _ = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    metadata = (*stack.auth("alpha"), ("authorization", f"Bearer {make_token('alpha', ALL)}"))
    await expect(
        stub.GetPack(GET, metadata=metadata), grpc.StatusCode.UNAUTHENTICATED, "AMBIGUOUS_CREDENTIALS"
    )
    twice = (*stack.auth("alpha"), *stack.auth("beta"))
    await expect(stub.GetPack(GET, metadata=twice), grpc.StatusCode.UNAUTHENTICATED, "AMBIGUOUS_CREDENTIALS")


async def test_scopes(fake_stack) -> None:
    stack, backend = fake_stack
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    reader = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"]), metadata=BOOT
    )
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    key = (("x-api-key", reader.secret),)
    assert (await stub.GetPack(GET, metadata=key)).size == 42
    create = pb.CreatePackRequest(parent="tenants/alpha", pack_id="p2")
    await expect(stub.CreatePack(create, metadata=key), grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
    campaigns_only = make_token("alpha", ["campaigns.read"])
    await expect(stub.GetPack(GET, metadata=bearer(campaigns_only)), grpc.StatusCode.PERMISSION_DENIED)
    # admin implies every scope of the tenant.
    assert (await stub.GetPack(GET, metadata=bearer(make_token("alpha", ["admin"])))).size == 42
    # The bootstrap key is a system admin: it has no tenant, so it cannot call tenant APIs.
    await expect(stub.GetPack(GET, metadata=BOOT), grpc.StatusCode.PERMISSION_DENIED, "TENANT_REQUIRED")
    assert backend.servicer.calls["GetPack"] == 2


async def test_revoked_key_and_deleted_tenant(fake_stack) -> None:
    stack, _ = fake_stack
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    created = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"]), metadata=BOOT
    )
    key = (("x-api-key", created.secret),)
    assert (await stub.GetPack(GET, metadata=key)).size == 42
    await admin.RevokeApiKey(gw.RevokeApiKeyRequest(name=created.api_key.name), metadata=BOOT)
    await expect(stub.GetPack(GET, metadata=key), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")

    # Tenant beta is deleted: its key and its tokens are dead, and the id cannot be taken again.
    beta_get = pb.GetPackRequest(name="tenants/beta/packs/p1")
    beta_token = make_token("beta", ALL)
    assert (await stub.GetPack(beta_get, metadata=stack.auth("beta"))).size == 42
    await admin.DeleteTenant(gw.DeleteTenantRequest(name="tenants/beta"), metadata=BOOT)
    await expect(stub.GetPack(beta_get, metadata=stack.auth("beta")), grpc.StatusCode.UNAUTHENTICATED)
    await expect(stub.GetPack(beta_get, metadata=bearer(beta_token)), grpc.StatusCode.UNAUTHENTICATED)
    await expect(
        admin.CreateTenant(gw.CreateTenantRequest(tenant_id="beta"), metadata=BOOT),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    # Still dead after the re-creation attempt.
    await expect(stub.GetPack(beta_get, metadata=stack.auth("beta")), grpc.StatusCode.UNAUTHENTICATED)
    await expect(
        admin.DeleteTenant(gw.DeleteTenantRequest(name="tenants/beta"), metadata=BOOT),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_admin_rules(fake_stack) -> None:
    stack, _ = fake_stack
    admin = gw_grpc.GatewayServiceStub(stack.channel)
    alpha_admin = (
        await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["admin"]), metadata=BOOT
        )
    ).secret
    as_alpha = (("x-api-key", alpha_admin),)
    # A tenant admin manages its own keys ...
    own = await admin.CreateApiKey(
        gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["packs.read"]), metadata=as_alpha
    )
    assert own.secret.startswith("fc_") and own.api_key.name.startswith("tenants/alpha/apiKeys/")
    # ... but not another tenant's (NOT_FOUND, as if beta did not exist), nor tenants themselves.
    await expect(
        admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="tenants/beta", scopes=["admin"]), metadata=as_alpha
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect(
        admin.CreateTenant(gw.CreateTenantRequest(tenant_id="gamma"), metadata=as_alpha),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect(
        admin.CreateTenant(gw.CreateTenantRequest(tenant_id="gamma"), metadata=stack.auth("alpha")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Validation.
    await expect(
        admin.CreateApiKey(gw.CreateApiKeyRequest(parent="tenants/alpha", scopes=["root"]), metadata=BOOT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect(
        admin.CreateTenant(gw.CreateTenantRequest(tenant_id="Bad_Id"), metadata=BOOT),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect(
        admin.CreateApiKey(gw.CreateApiKeyRequest(parent="tenants/ghost", scopes=["admin"]), metadata=BOOT),
        grpc.StatusCode.NOT_FOUND,
    )
    # A system-admin JWT (no tenant claim) may create tenants.
    system = make_token(None, ["admin"])
    tenant = await admin.CreateTenant(gw.CreateTenantRequest(tenant_id="gamma"), metadata=bearer(system))
    assert tenant.name == "tenants/gamma"
    await expect(
        admin.CreateTenant(gw.CreateTenantRequest(tenant_id="delta"), metadata=bearer(make_token(None, ALL))),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_keys_are_stored_hashed(fake_stack) -> None:
    stack, _ = fake_stack
    store = stack.app.gateway.store
    raw = stack.keys["alpha"]
    _, key_id, secret = raw.split("_", 2)
    record = store.get_key(key_id)
    assert record is not None and record.secret_sha256 != secret.encode()
    dump = store.dump()
    assert secret not in dump and raw not in dump


async def test_only_the_assertion_and_request_id_reach_the_backend(fake_stack) -> None:
    stack, backend = fake_stack
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    metadata = (
        *stack.auth("alpha"),
        ("x-flashcrowd-tenant", "beta"),
        ("x-flashcrowd-admin", "1"),
        ("x-request-id", "req-42"),
        ("x-custom", "dropped"),
    )
    await stub.GetPack(GET, metadata=metadata)
    last = backend.servicer.seen[-1]
    seen = last.metadata
    assert last.caller is not None and last.caller.kind == "tenant" and last.caller.tenant == "alpha"
    assert seen["x-request-id"] == "req-42" and "x-flashcrowd-assertion" in seen
    assert not {"x-api-key", "authorization", "x-flashcrowd-admin", "x-flashcrowd-tenant", "x-custom"} & set(
        seen
    )
    # A malformed request id is not forwarded either.
    await stub.GetPack(GET, metadata=(*stack.auth("alpha"), ("x-request-id", "a b;c")))
    assert "x-request-id" not in backend.servicer.seen[-1].metadata


async def test_grpc_admits_before_parsing(fake_stack) -> None:
    """gRPC reads a message before the handler runs, but the handler admits the call before parsing
    it: garbage from an unauthenticated caller is UNAUTHENTICATED, never INVALID_ARGUMENT."""
    stack, backend = fake_stack
    garbage = b"\xff\xff\xff\xff" * 1000
    call = stack.channel.unary_unary("/flashcrowd.audience.v1.AudienceService/GetPack")
    await expect(call(garbage), grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS")
    await expect(call(garbage, metadata=stack.auth("alpha")), grpc.StatusCode.INVALID_ARGUMENT)
    assert backend.servicer.calls["GetPack"] == 0
