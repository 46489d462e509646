"""The calling tenant of an audience RPC, and the resource names that carry it.

Every call carries the gateway's signed assertion (services/runtime/assertion.py; calls without one
never reach a servicer). A tenant principal may touch only resources of its own tenant: any other
fails with NOT_FOUND exactly as if the resource did not exist, so that one tenant cannot probe
another's pack ids. Platform principals (the platform's services and jobs) act for every tenant, and
only they get member-level data (``require_members``).

Every RPC goes through ``Tenancy.authorize``; names are parsed with the ``parse_*`` helpers, which
raise ``InvalidArgument`` naming the request field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from services.audience.names import ID_RULE, PACK_TYPE, is_valid_id, pack_name, tenant_name
from services.audience.names import parse_pack_name as _parse_pack_name
from services.audience.names import parse_tenant_name as _parse_tenant_name
from services.runtime import InvalidArgument, NotFound
from services.runtime.assertion import Caller, caller_of, require_platform
from services.runtime.scopes import MEMBERS_READ
from services.runtime.tenant_ids import valid_tenant_id

_OPERATION_NAME = re.compile(r"tenants/([^/]+)/operations/([a-z0-9]{1,64})")
_OPERATIONS_PARENT = re.compile(r"tenants/([^/]+?)(?:/operations)?")

_LIVE_PACK_NAME = re.compile(r"tenants/([^/]+)/livePacks/([^/]+)")

TENANT_TYPE = "flashcrowd.dev/Tenant"
LIVE_PACK_TYPE = "flashcrowd.dev/LivePack"
OPERATION_TYPE = "google.longrunning.Operation"


def check_id(value: str, field: str, what: str = "id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not is_valid_id(value):
        raise InvalidArgument(field, f"invalid {what} {value[:80]!r}: {ID_RULE}")
    return value


def operation_name(tenant: str, operation_id: str) -> str:
    return f"tenants/{tenant}/operations/{operation_id}"


def parse_parent(value: str, field: str = "parent") -> str:
    """``tenants/{t}`` -> ``t``."""
    if not value:
        raise InvalidArgument(field, "required (tenants/{tenant})")
    try:
        return _parse_tenant_name(value)
    except ValueError as error:
        raise InvalidArgument(field, str(error)[:300]) from None


def parse_pack_name(value: str, field: str = "name") -> tuple[str, str]:
    """``tenants/{t}/packs/{p}`` -> ``(t, p)``."""
    if not value:
        raise InvalidArgument(field, "required (tenants/{tenant}/packs/{pack})")
    try:
        return _parse_pack_name(value)
    except ValueError as error:
        raise InvalidArgument(field, str(error)[:300]) from None


def is_live_pack_name(value: str) -> bool:
    """Does ``value`` name a live pack (``tenants/{t}/livePacks/{id}``), well-formed or not?"""
    return "/livePacks/" in value


def parse_live_pack_name(value: str, field: str = "name") -> tuple[str, str]:
    """``tenants/{t}/livePacks/{id}`` -> ``(t, id)``."""
    match = _LIVE_PACK_NAME.fullmatch(value)
    if match is None or not valid_tenant_id(match.group(1)) or not is_valid_id(match.group(2)):
        raise InvalidArgument(
            field, f"expected tenants/{{tenant}}/livePacks/{{id}} ({ID_RULE}), got {value[:120]!r}"
        )
    return match.group(1), match.group(2)


def parse_operation_name(value: str, field: str = "name") -> tuple[str, str]:
    """``tenants/{t}/operations/{id}`` -> ``(t, id)``."""
    if not value:
        raise InvalidArgument(field, "required (tenants/{tenant}/operations/{id})")
    match = _OPERATION_NAME.fullmatch(value)
    if match is None or not valid_tenant_id(match.group(1)):
        raise InvalidArgument(field, f"expected tenants/{{tenant}}/operations/{{id}}, got {value[:120]!r}")
    return match.group(1), match.group(2)


def parse_operations_parent(value: str, field: str = "name") -> str:
    """ListOperations' ``name``: ``tenants/{t}`` or ``tenants/{t}/operations`` -> ``t``."""
    if not value:
        raise InvalidArgument(field, "required (tenants/{tenant})")
    match = _OPERATIONS_PARENT.fullmatch(value)
    if match is None or not valid_tenant_id(match.group(1)):
        raise InvalidArgument(field, f"expected tenants/{{tenant}}, got {value[:120]!r}")
    return match.group(1)


@dataclass(frozen=True)
class Tenancy:
    """Checks a request's resources against the caller the gateway's assertion names."""

    def caller(self, context: grpc.aio.ServicerContext | None) -> Caller | None:
        """The verified caller, or None for a servicer called without a context (unit tests)."""
        return caller_of(context)

    def trusted_tenant(self, context: grpc.aio.ServicerContext | None) -> str | None:
        """The tenant a tenant principal is bound to; None for platform principals."""
        caller = caller_of(context)
        return caller.tenant if caller is not None else None

    def authorize(
        self,
        context: grpc.aio.ServicerContext | None,
        tenant: str,
        *,
        resource_type: str = PACK_TYPE,
        name: str = "",
    ) -> str:
        """Return ``tenant`` if the caller may act on it, else raise NOT_FOUND for ``name``.

        ``name`` is the resource the request addressed (``tenants/t/packs/p``); it defaults to the
        tenant itself, for collection calls (ListPacks, CheckMembership).
        """
        caller = caller_of(context)
        if caller is not None and not caller.may_act_for(tenant):
            if not name:
                resource_type, name = TENANT_TYPE, tenant_name(tenant)
            raise NotFound(resource_type, name)
        return tenant

    def require_members(self, context: grpc.aio.ServicerContext | None) -> None:
        """Member-level reads (export, membership): platform principals with ``members.read`` only."""
        require_platform(context, MEMBERS_READ)


__all__ = [
    "LIVE_PACK_TYPE",
    "OPERATION_TYPE",
    "PACK_TYPE",
    "TENANT_TYPE",
    "Tenancy",
    "check_id",
    "is_live_pack_name",
    "operation_name",
    "pack_name",
    "parse_live_pack_name",
    "parse_operation_name",
    "parse_operations_parent",
    "parse_pack_name",
    "parse_parent",
    "tenant_name",
]
