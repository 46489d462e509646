"""HTTP/JSON transcoding with curl-like requests (aiohttp client, raw sockets for malformed HTTP)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from services.gateway.openapi import openapi_document
from services.gateway.transcoding import all_routes

from .conftest import ALL, BOOTSTRAP, gateway_settings, make_token, start_stack


@pytest.fixture(scope="module")
async def http(real_stack):  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession(base_url=real_stack.gateway.http_url) as session:
        yield session


def key(stack, tenant: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"X-Api-Key": stack.gateway.keys[tenant]}


async def wait_operation(http, stack, name: str) -> dict:  # type: ignore[no-untyped-def]
    async with http.post(
        f"/v1/{name}:wait", json={"timeout": "60s"}, headers=key(stack, "alpha")
    ) as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["done"] is True, body
    return body


async def test_pack_lifecycle_over_http(http, real_stack) -> None:
    alpha = key(real_stack, "alpha")
    spec = {"shortcut": {"kind": "KIND_CLICKERS", "window": {"last": "259200s"}}}
    async with http.post(
        "/v1/tenants/alpha/packs?packId=http-clickers",
        json={"displayName": "clickers", "spec": spec, "labels": {"via": "http"}},
        headers=alpha,
    ) as response:
        operation = await response.json()
        assert response.status == 200, operation
    assert operation["name"].startswith("tenants/alpha/operations/")
    done = await wait_operation(http, real_stack, operation["name"])
    assert done["response"]["@type"].endswith("flashcrowd.audience.v1.Pack")
    assert done["response"]["name"] == "tenants/alpha/packs/http-clickers"

    async with http.get("/v1/tenants/alpha/packs/http-clickers", headers=alpha) as response:
        pack = await response.json()
        assert response.status == 200, pack
    assert pack["state"] == "STATE_READY" and int(pack["size"]) > 0 and pack["labels"] == {"via": "http"}

    # Bearer JWT works the same; query parameters fill the list request.
    bearer = {"Authorization": f"Bearer {make_token('alpha', ['packs.read'])}"}
    async with http.get(
        "/v1/tenants/alpha/packs", params={"pageSize": "10", "filter": "labels.via=http"}, headers=bearer
    ) as response:
        listed = await response.json()
        assert response.status == 200, listed
    assert [p["name"] for p in listed["packs"]] == ["tenants/alpha/packs/http-clickers"]

    async with http.get("/v1/tenants/alpha/packs/http-clickers/persona?topN=3", headers=alpha) as response:
        persona = await response.json()
        assert response.status == 200, persona
    assert persona["pack"] == "tenants/alpha/packs/http-clickers"
    assert all(len(d["buckets"]) <= 3 for d in persona["dimensions"])

    check = {"packs": ["tenants/alpha/packs/http-clickers"], "userIds": ["1", "2", "3"]}
    # Members are for the platform's services: the tenant itself is refused, a platform key answers.
    async with http.post("/v1/tenants/alpha/packs:checkMembership", json=check, headers=alpha) as response:
        refused = await response.json()
        assert response.status == 403, refused
    assert refused["error"]["details"][0]["reason"] == "MISSING_SCOPE"
    platform = key(real_stack, "platform")
    async with http.post("/v1/tenants/alpha/packs:checkMembership", json=check, headers=platform) as response:
        membership = await response.json()
        assert response.status == 200, membership
    assert len(membership["results"][0]["members"]) == 3

    async with http.get("/v1/whoami", headers=alpha) as response:
        assert (await response.json())["tenant"] == "alpha"


async def test_campaign_report_over_http(http, real_stack) -> None:
    alpha = key(real_stack, "alpha")
    spec = {"shortcut": {"kind": "KIND_CLICKERS", "window": {"last": "259200s"}}}
    async with http.post(
        "/v1/tenants/alpha/packs?packId=http-audience", json={"spec": spec}, headers=alpha
    ) as r:
        operation = await r.json()
    await wait_operation(http, real_stack, operation["name"])
    async with http.post(
        "/v1/tenants/alpha/couponTemplates?couponTemplateId=http-tpl",
        json={"fixedAmount": {"amountFen": "500"}, "totalStock": "1000", "validFor": "86400s"},
        headers=alpha,
    ) as response:
        template = await response.json()
        assert response.status == 200, template
    async with http.post(
        "/v1/tenants/alpha/campaigns?campaignId=http-campaign",
        json={"audiencePack": "tenants/alpha/packs/http-audience", "couponTemplate": template["name"]},
        headers=alpha,
    ) as response:
        campaign = await response.json()
        assert response.status == 200, campaign
    async with http.post(f"/v1/{campaign['name']}:launch", json={}, headers=alpha) as response:
        launch = await response.json()
        assert response.status == 200, launch
    await wait_operation(http, real_stack, launch["name"])
    async with http.get(f"/v1/{campaign['name']}/report", headers=alpha) as response:
        report = await response.json()
        assert response.status == 200, report
    assert report["campaign"] == campaign["name"] and report["arms"]
    # Beta cannot see it: 404 with the google.rpc.Status details.
    async with http.get(f"/v1/{campaign['name']}/report", headers=key(real_stack, "beta")) as response:
        error = await response.json()
        assert response.status == 404
    assert error["error"]["status"] == "NOT_FOUND"


async def test_errors_are_json_status(http, real_stack) -> None:
    async with http.get("/v1/tenants/alpha/packs/nope") as response:
        body = await response.json()
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    info = body["error"]["details"][0]
    assert body["error"]["status"] == "UNAUTHENTICATED"
    assert (
        info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
        and info["reason"] == "MISSING_CREDENTIALS"
    )

    alpha = key(real_stack, "alpha")
    async with http.get("/v1/tenants/alpha/packs/nope", headers=alpha) as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"
    async with http.get("/v1/tenants/alpha/packs/x", headers={"X-Api-Key": BOOTSTRAP}) as response:
        assert response.status == 403
    async with http.post("/v1/tenants/alpha/packs?packId=bad", data=b"{not json", headers=alpha) as response:
        assert response.status == 400
    async with http.post(
        "/v1/tenants/alpha/packs?packId=bad", json={"noSuchField": 1}, headers=alpha
    ) as response:
        body = await response.json()
        assert response.status == 400
    assert body["error"]["details"][1]["@type"].endswith("BadRequest")
    async with http.post("/v1/tenants/alpha/packs?packId=bad", json=[1, 2], headers=alpha) as response:
        assert response.status == 400
    async with http.get("/v1/tenants/alpha/packs?pageSize=abc", headers=alpha) as response:
        assert response.status == 400
    async with http.get("/v1/nowhere", headers=alpha) as response:
        assert response.status == 404
        assert (await response.json())["error"]["status"] == "NOT_FOUND"
    async with http.patch("/v1/tenants/alpha/packs/x", headers=alpha) as response:
        assert response.status == 405
        assert {m.strip() for m in response.headers["Allow"].split(",")} == {"DELETE", "GET"}
        assert "PATCH is not allowed here" in (await response.json())["error"]["message"]
    async with http.get(
        "/v1/tenants/alpha/packs/x", headers={**alpha, "X-Server-Timeout": "soon"}
    ) as response:
        assert response.status == 400
    # Path segments are percent-decoded before the tenant check.
    async with http.get("/v1/tenants/alpha%2F..%2Fbeta/packs/x", headers=alpha) as response:
        assert response.status in (400, 404)


async def test_rate_limit_over_http(tmp_path, rsa_public_pem, fake_backend) -> None:
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        rate_limits={"AudienceService/GetPack": {"rate": 1, "burst": 1}},
    )
    stack = await start_stack(settings, {"alpha": ALL})
    try:
        async with aiohttp.ClientSession(base_url=stack.http_url) as session:
            headers = {"X-Api-Key": stack.keys["alpha"]}
            async with session.get("/v1/tenants/alpha/packs/p1", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["size"] == "42"
            async with session.get("/v1/tenants/alpha/packs/p1", headers=headers) as response:
                body = await response.json()
                assert response.status == 429
                assert response.headers["Retry-After"] == "1"
            types = [detail["@type"].rsplit(".", 1)[-1] for detail in body["error"]["details"]]
            assert types == ["ErrorInfo", "RetryInfo", "QuotaFailure"]
            # The HTTP deadline header reaches the backend, minus the margin.
            async with session.get(
                "/v1/tenants/alpha/packs/p1", headers={**headers, "X-Server-Timeout": "5"}
            ) as response:
                assert response.status in (200, 429)
    finally:
        await stack.close()


async def test_openapi_lists_every_route(http) -> None:
    async with http.get("/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document == json.loads(json.dumps(openapi_document()))
    assert document["openapi"].startswith("3.")
    operations = {
        (method.upper(), path): op for path, item in document["paths"].items() for method, op in item.items()
    }
    for route in all_routes():
        assert (route.http_method, route.openapi_path) in operations
    get_pack = operations[("GET", "/v1/tenants/{tenant}/packs/{pack}")]
    assert get_pack["operationId"] == "AudienceService_GetPack"
    assert {p["name"] for p in get_pack["parameters"]} == {"tenant", "pack"}
    assert "/v1/tenants/{tenant}/packs/{pack}/persona" in document["paths"]
    assert "/v1/tenants/{tenant}/campaigns/{campaign}/report" in document["paths"]
    create = operations[("POST", "/v1/tenants/{tenant}/packs")]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("audience.v1.Pack")
    pack = document["components"]["schemas"]["flashcrowd.audience.v1.Pack"]
    assert pack["properties"]["size"] == {"type": "string", "format": "int64"}
    assert pack["properties"]["state"]["enum"][0] == "STATE_UNSPECIFIED"
    # Every $ref resolves.
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in document["components"]["schemas"], ref


async def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0
    return status, response


async def test_header_injection_over_http(real_stack) -> None:
    gateway = real_stack.gateway
    port = gateway.app.http_port
    alpha = gateway.keys["alpha"].encode()
    # A CRLF smuggling a trusted header is just another header, which the gateway never trusts:
    # alpha stays alpha, so beta's pack is NOT_FOUND.
    status, _ = await raw_http(
        port,
        b"GET /v1/tenants/beta/packs/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: "
        + alpha
        + b"\r\nX-Flashcrowd-Tenant: beta\r\nConnection: close\r\n\r\n",
    )
    assert status == 404
    # Bare CR, NUL, or obs-fold in a header value: refused by the parser.
    for value in (b"abc\rX-Flashcrowd-Tenant: beta", b"abc\x00def", b"abc\r\n continued"):
        status, _ = await raw_http(
            port,
            b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + value + b"\r\nConnection: close\r\n\r\n",
        )
        assert status in (400, 401), status
    # Huge header: refused before any handler runs.
    status, _ = await raw_http(
        port,
        b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nX-Api-Key: "
        + b"a" * 100_000
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status in (400, 413, 431), status
    # Huge body of an admitted call: 413 (a caller without the scope is refused before: 403).
    async with aiohttp.ClientSession(base_url=gateway.http_url) as session:
        big = {"packs": ["tenants/alpha/packs/x"], "userIds": ["1"] * 1_000_000}
        async with session.post(
            "/v1/tenants/alpha/packs:checkMembership",
            json=big,
            headers={"X-Api-Key": gateway.keys["platform"]},
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["status"] == "RESOURCE_EXHAUSTED"


async def test_no_body_is_read_or_parsed_before_admission(
    tmp_path, rsa_public_pem, fake_backend, monkeypatch
) -> None:
    """A 3.7 MiB body (under the 4 MiB limit) costs nothing unless its caller is admitted: anonymous,
    wrong-key and wrong-scope requests are answered 401/403 with the body unread and unparsed."""
    import aiohttp.web_request

    from services.gateway import http as gateway_http

    settings = gateway_settings(tmp_path, rsa_public_pem, audience_target=fake_backend.target)
    stack = await start_stack(settings, {"alpha": ALL})
    reads: list[int] = []
    builds: list[str] = []
    real_read, real_build = aiohttp.web_request.BaseRequest.read, gateway_http.build_request

    async def counting_read(self):  # type: ignore[no-untyped-def]
        data = await real_read(self)
        reads.append(len(data))
        return data

    def counting_build(route, *args):  # type: ignore[no-untyped-def]
        builds.append(route.info.name)
        return real_build(route, *args)

    monkeypatch.setattr(aiohttp.web_request.BaseRequest, "read", counting_read)
    monkeypatch.setattr(gateway_http, "build_request", counting_build)
    body = b'{"packs": ["tenants/alpha/packs/p1"], "userIds": [' + b'"1",' * 970_000 + b'"1"]}'
    assert 3.6 * 2**20 < len(body) < 4 * 2**20
    path = "/v1/tenants/alpha/packs:checkMembership"
    try:
        async with aiohttp.ClientSession(base_url=stack.http_url) as session:
            for headers, status in (
                ({}, 401),
                ({"X-Api-Key": "fc_0123456789abcdef_" + "x" * 43}, 401),
                ({"Authorization": "Bearer not-a-token"}, 401),
                ({"X-Api-Key": stack.keys["alpha"]}, 403),  # a tenant key: no members.read
            ):
                async with session.post(
                    path, data=body, headers={**headers, "Content-Type": "application/json"}
                ) as response:
                    assert response.status == status, await response.text()
                    assert reads == [] and builds == []
                    assert response.headers.get("Connection", "").lower() == "close"
            # Admitted: read once, parsed once.
            small = {"packs": ["tenants/alpha/packs/p1"], "userIds": ["1", "2"]}
            async with session.post(
                path, json=small, headers={"X-Api-Key": stack.keys["platform"]}
            ) as response:
                assert response.status == 200, await response.text()
            assert len(reads) == 1 and builds == ["CheckMembership"]
            # Declared too large: 413 for an admitted caller, still without reading.
            async with session.post(
                path,
                data=b"{" + b" " * (4 * 2**20) + b"}",
                headers={"X-Api-Key": stack.keys["platform"], "Content-Type": "application/json"},
            ) as response:
                assert response.status == 413
                assert (await response.json())["error"]["status"] == "RESOURCE_EXHAUSTED"
            assert len(reads) == 1
    finally:
        await stack.close()
