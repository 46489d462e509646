"""The caller's address: the peer, or what trusted proxies say in forwarding headers.

Limits that key on an address (failed authentications) and the audit log need the address of the
client, not of the ingress in front of the gateway. Forwarding headers are written by whoever sent
the request, so they are believed only as far as a chain of **trusted proxies**
(``FLASHCROWD_TRUSTED_PROXIES``, CIDRs or addresses) vouches for them:

* the peer is not a trusted proxy: the peer's address, whatever headers came along (spoofed
  ``X-Forwarded-For`` from a client is ignored);
* the peer is a trusted proxy: walk the forwarded chain from the right (each proxy appends the
  address it received the request from) and take the right-most address that is not a trusted
  proxy; a chain made only of trusted proxies gives its left-most address;
* an entry that is not an address (``unknown``, an obfuscated ``_node``, garbage) ends the walk: the
  last address vouched for (a trusted proxy's) is the answer, so a client cannot pick its own key
  by sending rubbish.

Which header is read is configured (``FLASHCROWD_CLIENT_ADDRESS_HEADER``: ``x-forwarded-for``, the
default, or ``forwarded``, RFC 7239 ``for=``), never guessed: the header the proxies do not manage
passes through from the client untouched, so reading it would let the client choose. gRPC reads the
same names from the call's metadata. Several header lines are one list, in order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Literal

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ForwardingHeader = Literal["x-forwarded-for", "forwarded"]

# for=192.0.2.60 / for="[2001:db8::1]:4711" / For="_hidden" (parameter names are case-insensitive).
_FORWARDED_FOR = re.compile(r'(?:^|;)\s*for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)
_MAX_HOPS = 32


def parse_networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """``["10.0.0.0/8", "192.0.2.7"]`` -> networks; ``ValueError`` naming a bad entry."""
    networks = []
    for value in values:
        text = value.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text[:80]!r} is not an address or CIDR") from None
    return tuple(networks)


def parse_address(text: str) -> IpAddress | None:
    """An address with or without port (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``), or None."""
    text = text.strip().strip('"').strip()
    if not text:
        return None
    if text.startswith("["):
        host, _, _ = text[1:].partition("]")
    elif text.count(":") == 1:
        host = text.partition(":")[0]  # IPv4 with a port
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 is 10.0.0.1
    return mapped if mapped is not None else address


def grpc_peer_host(peer: str) -> str:
    """gRPC's ``ipv4:10.0.0.1:5123`` / ``ipv6:[::1]:5123`` -> the address without the port."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def forwarded_chain(values: Sequence[str], header: ForwardingHeader) -> list[str]:
    """The entries of the forwarding header lines, left to right (``for=`` values of ``forwarded``)."""
    entries: list[str] = []
    for value in values:
        for element in value.split(","):
            if header == "forwarded":
                match = _FORWARDED_FOR.search(element)
                entries.append(match.group(1) if match else "")
            else:
                entries.append(element)
    return entries[-_MAX_HOPS:]


class ClientAddresses:
    """Resolves the client address of a call from its peer address and forwarding headers."""

    def __init__(self, trusted: Iterable[str] = (), header: ForwardingHeader = "x-forwarded-for") -> None:
        self.trusted = parse_networks(trusted)
        self.header: ForwardingHeader = header

    def is_trusted(self, address: IpAddress) -> bool:
        return any(address in network for network in self.trusted)

    def resolve(self, peer: str, forwarded: Sequence[str] = ()) -> str:
        """The client's address as text (``peer`` itself when it is not an address, e.g. a socket)."""
        address = parse_address(peer)
        if address is None:
            return peer
        if not self.trusted or not forwarded or not self.is_trusted(address):
            return str(address)
        for entry in reversed(forwarded_chain(forwarded, self.header)):
            hop = parse_address(entry)
            if hop is None:
                break  # not an address: keep the last one a trusted proxy vouched for
            address = hop
            if not self.is_trusted(hop):
                break
        return str(address)


__all__ = ["ClientAddresses", "forwarded_chain", "grpc_peer_host", "parse_address", "parse_networks"]
