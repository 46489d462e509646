"""Client addresses from trusted proxies' forwarding headers."""

from __future__ import annotations

import pytest

from services.gateway.client_address import ClientAddresses, grpc_peer_host, parse_address

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
