"""The gateway's own API (``flashcrowd.gateway.v1.GatewayService``): WhoAmI, tenant and key admin, and
the audit log.

Who may do what (after the admin scope check of ``catalog.SCOPES``):

* **system administrators** (the bootstrap key, or a JWT with the admin scope and no tenant) create,
  read, delete, undelete and purge tenants; manage platform principals' keys (parent ``platform``)
  and every tenant's keys; read every audit entry (``tenants/-``);
* a **tenant's admin** keys read their tenant, manage its keys and read its audit entries; another
  tenant's are NOT_FOUND to them, like every other resource;
* **platform principals** manage nothing here (their keys are created by system admins).

Tenant keys never hold platform scopes. Keys may expire (``expire_time`` or ``ttl``); listings show
the public part only, never a secret. DeleteTenant soft-deletes (``keystore.py``) and wakes the purge
(``purge.py``) when the undelete window is 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from flashcrowd.gateway.v1 import gateway_service_pb2 as pb
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from services.gateway import catalog
from services.gateway.audit import AuditEntry, list_entries
from services.gateway.auth import Principal
from services.gateway.keystore import API_KEY_TYPE, PLATFORM_OWNER, TENANT_TYPE, KeyRecord, TenantRecord
from services.runtime import InvalidArgument, NotFound, PermissionDenied
from services.runtime.scopes import ALL_SCOPES, PLATFORM_SCOPES, TENANT_SCOPES
from services.runtime.tenant_ids import TENANT_ID_RULE, valid_tenant_id

if TYPE_CHECKING:
    from services.gateway.proxy import Gateway

LocalHandler = Callable[[Principal, Message], Awaitable[Message]]

#: Parent of the platform principals' keys (``platform/apiKeys/{key}``).
PLATFORM_PARENT = "platform"
#: ``ListAuditEntries`` parent of every tenant's entries (system admins).
ALL_TENANTS = "tenants/-"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_DISPLAY_NAME = 200


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _seconds(value: timestamp_pb2.Timestamp) -> float:
    return value.ToNanoseconds() / 1e9


def _tenant_of(name: str, field: str) -> str:
    prefix, _, tenant = name.partition("/")
    if prefix != "tenants" or not valid_tenant_id(tenant):
        raise InvalidArgument(field, f"must be tenants/{{tenant}} with a tenant id of {TENANT_ID_RULE}")
    return tenant


def _key_owner(parent: str, field: str) -> str:
    """``tenants/{t}`` -> t; ``platform`` -> the platform owner (keys of platform principals)."""
    return PLATFORM_OWNER if parent == PLATFORM_PARENT else _tenant_of(parent, field)


def _key_parent(owner: str) -> str:
    return PLATFORM_PARENT if owner == PLATFORM_OWNER else f"tenants/{owner}"


def _key_name(name: str, field: str = "name") -> tuple[str, str]:
    """``tenants/{t}/apiKeys/{k}`` or ``platform/apiKeys/{k}`` -> (owner, key id)."""
    parent, _, key_id = name.rpartition("/apiKeys/")
    if not key_id or "/" in key_id or not (parent == PLATFORM_PARENT or parent.startswith("tenants/")):
        raise InvalidArgument(field, "must be tenants/{tenant}/apiKeys/{key} or platform/apiKeys/{key}")
    return _key_owner(parent, field), key_id


def _page_size(value: int) -> int:
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE})")
    return value or DEFAULT_PAGE_SIZE


def _encode_token(query: dict[str, object], position: list[object]) -> str:
    return base64.urlsafe_b64encode(json.dumps({"q": query, "p": position}).encode()).decode()


def _decode_token(token: str, query: dict[str, object]) -> list[object] | None:
    """The position a page token continues from; it must come from the same query."""
    if not token:
        return None
    try:
        document = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        raise InvalidArgument("page_token", "not a token of a previous response") from None
    if (
        not isinstance(document, dict)
        or document.get("q") != query
        or not isinstance(document.get("p"), list)
    ):
        raise InvalidArgument("page_token", "not a token of a previous response with the same request")
    return document["p"]


def api_key_proto(record: KeyRecord) -> pb.ApiKey:
    key = pb.ApiKey(
        name=f"{_key_parent(record.tenant)}/apiKeys/{record.key_id}",
        scopes=sorted(record.scopes),
        create_time=_timestamp(record.create_time),
        display_name=record.display_name,
    )
    if record.expire_time is not None:
        key.expire_time.CopyFrom(_timestamp(record.expire_time))
    if record.revoke_time is not None:
        key.revoke_time.CopyFrom(_timestamp(record.revoke_time))
    return key


def tenant_proto(record: TenantRecord, purge_after: float) -> pb.Tenant:
    tenant = pb.Tenant(
        name=f"tenants/{record.tenant_id}",
        display_name=record.display_name,
        create_time=_timestamp(record.create_time),
        state=pb.Tenant.STATE_ACTIVE,
    )
    if record.delete_time is not None:
        tenant.state = pb.Tenant.STATE_DELETED
        tenant.delete_time.CopyFrom(_timestamp(record.delete_time))
        tenant.expire_time.CopyFrom(_timestamp(record.delete_time + purge_after))
    if record.purge_time is not None:
        tenant.state = pb.Tenant.STATE_PURGED
        tenant.purge_time.CopyFrom(_timestamp(record.purge_time))
    return tenant


def audit_entry_proto(entry: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(
        name=entry.name,
        time=_timestamp(entry.time),
        tenant=entry.tenant,
        principal=pb.AuditPrincipal(
            kind=entry.principal_kind,
            tenant=entry.principal_tenant,
            subject=entry.subject,
            method=entry.auth_method,
        ),
        method=entry.method,
        resources=list(entry.resources),
        status_code=entry.status_code,
        transport=entry.transport,
        client_address=entry.client_address,
        request_id=entry.request_id,
    )


def _method_path(value: str) -> str:
    """``DeletePack`` / ``AudienceService/DeletePack`` / ``/pkg.Service/DeletePack`` -> the full path."""
    matches = [
        info.full
        for info in catalog.METHODS.values()
        if value in (info.full, info.full.lstrip("/"), info.key, info.name)
    ]
    if len(matches) != 1:
        problem = "names no served method" if not matches else f"is ambiguous: {sorted(matches)}"
        raise InvalidArgument("method", f"{value[:100]!r} {problem}")
    return matches[0]


class GatewayApi:
    """Implementations of the GatewayService methods, called after authentication and scope checks."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.authenticator = gateway.authenticator
        self.settings = gateway.settings

    def handlers(self) -> dict[str, LocalHandler]:
        return {
            "WhoAmI": self.who_am_i,
            "CreateTenant": self.create_tenant,
            "GetTenant": self.get_tenant,
            "DeleteTenant": self.delete_tenant,
            "UndeleteTenant": self.undelete_tenant,
            "PurgeTenant": self.purge_tenant,
            "CreateApiKey": self.create_api_key,
            "GetApiKey": self.get_api_key,
            "ListApiKeys": self.list_api_keys,
            "RevokeApiKey": self.revoke_api_key,
            "ListAuditEntries": self.list_audit_entries,
        }

    @property
    def purge_after(self) -> float:
        return self.settings.tenant_purge_after_seconds

    @staticmethod
    def _require_system(principal: Principal) -> None:
        if not principal.is_system:
            raise PermissionDenied(
                "only system administrators manage tenants and platform keys", reason="SYSTEM_ADMIN_REQUIRED"
            )

    @staticmethod
    def _require_tenant_admin(principal: Principal, tenant: str, resource_type: str, name: str) -> None:
        """System admins act on every tenant; a tenant admin on its own (others are NOT_FOUND)."""
        if principal.is_system:
            return
        if principal.tenant != tenant:
            raise NotFound(resource_type, name)

    def _require_key_admin(self, principal: Principal, owner: str, name: str) -> None:
        if owner == PLATFORM_OWNER:
            self._require_system(principal)
        else:
            self._require_tenant_admin(principal, owner, API_KEY_TYPE, name)

    # --- caller ---
    async def who_am_i(self, principal: Principal, request: Message) -> Message:
        return pb.WhoAmIResponse(
            tenant=principal.tenant or "",
            scopes=sorted(principal.scopes),
            method=principal.method,
            kind=principal.kind,
        )

    # --- tenants ---
    async def create_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.CreateTenantRequest)
        self._require_system(principal)
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "required")
        record = await asyncio.to_thread(
            self.store.create_tenant, request.tenant_id, request.tenant.display_name
        )
        return tenant_proto(record, self.purge_after)

    async def get_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.GetTenantRequest)
        tenant = _tenant_of(request.name, "name")
        self._require_tenant_admin(principal, tenant, TENANT_TYPE, request.name)
        record = await asyncio.to_thread(self.store.get_tenant, tenant)
        if record is None:
            raise NotFound(TENANT_TYPE, request.name)
        return tenant_proto(record, self.purge_after)

    async def delete_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.DeleteTenantRequest)
        self._require_system(principal)
        tenant = _tenant_of(request.name, "name")
        await asyncio.to_thread(self.store.delete_tenant, tenant)
        self.authenticator.invalidate()
        if self.purge_after <= 0:
            self.gateway.purger.wake()
        return empty_pb2.Empty()

    async def undelete_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.UndeleteTenantRequest)
        self._require_system(principal)
        tenant = _tenant_of(request.name, "name")
        record = await asyncio.to_thread(self.store.undelete_tenant, tenant, purge_after=self.purge_after)
        self.authenticator.invalidate()
        return tenant_proto(record, self.purge_after)

    async def purge_tenant(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.PurgeTenantRequest)
        self._require_system(principal)
        tenant = _tenant_of(request.name, "name")
        record = await self.gateway.purger.purge(tenant, force=True)
        return tenant_proto(record, self.purge_after)

    # --- keys ---
    async def create_api_key(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.CreateApiKeyRequest)
        owner = _key_owner(request.parent, "parent")
        if owner == PLATFORM_OWNER:
            self._require_system(principal)
        else:
            self._require_tenant_admin(principal, owner, TENANT_TYPE, request.parent)
        scopes = list(request.scopes)
        if not scopes:
            raise InvalidArgument("scopes", "at least one scope is required")
        unknown = sorted(set(scopes) - ALL_SCOPES)
        if unknown:
            raise InvalidArgument("scopes", f"unknown scopes {unknown}; known: {sorted(ALL_SCOPES)}")
        platform_only = sorted(set(scopes) & PLATFORM_SCOPES)
        if owner != PLATFORM_OWNER and platform_only:
            raise InvalidArgument(
                "scopes",
                f"{platform_only} are platform scopes: tenant keys may hold {sorted(TENANT_SCOPES)}; "
                "create platform keys under parent 'platform'",
            )
        if len(request.display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument("display_name", f"at most {MAX_DISPLAY_NAME} characters")
        expire_time = self._expiry(request)
        record, secret = await asyncio.to_thread(
            self.store.create_key, owner, scopes, expire_time=expire_time, display_name=request.display_name
        )
        self.gateway.key_directory.add(record.key_id)
        return pb.CreateApiKeyResponse(api_key=api_key_proto(record), secret=secret)

    @staticmethod
    def _expiry(request: pb.CreateApiKeyRequest) -> float | None:
        """AIP-214: ``expire_time`` (in the future) or ``ttl`` (positive); neither: never expires."""
        which = request.WhichOneof("expiration")
        now = time.time()
        if which == "expire_time":
            expire_time = _seconds(request.expire_time)
            if expire_time <= now:
                raise InvalidArgument("expire_time", "must be in the future")
            return expire_time
        if which == "ttl":
            ttl = request.ttl.ToNanoseconds() / 1e9
            if ttl <= 0:
                raise InvalidArgument("ttl", "must be positive")
            return now + ttl
        return None

    async def get_api_key(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.GetApiKeyRequest)
        owner, key_id = _key_name(request.name)
        self._require_key_admin(principal, owner, request.name)
        record = await asyncio.to_thread(self.store.get_key, key_id)
        if record is None or record.tenant != owner:
            raise NotFound(API_KEY_TYPE, request.name)
        return api_key_proto(record)

    async def list_api_keys(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.ListApiKeysRequest)
        owner = _key_owner(request.parent, "parent")
        if owner == PLATFORM_OWNER:
            self._require_system(principal)
        else:
            self._require_tenant_admin(principal, owner, TENANT_TYPE, request.parent)
        size = _page_size(request.page_size)
        query: dict[str, object] = {"m": "apiKeys", "parent": request.parent}
        position = _decode_token(request.page_token, query)
        after: tuple[float, str] | None = None
        if position is not None:
            if (
                len(position) != 2
                or not isinstance(position[0], int | float)
                or not isinstance(position[1], str)
            ):
                raise InvalidArgument("page_token", "not a token of a previous response")
            after = (float(position[0]), position[1])
        records = await asyncio.to_thread(self.store.list_keys, owner, after=after, limit=size + 1)
        response = pb.ListApiKeysResponse(api_keys=[api_key_proto(record) for record in records[:size]])
        if len(records) > size:
            last = records[size - 1]
            response.next_page_token = _encode_token(query, [last.create_time, last.key_id])
        return response

    async def revoke_api_key(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.RevokeApiKeyRequest)
        owner, key_id = _key_name(request.name)
        self._require_key_admin(principal, owner, request.name)
        await asyncio.to_thread(self.store.revoke_key, owner, key_id)
        self.authenticator.invalidate()
        return empty_pb2.Empty()

    # --- audit log ---
    async def list_audit_entries(self, principal: Principal, request: Message) -> Message:
        assert isinstance(request, pb.ListAuditEntriesRequest)
        if request.parent == ALL_TENANTS:
            self._require_system(principal)
            tenant: str | None = None
        else:
            tenant = _tenant_of(request.parent, "parent")
            self._require_tenant_admin(principal, tenant, TENANT_TYPE, request.parent)
        size = _page_size(request.page_size)
        method = _method_path(request.method) if request.method else None
        start = _seconds(request.start_time) if request.HasField("start_time") else None
        end = _seconds(request.end_time) if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidArgument("end_time", "must be after start_time")
        query: dict[str, object] = {
            "m": "audit",
            "parent": request.parent,
            "method": method,
            "s": start,
            "e": end,
        }
        position = _decode_token(request.page_token, query)
        before: int | None = None
        if position is not None:
            if len(position) != 1 or not isinstance(position[0], int):
                raise InvalidArgument("page_token", "not a token of a previous response")
            before = position[0]
        # This replica's own queued entries first, so a caller reads what it just did.
        with contextlib.suppress(TimeoutError):
            await self.gateway.audit.flush(timeout=2.0)
        entries = await asyncio.to_thread(
            list_entries,
            self.store,
            tenant=tenant,
            method=method,
            start_time=start,
            end_time=end,
            before_id=before,
            limit=size + 1,
        )
        response = pb.ListAuditEntriesResponse(audit_entries=[audit_entry_proto(e) for e in entries[:size]])
        if len(entries) > size:
            response.next_page_token = _encode_token(query, [entries[size - 1].entry_id])
        return response


__all__ = ["GatewayApi", "LocalHandler", "api_key_proto", "audit_entry_proto", "tenant_proto"]
