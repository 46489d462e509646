"""Resource names of the audience service: ``tenants/{tenant}/packs/{pack}``.

Tenant and pack ids are 1-63 characters of ``[a-z0-9-]`` starting with a letter (AIP-122 style), so
that they are safe as object-key segments and in URLs without escaping.
"""

from __future__ import annotations

import re

from services.runtime.tenant_ids import TENANT_ID_RULE, valid_tenant_id

__all__ = [
    "ID_RULE",
    "PACK_TYPE",
    "is_valid_id",
    "pack_name",
    "parse_pack_name",
    "parse_tenant_name",
    "tenant_name",
]

#: Resource type used in errors (``NotFound(PACK_TYPE, name)``).
PACK_TYPE = "flashcrowd.dev/Pack"
#: Human-readable id rule, quoted in error messages.
ID_RULE = "1-63 characters of [a-z0-9-], starting with a letter"

_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_PACK_NAME = re.compile(r"tenants/([^/]+)/packs/([^/]+)")
_TENANT_NAME = re.compile(r"tenants/([^/]+)")


def is_valid_id(value: str) -> bool:
    """Does ``value`` follow the id rule (tenants and packs alike)?"""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def pack_name(tenant: str, pack_id: str) -> str:
    return f"tenants/{tenant}/packs/{pack_id}"


def tenant_name(tenant: str) -> str:
    return f"tenants/{tenant}"


def parse_pack_name(name: str) -> tuple[str, str]:
    """``tenants/t1/packs/p1`` -> ``("t1", "p1")``; ``ValueError`` saying what is wrong otherwise."""
    match = _PACK_NAME.fullmatch(name or "")
    if match is None:
        raise ValueError(f"{name!r} is not a pack name: expected tenants/{{tenant}}/packs/{{pack}}")
    tenant, pack = match.groups()
    if not valid_tenant_id(tenant):
        raise ValueError(f"tenant id {tenant!r} in {name!r} must be {TENANT_ID_RULE}")
    if not is_valid_id(pack):
        raise ValueError(f"pack id {pack!r} in {name!r} must be {ID_RULE}")
    return tenant, pack


def parse_tenant_name(name: str) -> str:
    """``tenants/t1`` -> ``"t1"``; ``ValueError`` otherwise."""
    match = _TENANT_NAME.fullmatch(name or "")
    if match is None or not valid_tenant_id(match.group(1)):
        raise ValueError(f"{name!r} is not a tenant name: expected tenants/{{tenant}} with the id {ID_RULE}")
    return match.group(1)
