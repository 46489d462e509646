"""Client addresses from trusted proxies' forwarding headers (unit), and end to end: a spoofed
X-Forwarded-For is ignored from an untrusted peer and believed from a trusted one, over HTTP and gRPC."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from services.gateway.client_address import ClientAddresses, grpc_peer_host, parse_address
from services.gateway.config import GatewaySettings
from services.runtime import ConfigError, error_details, load_settings

from .conftest import BOOTSTRAP, PLATFORM, gateway_settings, start_stack

PROXIES = ["10.0.0.0/8", "192.0.2.7"]


@pytest.mark.parametrize(
    "peer, forwarded, expected",
    [
        # An untrusted peer: its own address, whatever it claims.
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),
        # A trusted proxy: the right-most address that is not a trusted proxy.
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1, 10.9.9.9"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6", "198.51.100.1, 192.0.2.7"], "198.51.100.1"),  # several header lines
        # Only trusted proxies in the chain: the left-most.
        ("10.1.2.3", ["10.0.0.9, 192.0.2.7"], "10.0.0.9"),
        # A trusted proxy without a header: the proxy itself.
        ("10.1.2.3", [], "10.1.2.3"),
        # Garbage ends the walk at the last address a trusted proxy vouched for.
        ("10.1.2.3", ["6.6.6.6, not-an-ip"], "10.1.2.3"),
        ("10.1.2.3", ["not-an-ip, 10.0.0.4"], "10.0.0.4"),
        # Ports, IPv6, IPv4-mapped IPv6.
        ("10.1.2.3", ["198.51.100.1:5555"], "198.51.100.1"),
        ("10.1.2.3", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:10.1.2.3", ["2001:db8::2"], "2001:db8::2"),
    ],
)
def test_x_forwarded_for(peer: str, forwarded: list[str], expected: str) -> None:
    assert ClientAddresses(PROXIES).resolve(peer, forwarded) == expected


def test_forwarded_header() -> None:
    addresses = ClientAddresses(PROXIES, "forwarded")
    value = 'for=6.6.6.6, for="[2001:db8::1]:4711";proto=https, For=10.0.0.8;by=10.0.0.1'
    assert addresses.resolve("10.1.2.3", [value]) == "2001:db8::1"
    assert addresses.resolve("10.1.2.3", ["for=unknown"]) == "10.1.2.3"
    assert addresses.resolve("10.1.2.3", ["proto=http"]) == "10.1.2.3"


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert ClientAddresses().resolve("10.1.2.3", ["198.51.100.1"]) == "10.1.2.3"
    assert ClientAddresses(PROXIES).resolve("unix:/tmp/socket", ["198.51.100.1"]) == "unix:/tmp/socket"


def test_parsing_helpers() -> None:
    assert grpc_peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert grpc_peer_host("ipv6:[::1]:5000") == "::1"
    assert parse_address(" 1.2.3.4 ") is not None and parse_address("_hidden") is None


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHCROWD_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7")
    assert load_settings(GatewaySettings).trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32")
    monkeypatch.setenv("FLASHCROWD_TRUSTED_PROXIES", '["fd00::/8"]')
    assert load_settings(GatewaySettings).trusted_proxies == ("fd00::/8",)
    monkeypatch.setenv("FLASHCROWD_TRUSTED_PROXIES", "10.0.0.0/8,nonsense")
    with pytest.raises(ConfigError, match="FLASHCROWD_TRUSTED_PROXIES"):
        load_settings(GatewaySettings)
    monkeypatch.setenv("FLASHCROWD_TRUSTED_PROXIES", "")
    monkeypatch.setenv("FLASHCROWD_CLIENT_ADDRESS_HEADER", "x-real-ip")
    with pytest.raises(ConfigError, match="FLASHCROWD_CLIENT_ADDRESS_HEADER"):
        load_settings(GatewaySettings)


BAD = "fc_0123456789abcdef_" + "x" * 43


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarded_addresses_end_to_end(tmp_path, rsa_public_pem, fake_backend, trusted: bool) -> None:
    """Failed authentications are limited per client address: with the loopback trusted as a proxy,
    two clients behind it (different X-Forwarded-For) have separate budgets and the audit log names
    the forwarded address; without it, the header is a spoof and both share the peer's budget."""
    settings = gateway_settings(
        tmp_path,
        rsa_public_pem,
        audience_target=fake_backend.target,
        auth_failure_limit={"rate": 0.01, "burst": 2},
        trusted_proxies="127.0.0.0/8" if trusted else "",
    )
    stack = await start_stack(settings, {})
    try:
        stub = pb_grpc.AudienceServiceStub(stack.channel)
        get = pb.GetPackRequest(name="tenants/alpha/packs/p1")

        async def grpc_code(forwarded_for: str) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetPack(get, metadata=(("x-api-key", BAD), ("x-forwarded-for", forwarded_for)))
            return caught.value.code()

        assert [await grpc_code("198.51.100.1") for _ in range(3)][-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = await grpc_code("198.51.100.2")
        assert other == (grpc.StatusCode.UNAUTHENTICATED if trusted else grpc.StatusCode.RESOURCE_EXHAUSTED)

        async with aiohttp.ClientSession(base_url=stack.http_url) as session:

            async def http_status(forwarded_for: str) -> int:
                headers = {"X-Api-Key": BAD, "X-Forwarded-For": forwarded_for}
                async with session.get("/v1/tenants/alpha/packs/p1", headers=headers) as response:
                    return response.status

            assert await http_status("198.51.100.1") == 429  # same budget as over gRPC
            assert await http_status("198.51.100.3") == (401 if trusted else 429)

            # The audit log records the client address the gateway decided on.
            boot = {"X-Api-Key": BOOTSTRAP, "X-Forwarded-For": "198.51.100.9"}
            async with session.post(
                "/v1/platform/apiKeys", json={"scopes": PLATFORM}, headers=boot
            ) as response:
                assert response.status == 200, await response.text()
        admin = gw_grpc.GatewayServiceStub(stack.channel)
        boot_md = (("x-api-key", BOOTSTRAP),)
        listed = await admin.ListAuditEntries(
            gw.ListAuditEntriesRequest(parent="tenants/-", method="CreateApiKey"), metadata=boot_md
        )
        addresses = {entry.client_address for entry in listed.audit_entries if entry.transport == "http"}
        assert addresses == {"198.51.100.9" if trusted else "127.0.0.1"}
        details = error_details(await _refused(stub, get))
        assert details.reason == "AUTH_FAILURES"
    finally:
        await stack.close()


async def _refused(stub: pb_grpc.AudienceServiceStub, get: pb.GetPackRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPack(get, metadata=(("x-api-key", BAD), ("x-forwarded-for", "198.51.100.1")))
    return caught.value
