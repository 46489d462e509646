"""The one rule for tenant ids, shared by the gateway, audience, retarget and the sale monitor.

A tenant id is 1-63 characters of ``[a-z0-9-]``, starts with a letter and does not end with a hyphen
(AIP-122 resource id style): safe as an object-key segment, a URL path segment and a database key
without escaping. Every service validates with ``valid_tenant_id`` so that an id one of them accepts
is never refused by another.
"""

from __future__ import annotations

import re

#: Human-readable rule, quoted in error messages.
TENANT_ID_RULE = "1-63 characters of [a-z0-9-], starting with a letter and not ending with '-'"
TENANT_ID = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")


def valid_tenant_id(value: object) -> bool:
    """Does ``value`` follow the tenant id rule?"""
    return isinstance(value, str) and TENANT_ID.fullmatch(value) is not None


__all__ = ["TENANT_ID", "TENANT_ID_RULE", "valid_tenant_id"]
