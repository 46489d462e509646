"""The gateway's own API (``flashcrowd.gateway.v1.GatewayService``): WhoAmI and tenant / key admin.

System administrators (the bootstrap key, or a JWT with the admin scope and no tenant) create and
delete tenants. A tenant's own admin keys manage that tenant's keys; another tenant's keys are
NOT_FOUND to them, like every other resource.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from flashcrowd.gateway.v1 import gateway_service_pb2 as pb
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.gateway.auth import Authenticator, Principal
from services.gateway.keystore import API_KEY_TYPE, PLATFORM_OWNER, TENANT_TYPE, KeyStore
from services.runtime import InvalidArgument, NotFound, PermissionDenied
from services.runtime.scopes import ALL_SCOPES, PLATFORM_SCOPES, TENANT_SCOPES
from services.runtime.tenant_ids import valid_tenant_id

LocalHandler = Callable[[Principal, Message], Awaitable[Message]]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


#: Parent of the platform principals' keys (``platform/apiKeys/{key}``).
PLATFORM_PARENT = "platform"


def _tenant_of(name: str, field: str) -> str:
    prefix, _, tenant = name.partition("/")
    if prefix != "tenants" or not valid_tenant_id(tenant):
        raise InvalidArgument(field, "must be tenants/{tenant}")
    return tenant


def _key_owner(parent: str, field: str) -> str:
    """``tenants/{t}`` -> t; ``platform`` -> the platform owner (keys of platform principals)."""
    return PLATFORM_OWNER if parent == PLATFORM_PARENT else _tenant_of(parent, field)


def _key_parent(owner: str) -> str:
    return PLATFORM_PARENT if owner == PLATFORM_OWNER else f"tenants/{owner}"


class GatewayApi:
    """Implementations of the GatewayService methods, called after authentication and scope checks."""

    def __init__(self, store: KeyStore, authenticator: Authenticator) -> None:
        self.store = store
        self.authenticator = authenticator

    def handlers(self) -> dict[str, LocalHandler]:
        return {
            "WhoAmI": self.who_am_i,
            "CreateTenant": self.create_tenant,
            "DeleteTenant": self.delete_tenant,
            "CreateApiKey": self.create_api_key,
            "RevokeApiKey": self.revoke_api_key,
        }

    @staticmethod
    def _require_system(principal: Principal) -> None:
        if not principal.is_system:
            raise PermissionDenied(
                "only system administrators manage tenants", reason="SYSTEM_ADMIN_REQUIRED"
            )

    @staticmethod
    def _require_tenant_admin(principal: Principal, tenant: str, resource_type: str, name: str) -> None:
        if principal.is_system:
            return
        if principal.tenant != tenant:
            raise NotFound(resource_type, name)

    async def who_am_i(self, principal: Principal, request: Message) -> Message:
        return pb.WhoAmIResponse(
            tenant=principal.tenant or "", scopes=sorted(principal.scopes), method=principal.method
        )

    async def create_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.CreateTenantRequest)
        self._require_system(principal)
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "required")
        record = await asyncio.to_thread(
            self.store.create_tenant, request.tenant_id, request.tenant.display_name
        )
        return pb.Tenant(
            name=f"tenants/{record.tenant_id}",
            display_name=record.display_name,
            create_time=_timestamp(record.create_time),
        )

    async def delete_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.DeleteTenantRequest)
        self._require_system(principal)
        tenant = _tenant_of(request.name, "name")
        await asyncio.to_thread(self.store.delete_tenant, tenant)
        self.authenticator.invalidate()
        return empty_pb2.Empty()

    async def create_api_key(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.CreateApiKeyRequest)
        tenant = _key_owner(request.parent, "parent")
        if tenant == PLATFORM_OWNER:
            self._require_system(principal)
        else:
            self._require_tenant_admin(principal, tenant, TENANT_TYPE, request.parent)
        scopes = list(request.scopes)
        if not scopes:
            raise InvalidArgument("scopes", "at least one scope is required")
        unknown = sorted(set(scopes) - ALL_SCOPES)
        if unknown:
            raise InvalidArgument("scopes", f"unknown scopes {unknown}; known: {sorted(ALL_SCOPES)}")
        platform_only = sorted(set(scopes) & PLATFORM_SCOPES)
        if tenant != PLATFORM_OWNER and platform_only:
            raise InvalidArgument(
                "scopes",
                f"{platform_only} are platform scopes: tenant keys may hold {sorted(TENANT_SCOPES)}; "
                "create platform keys under parent 'platform'",
            )
        record, secret = await asyncio.to_thread(self.store.create_key, tenant, scopes)
        return pb.CreateApiKeyResponse(
            api_key=pb.ApiKey(
                name=f"{_key_parent(tenant)}/apiKeys/{record.key_id}",
                scopes=sorted(record.scopes),
                create_time=_timestamp(record.create_time),
            ),
            secret=secret,
        )

    async def revoke_api_key(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.RevokeApiKeyRequest)
        parent, _, key_id = request.name.rpartition("/apiKeys/")
        if not key_id or "/" in key_id or not (parent == PLATFORM_PARENT or parent.startswith("tenants/")):
            raise InvalidArgument("name", "must be tenants/{tenant}/apiKeys/{key} or platform/apiKeys/{key}")
        tenant = _key_owner(parent, "name")
        if tenant == PLATFORM_OWNER:
            self._require_system(principal)
        else:
            self._require_tenant_admin(principal, tenant, API_KEY_TYPE, request.name)
        await asyncio.to_thread(self.store.revoke_key, tenant, key_id)
        self.authenticator.invalidate()
        return empty_pb2.Empty()


__all__ = ["GatewayApi", "LocalHandler"]
